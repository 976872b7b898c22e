"""Time the incremental pruning sweep against one forward pass and the naive loop.

Uses the lab BadNet (``bd_net.h5``, found through ``--model``, $TBD_LAB3_DIR or
../shared/data/lab3) or, when absent, the same architecture with random
weights. Inputs are random 55x47x3 images (11,547 clean plus as many
"poisoned"), which is enough for timing.

    python benchmarks/sweep.py [--images 11547] [--repeats 5] [--naive-levels 4] [--full-naive]
                               [--memory-budget 128] [--scale 4]
                               [--layers conv_3 fc_1 --steps 20] [--engines]

The one-layer sweep ranks ``conv_3`` on the clean set, so the statistics and
the sweep's inputs come from one pass over the network before ``conv_3``; it
is also timed as it was before that (statistics, then that part of the
network again), through ``ranking_data``, and both tables are compared.
``--scale`` reruns the sweep with that many times the data (the same images
repeated) under the same ``--memory-budget`` (MiB) and prints the peak
memory at both sizes: the kept outputs stop growing at the budget and the
batches beyond it run through the network before ``conv_3`` again. The peak
resident memory above the data also holds what the call's input check
allocates (a boolean copy of each input set while it looks for NaN).

Every row of the levels runs on the ``conv_3`` channels that are not zero for
some image of its batch; the sweep is also timed with every row on all
channels (the masked model's computation), and both tables are compared.
The timed sweeps alternate with full passes, ``--repeats`` times: each run
is divided by the mean of the passes just before and after it, and the
median ratio is printed with the CPU range, since this machine's speed
drifts by tens of percent over minutes.

``--layers`` also times the sweep of those layers together (``--steps``
levels) against a full forward pass per level with the same masks.
``--engines`` times the one-layer sweep's levels through the engine the
sweep uses for several layers (one masked copy, the rest of the network run
once per level), to show what the one-layer fast path saves.
"""

import argparse
import os
import pathlib
import resource
import time

import numpy as np

from tf_backdoor_defense._keras import tf
from tf_backdoor_defense.metrics import predict_labels
from tf_backdoor_defense.pruning import _sweep
from tf_backdoor_defense.pruning._sweep import DEFAULT_MEMORY_BUDGET, prune_to_threshold

from export import face_images  # benchmarks/ is on sys.path when run as a script
from lab_badnet import load_lab_badnet

def best_of(fn, repeats):
    """``(wall seconds, CPU seconds, last result)`` of the fastest of ``repeats`` runs."""
    times, result = [], None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    wall, cpu = min(times)
    return wall, cpu, result


def _timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return np.array([time.perf_counter() - start, time.process_time() - cpu]), result


def paired_ratios(fns, one_pass, repeats):
    """Each of ``fns`` ({name: fn}) against the full passes run right before and after it.

    The machine's speed drifts by tens of percent over minutes (shared cores),
    so each run of a function is divided by the mean of the two passes around
    it, the functions alternate, and the median of ``repeats`` such ratios is
    reported. Returns ``({name: Ratios}, pass seconds (wall, CPU) median)``.
    """
    ratios = {name: [] for name in fns}
    results, passes = {}, []
    before, _ = _timed(one_pass)
    passes.append(before)
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, results[name] = _timed(fn)
            after, _ = _timed(one_pass)
            passes.append(after)
            ratios[name].append(seconds / ((before + after) / 2))
            before = after
    return ({name: Ratios(np.array(r), results[name]) for name, r in ratios.items()},
            np.median(np.array(passes), axis=0))


class Ratios:
    """Paired ratios (wall, CPU) of one function's runs to a full pass."""

    def __init__(self, ratios, result):
        self.wall, self.cpu = np.median(ratios, axis=0)
        self.cpu_range = ratios[:, 1].min(), ratios[:, 1].max()
        self.result = result

    def __str__(self):
        low, high = self.cpu_range
        return (f"{self.wall:.2f}x one pass, CPU time {self.cpu:.2f}x (median of paired runs; "
                f"CPU {low:.2f}-{high:.2f}x)")


class _RecordedCache(_sweep.PrefixCache):
    """The sweep's PrefixCache, remembered so that its peak size can be printed."""

    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _RecordedCache.last = self


def _rss_mib(field):
    """VmRSS or VmHWM (peak) of this process in MiB, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss():
    """Start a new peak-RSS measurement (Linux: VmHWM := VmRSS); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=None)
    parser.add_argument("--images", type=int, default=11547)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5,
                        help="paired runs of each timed sweep (medians are printed)")
    parser.add_argument("--naive-levels", type=int, default=4,
                        help="levels timed for the naive loop, extrapolated to all levels")
    parser.add_argument("--full-naive", action="store_true", help="time every naive level")
    parser.add_argument("--layers", nargs="+", default=None,
                        help="also time the several-layer sweep of these layers")
    parser.add_argument("--steps", type=int, default=20, help="levels of the several-layer sweep")
    parser.add_argument("--engines", action="store_true",
                        help="also run the one-layer levels through the several-layer engine")
    parser.add_argument("--memory-budget", type=float, default=128,
                        help="MiB of conv_3's (pooled) outputs kept for the sweep")
    parser.add_argument("--scale", type=int, default=4,
                        help="rerun the sweep with this many times the data (1: skip)")
    args = parser.parse_args()
    budget = int(args.memory_budget * 2**20)
    _sweep.PrefixCache = _RecordedCache

    model, source, folder = load_lab_badnet(args.model)
    rng = np.random.default_rng(0)
    clean_x = rng.uniform(0, 255, (args.images, 55, 47, 3)).astype(np.float32)
    poisoned_x = rng.uniform(0, 255, (args.images, 55, 47, 3)).astype(np.float32)
    clean_y = predict_labels(model, clean_x[:512], args.batch_size)
    clean_y = np.resize(clean_y, args.images)
    poisoned_y = np.zeros(args.images, dtype=np.int64)
    channels = model.get_layer("conv_3").filters

    def one_pass():
        predict_labels(model, clean_x, args.batch_size)
        predict_labels(model, poisoned_x, args.batch_size)

    one_pass()  # trace and warm up

    def sweep(clean=(clean_x, clean_y), poisoned=(poisoned_x, poisoned_y), **kwargs):
        return prune_to_threshold(model, clean, layers="conv_3", poisoned_validation_data=poisoned,
                                  max_accuracy_drop=[0.02, 0.04, 0.10], batch_size=args.batch_size,
                                  memory_budget=budget, **kwargs)

    first_total, _, result = best_of(sweep, 1)  # traces the compiled functions
    cache = _RecordedCache.last
    evaluator = cache.evaluator

    def exact_rows():  # every row on all channels, the masked model's computation
        evaluator.use_channel_subset = False
        try:
            return sweep()
        finally:
            evaluator.use_channel_subset = True

    def separate_statistics():
        return sweep(ranking_data=(clean_x, clean_y))

    def prefix_only():
        for part in (clean_x, poisoned_x):
            for start in range(0, len(part), args.batch_size):
                evaluator.prefix_outputs(part[start:start + args.batch_size])

    for warm in (exact_rows, separate_statistics, prefix_only):
        warm()  # trace
    timed, (full_pass, full_cpu) = paired_ratios(
        {"sweep": sweep, "exact rows": exact_rows, "separate statistics": separate_statistics,
         "prefix": prefix_only}, one_pass, args.repeats)
    result = timed["sweep"].result
    before = timed["separate statistics"].result
    exact = timed["exact rows"].result
    identical = before.history.equals(result.history) and before.levels == result.levels and \
        np.array_equal(before.mean_activations["conv_3"], result.mean_activations["conv_3"]) and \
        all(np.array_equal(before.masks[t]["conv_3"], result.masks[t]["conv_3"])
            for t in result.thresholds)
    exact_same = exact.history.equals(result.history) and exact.levels == result.levels

    levels = channels + 1 if args.full_naive else min(args.naive_levels, channels + 1)
    start = time.perf_counter()
    for level in range(levels):
        pruned = result.pruned_model(level)
        predict_labels(pruned, clean_x, args.batch_size)
        predict_labels(pruned, poisoned_x, args.batch_size)
    naive = (time.perf_counter() - start) / levels * (channels + 1)
    random_active = active_channels(evaluator, clean_x[:512])
    evaluator.predictions(clean_x[:args.batch_size], result.rankings["conv_3"])
    rows_per_image = evaluator.rows_evaluated / args.batch_size
    subset = rows_on_subset(evaluator, clean_x[:8 * args.batch_size], result.rankings["conv_3"],
                            args.batch_size)
    faces = face_images(folder)
    face_active = None if faces is None else active_channels(evaluator, faces)

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model: {source}")
    print(f"data: {args.images} clean + {args.images} poisoned images of 55x47x3, "
          f"batch {args.batch_size}, TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"one full forward pass over both sets: {full_pass:.2f} s (CPU time {full_cpu:.2f} s; "
          f"the median of {len(timed) * args.repeats + 1} passes)")
    print(f"full {channels + 1}-level sweep (statistics + sweep): {timed['sweep']} "
          f"(statistics and the clean set's pass {result.timings['statistics_seconds']:.2f} s, "
          f"sweep {result.timings['sweep_seconds']:.2f} s); the first call, tracing "
          f"included: {first_total:.2f} s = {first_total / full_pass:.2f}x")
    print(f"  memory budget {budget / 2**20:.0f} MiB (library default "
          f"{DEFAULT_MEMORY_BUDGET / 2**20:.0f} MiB); kept {cache.peak_bytes / 2**20:.1f} MiB "
          f"of conv_3's pooled outputs, all batches kept: {cache.complete}")
    print(f"  the network before conv_3 over both sets alone: {timed['prefix']}; the rest of the "
          f"sweep (the levels after conv_3, ranking, tables): CPU time "
          f"{timed['sweep'].cpu - timed['prefix'].cpu:.2f}x")
    print(f"  the levels re-evaluate {rows_per_image:.1f} (level, image) pairs per image: "
          f"level 0 and the level of each of its {random_active:.1f} active conv_3 channels "
          f"(of {channels}; the lab's real clean faces: "
          f"{'not found' if face_active is None else f'{face_active:.1f}'}), less the last, "
          f"whose all-zero output is one shared pair per batch")
    print(f"  {subset}")
    print(f"the same sweep with every row on all {channels} channels: {timed['exact rows']}; "
          f"identical history and levels: {exact_same}")
    print(f"the same sweep with the statistics as a separate pass (ranking_data): "
          f"{timed['separate statistics']}; identical history, means, levels and masks: "
          f"{identical}")
    print(f"naive per-level loop ({'all' if args.full_naive else levels} levels timed"
          f"{'' if args.full_naive else ', extrapolated'}): {naive:.1f} s "
          f"= {naive / full_pass:.1f}x one pass")
    if args.scale > 1:
        memory_at_scales(sweep, (clean_x, clean_y), (poisoned_x, poisoned_y), args, full_pass,
                         full_cpu)
    if args.engines:
        masked_copy_engine(model, result, (clean_x, clean_y), args, full_pass)
    if args.layers:
        several_layers(model, (clean_x, clean_y), (poisoned_x, poisoned_y), args, full_pass)
    print(f"peak resident memory: {peak_mib:.0f} MiB")


def active_channels(evaluator, x):
    """Mean number of conv_3 channels not all zero after pooling, per image of ``x``."""
    frontier = evaluator.prefix_outputs(x)[0].numpy().reshape(len(x), -1, evaluator.channels)
    return float(np.mean(np.sum(np.any(frontier != 0, axis=1), axis=1)))


def rows_on_subset(evaluator, x, ranking, batch_size):
    """What share of the rows of ``x``'s batches ran on a subset of conv_3's channels."""
    rows = on_subset = rechecked = kept = 0
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        evaluator.predictions(batch, ranking)
        rows += evaluator.rows_evaluated
        on_subset += evaluator.rows_on_subset
        rechecked += evaluator.rows_rechecked
        frontier = evaluator.prefix_outputs(batch)[0].numpy().reshape(len(batch), -1,
                                                                      evaluator.channels)
        kept += np.any(frontier != 0, axis=(0, 1)).sum()
    batches = -(-len(x) // batch_size)
    return (f"the rows of {len(x)} clean images: {on_subset} of {rows} ran on the conv_3 "
            f"channels not zero for every image of their batch ({kept / batches:.1f} of "
            f"{evaluator.channels} a batch, on average), {rechecked} of them ran again on all "
            f"channels (near a tie)")


def memory_at_scales(sweep, clean, poisoned, args, full_pass, full_cpu):
    """Peak memory of the sweep at 1x and ``args.scale`` x the data, under one budget."""
    for scale in (1, args.scale):
        data = [tuple(np.concatenate([part] * scale) for part in pair) for pair in (clean, poisoned)]
        measured = _reset_peak_rss()
        rss = _rss_mib("VmRSS")
        start, cpu = time.perf_counter(), time.process_time()
        sweep(*data)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        grown = _rss_mib("VmHWM") - rss if measured else float("nan")
        cache = _RecordedCache.last
        print(f"  {scale}x ({scale * args.images} + {scale * args.images} images): sweep "
              f"{seconds:.2f} s = {seconds / (scale * full_pass):.2f}x one pass (1x pass times "
              f"{scale}), CPU time {cpu / (scale * full_cpu):.2f}x; kept "
              f"{cache.peak_bytes / 2**20:.1f} MiB, all batches kept: {cache.complete}; "
              f"peak RSS above the data during the call: {grown:.0f} MiB")
        del data


def masked_copy_engine(model, result, clean, args, full_pass):
    """The one-layer sweep's levels (clean set only) through the several-layer engine."""
    from tf_backdoor_defense._validation import check_data
    from tf_backdoor_defense.pruning import _sweep

    level_masks = [result.masks_at(level) for level in range(result.steps + 1)]
    data = check_data(clean, "validation_data", model=model)
    count = lambda p, y: (int(np.sum(p == y)), y.size)  # noqa: E731
    predict = _sweep._MaskedLevels(model, list(result.layers), result._base_masks, level_masks)
    _sweep._tally(predict, data.subset(np.arange(args.batch_size)), args.batch_size, count)
    start = time.perf_counter()
    correct, total = _sweep._tally(predict, data, args.batch_size, count)
    seconds = time.perf_counter() - start
    same = bool(np.array_equal(correct / total, result.history["clean_accuracy"].to_numpy()))
    print(f"the same {result.steps + 1} levels of the clean set through the several-layer "
          f"engine: {seconds:.2f} s = {seconds / full_pass:.2f}x one pass over both sets "
          f"(identical accuracies: {same})")


def several_layers(model, clean, poisoned, args, full_pass):
    """Time the several-layer sweep against a full pass per level with the same masks."""
    from tf_backdoor_defense.masks._wrapper import wrap_layers

    def sweep():
        return prune_to_threshold(model, clean, layers=args.layers,
                                  poisoned_validation_data=poisoned, steps=args.steps,
                                  batch_size=args.batch_size)

    sweep()  # trace and warm up
    start = time.perf_counter()
    result = sweep()
    total = time.perf_counter() - start
    masked = wrap_layers(model, args.layers)
    start = time.perf_counter()
    same = True
    for level in range(args.steps + 1):
        for name, mask in result.masks_at(level).items():
            masked.get_layer(name).set_mask(mask)
        accuracy = np.mean(predict_labels(masked, clean[0], args.batch_size) == clean[1])
        predict_labels(masked, poisoned[0], args.batch_size)
        same &= bool(np.isclose(accuracy, result.history["clean_accuracy"].iloc[level]))
    naive = time.perf_counter() - start
    print(f"several-layer sweep of {', '.join(args.layers)} ({args.steps + 1} levels): "
          f"{total:.2f} s = {total / full_pass:.2f}x one pass; a full pass per level: "
          f"{naive:.2f} s ({naive / total:.1f}x slower, same accuracies: {same})")


if __name__ == "__main__":
    main()

"""Time the incremental pruning sweep against one forward pass and the naive loop.

Uses the lab BadNet (``bd_net.h5``, found through ``--model``, $TBD_LAB3_DIR or
../shared/data/lab3) or, when absent, the same architecture with random
weights. Inputs are random 55x47x3 images (11,547 clean plus as many
"poisoned"), which is enough for timing.

    python benchmarks/sweep.py [--images 11547] [--naive-levels 4] [--full-naive]
                               [--layers conv_3 fc_1 --steps 20] [--engines]

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
from tf_backdoor_defense.pruning._sweep import prune_to_threshold

from lab_badnet import load_lab_badnet  # benchmarks/ is on sys.path when run as a script

def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=None)
    parser.add_argument("--images", type=int, default=11547)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--naive-levels", type=int, default=4,
                        help="levels timed for the naive loop, extrapolated to all levels")
    parser.add_argument("--full-naive", action="store_true", help="time every naive level")
    parser.add_argument("--layers", nargs="+", default=None,
                        help="also time the several-layer sweep of these layers")
    parser.add_argument("--steps", type=int, default=20, help="levels of the several-layer sweep")
    parser.add_argument("--engines", action="store_true",
                        help="also run the one-layer levels through the several-layer engine")
    args = parser.parse_args()

    model, source, _ = load_lab_badnet(args.model)
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
    full_pass = best_of(one_pass, args.repeats)

    def sweep():
        return prune_to_threshold(model, (clean_x, clean_y), layers="conv_3",
                                  poisoned_validation_data=(poisoned_x, poisoned_y),
                                  max_accuracy_drop=[0.02, 0.04, 0.10], batch_size=args.batch_size)

    sweep()  # trace and warm up
    start = time.perf_counter()
    result = sweep()
    sweep_total = time.perf_counter() - start

    levels = channels + 1 if args.full_naive else min(args.naive_levels, channels + 1)
    start = time.perf_counter()
    for level in range(levels):
        pruned = result.pruned_model(level)
        predict_labels(pruned, clean_x, args.batch_size)
        predict_labels(pruned, poisoned_x, args.batch_size)
    naive = (time.perf_counter() - start) / levels * (channels + 1)

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model: {source}")
    print(f"data: {args.images} clean + {args.images} poisoned images of 55x47x3, "
          f"batch {args.batch_size}, TensorFlow {tf.__version__}, {os.cpu_count()} CPUs")
    print(f"one full forward pass over both sets: {full_pass:.2f} s")
    print(f"full {channels + 1}-level sweep (statistics + sweep): {sweep_total:.2f} s "
          f"= {sweep_total / full_pass:.2f}x one pass "
          f"(statistics {result.timings['statistics_seconds']:.2f} s, "
          f"sweep {result.timings['sweep_seconds']:.2f} s)")
    print(f"naive per-level loop ({'all' if args.full_naive else levels} levels timed"
          f"{'' if args.full_naive else ', extrapolated'}): {naive:.1f} s "
          f"= {naive / full_pass:.1f}x one pass")
    if args.engines:
        masked_copy_engine(model, result, (clean_x, clean_y), args, full_pass)
    if args.layers:
        several_layers(model, (clean_x, clean_y), (poisoned_x, poisoned_y), args, full_pass)
    print(f"peak resident memory: {peak_mib:.0f} MiB")


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

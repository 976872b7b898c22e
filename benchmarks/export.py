"""Parameters and inference throughput of the lab BadNet: masked vs folded vs shrunk.

Prunes conv_3 of the lab BadNet (``bd_net.h5`` from ``--model``,
$TBD_LAB3_DIR or ../shared/data/lab3; the same architecture with random
weights when absent) at its 10% threshold level (52 of 60 channels, lowest
mean activation first, measured on the lab's face images or, without them,
on random images), then times a compiled batch loop over random 55x47x3
images for the masked model, the folded export and the shrunk export (as a
Keras model and as the reloaded SavedModel).

    python benchmarks/export.py [--images 4096] [--batch-size 256] [--pruned 52]
                                [--breakdown] [--tflite]

``--breakdown`` also prints where the time goes: milliseconds per batch of
the original and the shrunk network cut after each stage of the lab
architecture (prefix timings, so each row includes the rows above it).
``--tflite`` also times both networks converted to TFLite (2 threads).
``--conv-widths`` also times conv_3 alone (with its bias, ReLU and pooling,
on a batch of pool_2-shaped inputs) at several output widths.
"""

import argparse
import pathlib
import tempfile
import time

import numpy as np

from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.scoring._activations import mean_channel_activations
from tf_backdoor_defense.export._export import count_params, export_saved_model, strip_masks
from tf_backdoor_defense.masks._wrapper import wrap_layers
from tf_backdoor_defense.pruning._ranking import level_mask, rank_channels

from lab_badnet import load_lab_badnet  # benchmarks/ is on sys.path when run as a script


def face_images(folder):
    from PIL import Image

    files = sorted((folder / "faces").glob("cl_*.png")) if folder else []
    if not files:
        return None
    return np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) for f in files])


def throughput(fn, x, batch_size, repeats):
    """Best images/second over ``repeats`` passes of a compiled batch loop."""
    batches = [tf.constant(x[s:s + batch_size]) for s in range(0, len(x), batch_size)]
    fn(batches[0])  # trace
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            out = fn(batch)
        np.asarray(out)  # wait for the last batch
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def interleaved_rates(candidates, x, batch_size, repeats):
    """Best images/second of each candidate, timed in turn ``repeats`` times to even out noise."""
    rates = {name: 0.0 for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            rates[name] = max(rates[name], throughput(fn, x, batch_size, 1))
    return rates


def compiled(model, jit=False):
    spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec],
                       jit_compile=jit or None)


STAGES = ("conv_1", "pool_1", "conv_2", "pool_2", "conv_3", "pool_3", "activation_1", "output")


def batch_milliseconds(fn, x, batch_size, repeats):
    return 1000.0 * batch_size / throughput(fn, x, batch_size, repeats)


def stage_breakdown(models, x, batch_size, repeats):
    """Milliseconds per batch of each model cut after each stage in STAGES."""
    cuts = {name: {stage: compiled(keras.Model(m.inputs, m.get_layer(stage).output))
                   for stage in STAGES} for name, m in models.items()}
    times = {name: {stage: float("inf") for stage in STAGES} for name in models}
    for _ in range(repeats):  # interleaved, best of each
        for name, stages in cuts.items():
            for stage, fn in stages.items():
                times[name][stage] = min(times[name][stage],
                                         batch_milliseconds(fn, x, batch_size, 1))
    return times


def conv_width_times(widths, batch_size, repeats):
    """Milliseconds per batch of a conv_3-shaped layer (3x3 over 12x10x40, then ReLU and
    2x2 max pooling) with each number of output channels, minus the cost of an empty call."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 1, (batch_size, 12, 10, 40)).astype(np.float32))

    def best(fn):
        fn(x)
        times = []
        for _ in range(repeats * 5):
            start = time.perf_counter()
            np.asarray(fn(x))
            times.append(time.perf_counter() - start)
        return 1000.0 * min(times)

    empty = best(tf.function(lambda a: a[:1, :1, :1, :1] * 1.0))
    result = {}
    for width in widths:
        kernel = tf.constant(rng.normal(size=(3, 3, 40, width)).astype(np.float32))
        bias = tf.constant(rng.normal(size=width).astype(np.float32))
        layer = tf.function(lambda a, k=kernel, b=bias: tf.nn.max_pool2d(
            tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(a, k, 1, "VALID"), b)), 2, 2, "VALID"))
        result[width] = best(layer) - empty
    return result


def tflite_runner(model, batch_size):
    """A function running ``model`` converted to TFLite on one batch (2 threads)."""
    spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)
    interpreter = tf.lite.Interpreter(model_content=converter.convert(), num_threads=2)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, [batch_size] + list(model.inputs[0].shape[1:]))
    interpreter.allocate_tensors()
    output = interpreter.get_output_details()[0]["index"]

    def run(batch):
        interpreter.set_tensor(index, np.asarray(batch))
        interpreter.invoke()
        return interpreter.get_tensor(output)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=None)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pruned", type=int, default=52, help="conv_3 channels to prune")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--jit", action="store_true",
                        help="compile every Keras model with XLA (jit_compile=True)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also print milliseconds per batch after each stage")
    parser.add_argument("--tflite", action="store_true",
                        help="also time both networks converted to TFLite")
    parser.add_argument("--conv-widths", type=int, nargs="+", metavar="C",
                        help="also time conv_3 alone with C output channels, e.g. 8 16 60")
    args = parser.parse_args()

    net, source, folder = load_lab_badnet(args.model)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.images, 55, 47, 3)).astype(np.float32)
    faces = face_images(folder)
    ranked_on = "clean face images" if faces is not None else "random images"
    means = mean_channel_activations(net, faces if faces is not None else x[:512], layers="conv_3")
    mask = level_mask(rank_channels(means), args.pruned)
    masked = wrap_layers(net, "conv_3", masks={"conv_3": mask})
    folded = strip_masks(masked)
    shrunk, report = strip_masks(masked, shrink=True, return_report=True)

    check = x[:512]
    reference = masked.predict(check, batch_size=args.batch_size, verbose=0)
    diffs = {name: float(np.max(np.abs(m.predict(check, batch_size=args.batch_size, verbose=0)
                                        - reference)))
             for name, m in (("folded", folded), ("shrunk", shrunk))}

    with tempfile.TemporaryDirectory() as tmp:
        path = export_saved_model(masked, pathlib.Path(tmp) / "badnet", shrink=True, version=1)
        loaded = tf.saved_model.load(str(path))
        served = loaded.signatures["serving_default"]
        diffs["saved_model"] = float(np.max(np.abs(served(tf.constant(check))["output"].numpy()
                                                   - reference)))
        candidates = {
            "original": compiled(net, args.jit),
            "masked": compiled(masked, args.jit),
            "folded": compiled(folded, args.jit),
            "shrunk": compiled(shrunk, args.jit),
            "shrunk SavedModel": lambda b: served(b)["output"],
            # the same SavedModel through its restored tf.function, without the Python
            # signature wrapper (TF Serving runs the graph from C++, without that wrapper too)
            "SavedModel function": lambda b: loaded.serve(b)["output"],
        }
        rates = interleaved_rates(candidates, x, args.batch_size, args.repeats)
    if args.tflite:  # timed apart: the TFLite thread pool would compete with TensorFlow's
        x = x[:max(len(x) - len(x) % args.batch_size, args.batch_size)]  # fixed batch size
        lite = {"original TFLite": tflite_runner(net, args.batch_size),
                "shrunk TFLite": tflite_runner(shrunk, args.batch_size)}
        diffs["shrunk TFLite"] = float(np.max(np.abs(
            lite["shrunk TFLite"](check[:args.batch_size]) - reference[:args.batch_size])))
        rates.update(interleaved_rates(lite, x, args.batch_size, args.repeats))
        del lite

    print(f"model: {source}")
    print(f"device: {'GPU' if tf.config.list_physical_devices('GPU') else 'CPU'}, "
          f"{args.images} images, batch {args.batch_size}, best of {args.repeats}"
          f"{', XLA' if args.jit else ''}")
    print(f"conv_3: {int(np.sum(mask == 0))}/60 channels pruned (lowest mean activation on "
          f"{ranked_on})")
    print(report)
    print("max |difference| vs masked: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    print(f"{'model':<18} {'parameters':>12} {'images/s':>10} {'vs masked':>10} {'vs original':>12}")
    params = {"original": count_params(net), "masked": count_params(masked), "folded": count_params(folded),
              "shrunk": count_params(shrunk), "shrunk SavedModel": count_params(shrunk),
              "SavedModel function": count_params(shrunk),
              "original TFLite": count_params(net), "shrunk TFLite": count_params(shrunk)}
    for name, rate in rates.items():
        print(f"{name:<18} {params[name]:>12,} {rate:>10,.0f} {rate / rates['masked']:>9.2f}x "
              f"{rate / rates['original']:>11.2f}x")
    if args.breakdown:
        times = stage_breakdown({"original": net, "shrunk": shrunk}, x, args.batch_size, args.repeats)
        print(f"\nms per batch of {args.batch_size}, network cut after each stage (cumulative)")
        print(f"{'after':<14} {'original':>9} {'shrunk':>9} {'saved':>7}")
        for stage in STAGES:
            o, s_ = times["original"][stage], times["shrunk"][stage]
            print(f"{stage:<14} {o:>9.2f} {s_:>9.2f} {o - s_:>7.2f}")
    if args.conv_widths:
        widths = conv_width_times(args.conv_widths, args.batch_size, args.repeats)
        print(f"\nconv_3 alone (bias, ReLU, 2x2 pooling), ms per batch of {args.batch_size}")
        for width, ms in widths.items():
            print(f"{width:>4} output channels {ms:>7.2f}")


if __name__ == "__main__":
    main()

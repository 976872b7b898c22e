"""``tf-backdoor-defense``: the pruning defense as a command (also ``python -m tf_backdoor_defense``).

Subcommands: ``inspect``, ``evaluate``, ``prune``, ``fine-prune``, ``defend``,
``export``, ``repair`` and ``demo``; ``tf-backdoor-defense COMMAND --help``
shows each one's options and examples.

Exit codes: 0 success; 2 bad input: a usage error, or an input error the
library raises as such (:class:`~tf_backdoor_defense.InputError` and
:class:`~tf_backdoor_defense.InputTypeError`: unreadable or invalid data or
model files, a refused untrusted model, existing outputs without
``--force``, a bad value); 3 ``defend --fail-if-active`` found the backdoor
still active on the poisoned validation data (the outputs are written all
the same); 1 anything else, which is a bug: one short line says so, and
``--debug`` shows the traceback; 130 interrupted, 143 terminated (SIGTERM).

Outputs are written whole or not at all: a folder is built in a hidden
sibling and swapped in at the end, a file is written to a hidden temporary
name and renamed; an interrupted command leaves neither. Each output carries
a mark (a ``.tf-backdoor-defense-output`` file in a folder, an attribute or
member of a model file); ``--force`` replaces only a marked output, and a
wrong kind of path (a file where a folder goes, the current folder) is
refused before any work starts. Models are written plain (masks folded into
the weights, loadable without this package) unless ``--keep-wrappers``; a
Keras 3 MODEL gives Keras 3 ``.keras`` files.
Results go to stdout (``--json`` for machine-readable output); progress bars,
notes, warnings and the library's progress lines go to stderr; the bars
switch themselves off when stderr is not a terminal, and ``--quiet`` leaves
only warnings and errors.

The command owns the console only while ``main()`` runs
(:func:`tf_backdoor_defense.cli._console.session`): it imports TensorFlow
lazily (``--help`` does not load it), hides TensorFlow's native start-up
lines unless ``--debug``, and puts the warning filters, loggers and stderr
back when it returns.
"""

import argparse
import contextlib
import os
import pathlib
import signal
import sys
import textwrap
import threading
import traceback
import warnings

from tf_backdoor_defense._errors import INPUT_ERRORS, InputError, OutputExistsError
from tf_backdoor_defense.cli._console import Console, progress_data, session

__all__ = ["main", "build_parser"]

PROG = "tf-backdoor-defense"

# The methods of tf_backdoor_defense.defenses._defend.METHODS, in the same order (a test
# checks they agree): the parser is built without importing TensorFlow.
DEFENSE_METHODS = ("unlearn", "ibau", "reinit-head", "prune-search", "clp", "ft-sam", "anp",
                   "ft-cosine", "fine-pruning")
# tf_backdoor_defense.defenses._defend.DEFAULT_METHODS and TARGETED_METHODS (the same test
# checks them)
DEFAULT_DEFENSE_METHODS = ("unlearn", "ibau", "clp")
TARGETED_DEFENSE_METHODS = ("ibau", "unlearn", "clp")
# tf_backdoor_defense.defenses._defend.INTERPOLATE (the same test checks it)
DEFENSE_INTERPOLATE = (0.8,)
# tf_backdoor_defense.defenses._defend.IBAU_RADIUS (the same test checks it)
DEFENSE_IBAU_RADIUS = 3.0
# When defend() uses TARGETED_DEFENSE_METHODS by default.
_TARGETED_WHEN = "the scan names an all-to-one target or an all-to-all class map"

_EPILOG = textwrap.dedent(f"""\
    examples:
      {PROG} demo --output demo_report
      {PROG} inspect bd_net.h5
      {PROG} evaluate bd_net.h5 --clean cl/valid.h5 --poisoned bd/bd_valid.h5
      {PROG} prune bd_net.h5 --clean cl/valid.h5 --poisoned bd/bd_valid.h5 \\
          --layer conv_3 --thresholds 0.02 0.04 0.10 --keep-wrappers --output report/
      {PROG} defend bd_net.h5 --clean cl/valid.h5 --poisoned bd/bd_valid.h5 \\
          --max-accuracy-drop 0.01 --output defended/ --fail-if-active
      {PROG} repair bd_net.h5 --pruned report/models/pruned_drop_0.04.h5 --output goodnet.h5
      {PROG} export report/models/pruned_drop_0.04.h5 --output served/ --shrink

    Models from people you do not trust are scanned before loading: Lambda layers and
    classes outside tf-keras and this package are refused (--trust-model-code allows them).

    exit codes: 0 success, 2 bad input or existing outputs without --force, 3 defend
    --fail-if-active: backdoor still active on the poisoned validation data, 1 an internal
    error (a bug; --debug shows the traceback).
    """)


def _progress_data(data, args, console, labels):
    """Arrays as they are, or (on a terminal) a stream of batches with a progress bar."""
    return progress_data(data, args.batch_size, console, labels)


def _emit(args, result, text):
    """Print the result: JSON with ``--json``, else ``text``."""
    from tf_backdoor_defense.io._data import to_json

    if args.json:
        sys.stdout.write(to_json(result))
    elif text:
        print(text)
    sys.stdout.flush()


def _fmt(value):
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _escape(text):
    """``text`` safe for the terminal (control characters escaped); see io._formats.escape."""
    from tf_backdoor_defense.io._formats import escape  # the io package loads TensorFlow

    return escape(text, limit=None)


# -- loading inputs ----------------------------------------------------------------------
def _load_model(args, path=None, *, as_tf_keras=False):
    """MODEL (with --weights), or another model file such as --pruned, checked for use.

    With ``as_tf_keras`` (the commands that write models) a Keras 3 model is
    converted to tf-keras, the command computes in tf-keras, and
    :func:`_write_model` converts what it writes back to Keras 3
    (``args.keras3_input`` remembers it).
    """
    from tf_backdoor_defense.io._loading import load_model
    from tf_backdoor_defense.keras3 import is_keras3_model
    from tf_backdoor_defense._validation import check_model

    objects = getattr(args, "custom_objects_loaded", None)  # imported by _run
    if path is None:
        model = load_model(args.model, trust_model_code=args.trust_model_code, weights=args.weights,
                           custom_objects=objects)
    else:
        model = load_model(path, trust_model_code=args.trust_model_code, custom_objects=objects)
    model = check_model(model)
    if as_tf_keras and is_keras3_model(model):
        from tf_backdoor_defense.keras3 import to_tf_keras

        args.keras3_input = True
        model = to_tf_keras(model)
    return model


def _custom_objects(modules, imported):
    """The classes and functions that the ``--custom-objects`` modules define, by name.

    Each module is a ``.py`` file or an importable module name; importing it
    runs its code (the user's own). None when no module is given. The names
    under which ``.py`` files were put in ``sys.modules`` are appended to
    ``imported`` (the caller removes them when the command ends).
    """
    if not modules:
        return None
    import importlib
    import importlib.util
    import inspect

    objects = {}
    for number, spec in enumerate(modules):
        try:
            if spec.endswith(".py") or os.sep in spec:
                if not os.path.isfile(spec):
                    raise InputError(f"--custom-objects: no Python file '{_escape(spec)}'.")
                name = f"_tf_backdoor_defense_custom_objects_{number}"
                found = importlib.util.spec_from_file_location(name, spec)
                if found is None:
                    raise InputError(f"--custom-objects: '{_escape(spec)}' is not a Python "
                                     "file (.py).")
                module = importlib.util.module_from_spec(found)
                sys.modules[name] = module  # classes defined there can find their module
                imported.append(name)
                found.loader.exec_module(module)
            else:
                module = importlib.import_module(spec)
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's module failed: one clear line
            raise InputError(f"--custom-objects: importing '{_escape(spec)}' failed: "
                             f"{type(error).__name__}: {_escape(str(error))}") from error
        own = {key: value for key, value in vars(module).items()
               if not key.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
               and getattr(value, "__module__", None) == module.__name__}
        if not own:
            raise InputError(f"--custom-objects: '{_escape(spec)}' defines no class or function.")
        objects.update(own)
    from tf_backdoor_defense._keras import keras

    # A class registered with keras.utils.register_keras_serializable is saved by that name.
    objects.update({keras.utils.get_registered_name(value): value
                    for value in list(objects.values())})
    return objects


def _load_data(args, path, model, num_classes=None):
    from tf_backdoor_defense.io._data import DataFileError, load_data
    from tf_backdoor_defense._validation import check_data

    x, y = load_data(path, scale=args.scale, input_shape=tuple(model.inputs[0].shape[1:]))
    try:
        data = check_data((x, y), str(path), model=model, num_classes=num_classes)
    except INPUT_ERRORS as error:
        raise DataFileError(f"{path}: {error}") from None
    return data.x, data.y


def _target(args, num_classes):
    """The ``target=`` argument of the metrics from --target/--all-to-all/--untargeted."""
    if args.untargeted:
        return "untargeted"
    if args.target is not None:
        return args.target
    if args.all_to_all is not None:
        import numpy as np

        text = args.all_to_all.strip()
        try:
            if "," in text:
                mapping = np.array([int(v) for v in text.split(",")])
            else:
                mapping = (np.arange(num_classes) + int(text)) % num_classes
        except ValueError:
            raise InputError(f"--all-to-all must be a shift (e.g. 1) or a comma-separated list of "
                             f"{num_classes} classes. Got {args.all_to_all!r}.") from None
        return mapping
    return None


def _poisoned_note(args):
    if args.untargeted:
        return "untargeted (any wrong class counts)"
    if args.target is not None:
        return f"all-to-one, target class {args.target}"
    if args.all_to_all is not None:
        return f"all-to-all ({args.all_to_all})"
    return "labels are the attacker's targets"


# -- subcommands ------------------------------------------------------------------------------
def cmd_inspect(args, console):
    from tf_backdoor_defense.graph._analysis import convs_read_by_dense
    from tf_backdoor_defense.masks._registry import is_prunable
    from tf_backdoor_defense.masks._wrapper import PruneByActivation, channel_count, last_conv_layer
    from tf_backdoor_defense.scoring._activations import resolve_layer
    from tf_backdoor_defense._validation import num_classes_of

    model = _load_model(args)
    layers = []
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, PruneByActivation) else layer
        try:
            resolve_layer(model, layer.name)
            prunable = True
        except (ValueError, TypeError):
            prunable = False
        channels = channel_count(inner) if is_prunable(inner) else None
        try:
            shape = layer.output_shape
        except AttributeError:
            shape = None
        if isinstance(shape, list) and len(shape) == 1:
            shape = shape[0]
        shape = None if shape is None else tuple(shape)
        layers.append({
            "name": layer.name, "class": type(inner).__name__, "output_shape": shape,
            "params": int(layer.count_params()), "channels": channels, "prunable": prunable,
            "pruned": (int(layer.pruned_channels.size) if isinstance(layer, PruneByActivation)
                       else None),
        })
    try:
        default = last_conv_layer(model)
    except ValueError:
        default = None
    feeders = convs_read_by_dense(model, [row["name"] for row in layers if row["prunable"]])
    result = {"model": str(args.model), "name": model.name,
              "input_shape": list(model.inputs[0].shape[1:]), "classes": num_classes_of(model),
              "params": int(model.count_params()), "default_layer": default,
              "convs_read_by_dense": feeders, "layers": layers}
    lines = [f"model {model.name!r} from {args.model}",
             f"input shape {tuple(model.inputs[0].shape[1:])}, {result['classes']} classes, "
             f"{result['params']:,} parameters",
             f"default layer to prune: {default}"]
    if len(feeders) > 1:
        lines.append(f"conv layers read directly by a dense layer: {', '.join(feeders)} "
                     "(choose with --layer; several are pruned together)")
    lines += ["",
             f"{'layer':<24}{'class':<20}{'output shape':<24}{'channels':>9}  prunable"]
    for row in layers:
        channels = "" if row["channels"] is None else str(row["channels"])
        if row["pruned"] is not None:
            channels += f" ({row['pruned']} pruned)"
        lines.append(f"{row['name']:<24}{row['class']:<20}{str(row['output_shape']):<24}"
                     f"{channels:>9}  {'yes' if row['prunable'] else ''}")
    _emit(args, result, "\n".join(lines))
    return 0


def cmd_evaluate(args, console):
    from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
    from tf_backdoor_defense.defenses._repair import evaluate_repaired
    from tf_backdoor_defense._validation import num_classes_of

    model = _load_model(args)
    classes = num_classes_of(model) - (1 if args.repaired else 0)
    clean = _load_data(args, args.clean, model, classes)
    poisoned = _load_data(args, args.poisoned, model, classes) if args.poisoned else None
    target = _target(args, classes)
    result = {"model": str(args.model), "clean_data": str(args.clean), "clean_examples": len(clean[1])}
    with console.step("evaluating"):
        if args.repaired:
            if poisoned is None:
                raise InputError("--repaired needs --poisoned data.")
            scores = evaluate_repaired(model, clean, poisoned, target=target,
                                       batch_size=args.batch_size)
            result.update(scores.as_dict())
        else:
            result["clean_accuracy"] = clean_accuracy(model, clean, batch_size=args.batch_size)
            result["attack_success_rate"] = None
            if poisoned is not None:
                result["attack_success_rate"] = attack_success_rate(
                    model, poisoned, target=target, batch_size=args.batch_size)
    if poisoned is not None:
        result["poisoned_data"] = str(args.poisoned)
        result["poisoned_examples"] = len(poisoned[1])
        result["attack"] = _poisoned_note(args)
    text = [f"clean accuracy      {_fmt(result['clean_accuracy'])}  ({len(clean[1])} inputs)"]
    if poisoned is not None:
        text.append(f"attack success rate {_fmt(result['attack_success_rate'])}  "
                    f"({len(poisoned[1])} inputs; {_poisoned_note(args)})")
    if args.repaired:
        text.append(f"flagged as backdoor {result['clean_flagged']:.4f} clean, "
                    f"{result['poisoned_flagged']:.4f} poisoned")
    _emit(args, result, "\n".join(text))
    return 0


def _threshold_name(threshold):
    return f"drop_{threshold:g}"


# -- writing outputs -------------------------------------------------------------------------
# Folders are built aside and swapped in whole (io._data.output_directory), single files are
# written to a temporary sibling and renamed (io._data.output_file); both carry the output
# mark, and --force replaces only a marked output. The checks run before any work starts.
def _model_name(args, stem):
    """File name of a model the command names itself: .keras for a Keras 3 MODEL, else .h5."""
    return stem + (".keras" if getattr(args, "keras3_input", False) else ".h5")


def _write_model(model, path, args, *, keep_wrappers=False):
    """Save ``model`` at ``path`` (a staging or temporary path) in the form the command promises.

    Plain by default: the PruneByActivation masks are folded into the
    weights (``strip_masks``), so the file loads with plain Keras without
    this package. ``keep_wrappers`` keeps the wrapped model, for further
    fine-pruning. For a Keras 3 MODEL the model is converted back to Keras 3.
    """
    from tf_backdoor_defense.export._export import strip_masks
    from tf_backdoor_defense.masks._wrapper import masked_layers

    if not keep_wrappers and masked_layers(model):
        model = strip_masks(model)
    if getattr(args, "keras3_input", False):
        from tf_backdoor_defense.keras3 import to_keras3

        model = to_keras3(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path))
    return path


def _staged(staging, out, path):
    """Where ``path`` (under ``out``) is written inside the staging folder."""
    return staging / pathlib.Path(path).relative_to(out)


def cmd_prune(args, console):
    from tf_backdoor_defense.scoring._activations import mean_channel_activations
    from tf_backdoor_defense.export._export import export_saved_model
    from tf_backdoor_defense.io._data import check_output_dir, output_directory
    from tf_backdoor_defense.report._report import write_sweep_report
    from tf_backdoor_defense.pruning._sweep import prune_to_threshold
    from tf_backdoor_defense._validation import num_classes_of

    out = pathlib.Path(args.output)
    thresholds = list(dict.fromkeys(args.thresholds))
    check_output_dir(out, overwrite=args.force)  # before any work: the report replaces it whole

    model = _load_model(args, as_tf_keras=True)
    model_paths = {t: out / "models" / _model_name(args, f"pruned_{_threshold_name(t)}")
                   for t in thresholds}
    export_paths = {t: out / "saved_models" / _threshold_name(t) for t in thresholds}
    classes = num_classes_of(model)
    clean = _load_data(args, args.clean, model)
    poisoned = _load_data(args, args.poisoned, model) if args.poisoned else None
    ranking = _load_data(args, args.ranking_data, model) if args.ranking_data else None
    target = _target(args, classes) if poisoned is not None else None
    if poisoned is None and (args.target is not None or args.all_to_all or args.untargeted):
        raise InputError("--target, --all-to-all and --untargeted need --poisoned data.")

    # Without --ranking-data one pass gives the statistics and the sweep's inputs (a second
    # pass, beyond the sweep's memory budget, is the sweep's).
    clean_labels = (["statistics and sweep (clean)", "sweep (clean)"] if ranking is None
                    else ["sweep (clean)"])
    result = prune_to_threshold(
        model, _progress_data(clean, args, console, clean_labels),
        layers=args.layer, max_accuracy_drop=thresholds, steps=args.steps,
        poisoned_validation_data=(None if poisoned is None else
                       _progress_data(poisoned, args, console, ["sweep (poisoned)"])),
        target=target, stopping_rule=args.stopping_rule,
        ranking_data=(None if ranking is None else
                      _progress_data(ranking, args, console, ["statistics"])),
        batch_size=args.batch_size)
    poisoned_means = None
    if poisoned is not None and not args.no_plots:
        poisoned_means = {name: mean_channel_activations(
            model, _progress_data(poisoned, args, console, ["statistics (poisoned)"]),
            layers=name, batch_size=args.batch_size) for name in result.layers}
    extra = {"inputs": {"model": str(args.model), "clean_data": str(args.clean),
                        "poisoned_data": None if poisoned is None else str(args.poisoned),
                        "ranking_data": None if ranking is None else str(args.ranking_data),
                        "scale": args.scale, "attack": _poisoned_note(args) if poisoned else None},
             "models": {f"{t:g}": str(p) for t, p in model_paths.items()}}
    if args.export:
        extra["saved_models"] = {f"{t:g}": str(p) for t, p in export_paths.items()}
    with output_directory(out, overwrite=args.force) as staging:  # written whole or not at all
        written = write_sweep_report(result, staging, poisoned_means=poisoned_means,
                                     extra=extra, plots=not args.no_plots, overwrite=True)
        for t, path in model_paths.items():
            _staged(staging, out, path).parent.mkdir(parents=True, exist_ok=True)
            _write_model(result.models[t], _staged(staging, out, path), args,
                         keep_wrappers=args.keep_wrappers)
        if args.export:
            for t, path in export_paths.items():
                with console.step(f"exporting {path}"):
                    export_saved_model(result.models[t], _staged(staging, out, path),
                                       shrink=args.shrink, overwrite=True)
    written = {key: out / pathlib.Path(p).relative_to(staging) for key, p in written.items()}
    summary = result.summary()
    rows = summary.astype(object).where(summary.notna(), None).to_dict(orient="records")
    first = result.history.iloc[0]
    payload = {"output": str(out), "layers": list(result.layers), "channels": dict(result.channels),
               "before": {"clean_accuracy": float(first["clean_accuracy"]),
                          "attack_success_rate": (None if first.isna()["attack_success_rate"]
                                                  else float(first["attack_success_rate"]))},
               "thresholds": rows, "files": sorted(str(p) for p in written.values())}
    described = ", ".join(f"{name!r} ({count} channels)" for name, count in result.channels.items())
    text = [f"layer{'s' if len(result.layers) > 1 else ''} {described}; before pruning: clean accuracy "
            f"{_fmt(payload['before']['clean_accuracy'])}, ASR "
            f"{_fmt(payload['before']['attack_success_rate'])}", "",
            summary.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="n/a"), "",
            f"report written to {out}/ ({', '.join(sorted(written))}, models/"
            + (", saved_models/" if args.export else "") + ")"]
    _emit(args, payload, "\n".join(text))
    return 0


def cmd_fine_prune(args, console):
    from tf_backdoor_defense.cli._fit_progress import EpochProgress as _EpochProgress
    from tf_backdoor_defense.finetune._fine_prune import fine_prune
    from tf_backdoor_defense.io._data import check_output_dir, output_directory, write_json
    from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
    from tf_backdoor_defense.report._report import package_versions, plot_sweep, sweep_csv
    from tf_backdoor_defense._validation import num_classes_of

    out = pathlib.Path(args.output)
    check_output_dir(out, overwrite=args.force)  # before any work: the folder is replaced whole
    model = _load_model(args, as_tf_keras=True)
    model_path = out / _model_name(args, "fine_pruned")
    classes = num_classes_of(model)
    train = _load_data(args, args.train, model)
    clean = _load_data(args, args.clean, model)
    poisoned = _load_data(args, args.poisoned, model) if args.poisoned else None
    target = _target(args, classes) if poisoned is not None else None
    before = {"clean_accuracy": clean_accuracy(model, clean),
              "attack_success_rate": (attack_success_rate(model, poisoned, target=target)
                                      if poisoned is not None else None)}
    with console.bar("fine-pruning (epochs)", args.epochs) as bar:
        fine = fine_prune(model, train, clean, layer=args.layer,
                          max_accuracy_drop=args.threshold, epochs=args.epochs,
                          batch_size=args.train_batch_size, poisoned_data=poisoned, target=target,
                          stopping_rule=args.stopping_rule, seed=args.seed,
                          callbacks=[_EpochProgress(bar)] if console.bars else None)
    after = {"clean_accuracy": clean_accuracy(fine.model, clean),
             "attack_success_rate": (attack_success_rate(fine.model, poisoned, target=target)
                                     if poisoned is not None else None)}
    payload = {"output": str(out), "layer": fine.layer, "channels_pruned": fine.channels_pruned,
               "epochs": args.epochs, "before": before, "after": after,
               "model": str(model_path), "versions": package_versions(),
               "inputs": {"model": str(args.model), "train_data": str(args.train),
                          "clean_data": str(args.clean),
                          "poisoned_data": str(args.poisoned) if poisoned is not None else None}}
    with output_directory(out, overwrite=args.force) as staging:  # written whole or not at all
        fine.history.to_csv(staging / "history.csv", index=False, lineterminator="\n")
        if fine.sweep_result is not None:
            (staging / "sweep.csv").write_text(sweep_csv(fine.sweep_result), encoding="utf-8")
            if not args.no_plots:
                plot_sweep(fine.sweep_result, staging / "sweep.png")
        _write_model(fine.model, _staged(staging, out, model_path), args,
                     keep_wrappers=args.keep_wrappers)
        write_json(staging / "summary.json", payload)
    text = [f"fine-pruned layer {fine.layer!r}: {fine.channels_pruned} channels pruned, "
            f"{args.epochs} epochs of fine-tuning",
            f"before: clean accuracy {_fmt(before['clean_accuracy'])}, ASR "
            f"{_fmt(before['attack_success_rate'])}",
            f"after:  clean accuracy {_fmt(after['clean_accuracy'])}, ASR "
            f"{_fmt(after['attack_success_rate'])}",
            f"model written to {model_path}"]
    _emit(args, payload, "\n".join(text))
    return 0


#: What ``defend`` writes (``repaired.keras`` instead of ``repaired.h5`` for a Keras 3 MODEL).
DEFENSE_FILES = ("repaired.h5", "defense.json")


def _defense_table(rows):
    """The ``defend`` table as text: one line per method tried."""
    header = (f"{'method':<14}{'val accuracy':>13}{'drop':>9}{'val ASR':>9}{'within budget':>15}"
              f"{'seconds':>9}{'chosen':>8}  note")
    lines = [header]
    for row in rows:
        lines.append(f"{row['method']:<14}{_fmt(row['validation_accuracy']):>13}"
                     f"{row['accuracy_drop']:>+9.4f}{_fmt(row['validation_asr']):>9}"
                     f"{'yes' if row['within_budget'] else 'no':>15}{row['seconds']:>9.1f}"
                     f"{'*' if row['chosen'] else '':>8}  {row['note'] or ''}".rstrip())
    return "\n".join(lines)


def cmd_defend(args, console):
    from tf_backdoor_defense.defenses._defend import BackdoorStillActiveWarning, defend
    from tf_backdoor_defense.io._data import check_output_dir, output_directory, write_json
    from tf_backdoor_defense.report._report import package_versions
    from tf_backdoor_defense._validation import num_classes_of

    out = pathlib.Path(args.output)
    attack_given = args.target is not None or args.all_to_all is not None or args.untargeted
    if args.poisoned is None and attack_given:
        raise InputError("--target, --all-to-all and --untargeted need --poisoned validation data.")
    check_output_dir(out, overwrite=args.force)  # before any work: the folder is replaced whole

    model = _load_model(args, as_tf_keras=True)
    model_path = out / _model_name(args, pathlib.Path(DEFENSE_FILES[0]).stem)
    json_path = out / DEFENSE_FILES[1]
    classes = num_classes_of(model)
    clean = _load_data(args, args.clean, model)
    validation = _load_data(args, args.validation, model) if args.validation else None
    poisoned = _load_data(args, args.poisoned, model) if args.poisoned else None
    target = _target(args, classes) if poisoned is not None else None
    methods = None if args.methods is None else list(dict.fromkeys(args.methods))
    shown = (", ".join(methods) if methods is not None else
             f"{', '.join(TARGETED_DEFENSE_METHODS)} when {_TARGETED_WHEN}, else "
             f"{', '.join(DEFAULT_DEFENSE_METHODS)}")
    console.note(f"defend: {'' if args.no_scan else 'scanning, then '}trying {shown} "
                 f"on {len(clean[1])} clean examples"
                 + (f", validating on {len(validation[1])}" if validation is not None else
                    f" ({args.validation_split:g} held out for validation)")
                 + (f" and {len(poisoned[1])} poisoned" if poisoned is not None else ""))
    # defend() logs one line per method (the session shows them on stderr); its
    # backdoor warning is shown below, from the result's fields
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BackdoorStillActiveWarning)
        result = defend(model, clean, validation_data=validation,
                        validation_split=args.validation_split,
                        max_accuracy_drop=args.max_accuracy_drop,
                        poisoned_validation_data=poisoned, target=target, methods=methods,
                        scan=not args.no_scan, repair_if_clean=args.repair_if_clean,
                        try_all=args.try_all, interpolate=tuple(args.interpolate),
                        budget_confidence=args.budget_confidence, time_budget=args.time_budget,
                        epochs=args.epochs, learning_rate=list(args.learning_rate),
                        batch_size=args.batch_size, asr_tolerance=args.asr_tolerance,
                        ibau_radius=args.ibau_radius, seed=args.seed, verbose=0 if args.quiet else 1)
    for warning in caught:  # anything else the methods warned about, shown as usual
        if not issubclass(warning.category, BackdoorStillActiveWarning):
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
    active = bool(result.backdoor_still_active)
    payload = result.summary()
    payload.update({
        "backdoor_still_active": active, "output": str(out), "model": str(model_path),
        "files": [str(model_path), str(json_path)], "versions": package_versions(),
        "inputs": {"model": str(args.model), "clean_data": str(args.clean),
                   "validation_data": str(args.validation) if validation is not None else None,
                   "poisoned_data": str(args.poisoned) if poisoned is not None else None,
                   "scale": args.scale, "attack": _poisoned_note(args) if poisoned else None}})
    with output_directory(out, overwrite=args.force) as staging:  # written whole or not at all
        _write_model(result.model, _staged(staging, out, model_path), args,
                     keep_wrappers=args.keep_wrappers)
        write_json(_staged(staging, out, json_path), payload)
    if active:  # shown even with --quiet: exit code 0 must not hide it
        print(f"{PROG} defend: warning: {result.warnings[0] if result.warnings else 'backdoor still active'}"
              + ("" if args.fail_if_active else "; --fail-if-active makes this exit code 3"),
              file=sys.stderr, flush=True)
    base = result.baseline
    lines = [f"verdict: {result.verdict}",
             f"model as received: validation accuracy {_fmt(base['validation_accuracy'])}, "
             f"validation ASR {_fmt(base['validation_asr'])}, reversed-trigger residual "
             f"{_fmt(base.get('residual_trigger_rate'))}", "",
             _defense_table(payload["methods"]), "",
             f"chosen: {result.method or 'none (the model as received)'}; "
             f"written to {model_path} and {json_path}"]
    if result.warnings:
        lines += ["", "warnings:"] + [f"  - {text}" for text in result.warnings]
    _emit(args, payload, "\n".join(lines))
    return 3 if active and args.fail_if_active else 0


def cmd_export(args, console):
    from tf_backdoor_defense.export._export import count_params, export_keras, export_saved_model, strip_masks
    from tf_backdoor_defense.io._data import (check_output_dir, check_output_file,
                                              output_directory, output_file)
    from tf_backdoor_defense.masks._wrapper import masked_layers

    target = pathlib.Path(args.output)
    fmt = args.format
    if fmt == "auto":
        fmt = {".h5": "h5", ".keras": "keras"}.get(target.suffix.lower(), "saved_model")
    if fmt in ("h5", "keras") and target.suffix.lower() != f".{fmt}":
        raise InputError(f"--format {fmt} needs an output path ending in .{fmt}. "
                         f"Got '{_escape(target)}'.")
    written = target / str(args.version) if (fmt == "saved_model" and args.version) else target
    if fmt == "saved_model":  # before any work
        check_output_dir(written, overwrite=args.force)
    else:
        check_output_file(written, overwrite=args.force)
    model = _load_model(args, as_tf_keras=True)
    if args.shrink and not masked_layers(model):
        print(f"{PROG} export: warning: {_escape(args.model)} has no PruneByActivation layers, so "
              "--shrink has no channels to remove (prune with --keep-wrappers to keep them)",
              file=sys.stderr, flush=True)
    stripped = strip_masks(model, shrink=args.shrink)
    with console.step(f"exporting {written}"):
        if fmt == "saved_model":
            with output_directory(written, overwrite=args.force) as staging:
                inner = export_saved_model(model, staging / "saved_model.tmp", shrink=args.shrink)
                for entry in inner.iterdir():
                    os.replace(entry, staging / entry.name)
                inner.rmdir()
        else:
            with output_file(written, overwrite=args.force) as temp:
                if getattr(args, "keras3_input", False):  # written by Keras 3
                    _write_model(stripped, temp, args)
                else:
                    export_keras(model, temp, shrink=args.shrink, overwrite=True)
    payload = {"model": str(args.model), "output": str(written), "format": fmt,
               "shrink": bool(args.shrink), "params_before": int(model.count_params()),
               "params_after": int(count_params(stripped))}
    _emit(args, payload, f"exported {args.model} to {written} ({fmt}"
          + (", pruned channels removed" if args.shrink else "") + ")")
    return 0


def cmd_repair(args, console):
    from tf_backdoor_defense.io._data import check_output_file, output_file
    from tf_backdoor_defense.defenses._repair import evaluate_repaired, repaired_model
    from tf_backdoor_defense.pruning._sweep import prune_to_threshold
    from tf_backdoor_defense._validation import num_classes_of

    out = pathlib.Path(args.output)
    if out.suffix.lower() not in (".h5", ".keras"):
        raise InputError(f"--output must end with .h5 or .keras. Got '{_escape(out)}'.")
    check_output_file(out, overwrite=args.force)  # before any work

    model = _load_model(args, as_tf_keras=True)
    classes = num_classes_of(model)
    clean = _load_data(args, args.clean, model) if args.clean else None
    poisoned = _load_data(args, args.poisoned, model) if args.poisoned else None
    target = _target(args, classes) if poisoned is not None else None
    payload = {"model": str(args.model), "output": str(out)}
    if args.pruned:
        pruned = _load_model(args, path=args.pruned, as_tf_keras=True)
        payload["pruned"] = str(args.pruned)
    else:
        if clean is None:
            raise InputError("repair needs --pruned PRUNED_MODEL, or --clean DATA to prune first.")
        result = prune_to_threshold(model, _progress_data(
                                        clean, args, console,
                                        ["statistics and sweep (clean)", "sweep (clean)"]),
                                    layers=args.layer, max_accuracy_drop=args.threshold,
                                    stopping_rule=args.stopping_rule, batch_size=args.batch_size)
        pruned = result.model
        level = result.levels[args.threshold]
        payload.update({"layer": result.layers[0],
                        "channels_pruned": int(result.history["channels_pruned"].iloc[level]),
                        "max_accuracy_drop": args.threshold})
    repaired = repaired_model(model, pruned)
    with output_file(out, overwrite=args.force) as temp:
        _write_model(repaired, temp, args)
    text = [f"repaired network ({classes} + 1 outputs; class {classes} = backdoor suspected) "
            f"written to {out}"]
    if "channels_pruned" in payload:
        text.insert(0, f"pruned {payload['channels_pruned']} channels of layer {payload['layer']!r} "
                       f"(max accuracy drop {args.threshold:g})")
    if clean is not None and poisoned is not None:
        scores = evaluate_repaired(repaired, clean, poisoned, target=target,
                                   batch_size=args.batch_size)
        payload["scores"] = scores.as_dict()
        text.append(f"clean accuracy {_fmt(scores.clean_accuracy)}, ASR "
                    f"{_fmt(scores.attack_success_rate)}, poisoned inputs flagged "
                    f"{_fmt(scores.poisoned_flagged)}, clean inputs flagged "
                    f"{_fmt(scores.clean_flagged)}")
    _emit(args, payload, "\n".join(text))
    return 0


def cmd_demo(args, console):
    from tf_backdoor_defense.experiments._demo import demo_report, run_demo
    from tf_backdoor_defense.io._data import check_output_dir, output_directory
    from tf_backdoor_defense.report._report import write_sweep_report

    out = pathlib.Path(args.output) if args.output else None
    if out is not None:
        check_output_dir(out, overwrite=args.force)  # before any work: replaced whole
    verbose = not (args.json or args.quiet)
    demo = run_demo(epochs=args.epochs, seed=args.seed)
    if verbose:
        _emit(args, None, demo_report(demo))
    evaluation = demo["evaluation"]
    result = demo["result"]
    payload = {"evaluation": evaluation.to_dict(orient="records"),
               "levels": {f"{t:g}": int(k) for t, k in result.levels.items()},
               "seconds": demo["seconds"]}
    if out is not None:
        with output_directory(out, overwrite=args.force) as staging:  # whole or not at all
            written = write_sweep_report(result, staging, evaluation=payload["evaluation"],
                                         extra={"demo": {"epochs": args.epochs,
                                                         "seed": args.seed}},
                                         overwrite=True)
            evaluation.to_csv(staging / "evaluation.csv", index=False, lineterminator="\n")
        payload["files"] = sorted(str(out / pathlib.Path(p).relative_to(staging))
                                  for p in written.values()) + [str(out / "evaluation.csv")]
        console.note(f"report written to {out}/")
    if args.json:
        payload["sweep"] = result.history.to_dict(orient="records")
        _emit(args, payload, None)
    elif args.quiet:
        _emit(args, payload, evaluation.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


# -- the parser ----------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and each option's default shown once.

    A default is added to an option's help only when there is one to show
    (not None, not an on/off flag) and the help does not state it already.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or "default" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


_MODEL_FILES = ("a .h5 or .keras file, a SavedModel folder, or a model.to_json() .json file "
                "with --weights")
_MODEL_HELP = "the model: " + _MODEL_FILES
_BATCH_HELP = "inputs per forward pass: memory against speed (the results do not depend on it)"


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") \
                from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _common(parser, model=True, data=False, attack=False, batch_size=256, batch_help=None):
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    out.add_argument("-q", "--quiet", action="store_true",
                     help="no progress bars, notes or progress lines on stderr (warnings and "
                          "errors still show)")
    out.add_argument("--debug", action="store_true",
                     help="show tracebacks, every warning, and TensorFlow's logs")
    if model:
        group = parser.add_argument_group("model")
        group.add_argument("--weights", metavar="FILE",
                           help="weights-only .h5 to load into MODEL's architecture "
                                "(MODEL may then be a model.to_json() file)")
        group.add_argument("--trust-model-code", action="store_true",
                           help="load models with Lambda layers or unknown classes (runs code "
                                "from the file: only for models from people you trust)")
        group.add_argument("--custom-objects", action="append", metavar="MODULE",
                           help="a .py file or module name defining your own Keras classes "
                                "the model uses (tf-keras files); it is imported, so its code "
                                "runs; the model's other classes are still checked. Repeatable")
    if data:
        group = parser.add_argument_group("data")
        group.add_argument("--scale", type=_positive(float), metavar="S",
                           help="divide inputs by S (255 for models trained on x/255)")
        group.add_argument("--batch-size", type=_positive(int), default=batch_size,
                           metavar="N", help=batch_help or _BATCH_HELP)
    if attack:
        group = parser.add_argument_group(
            "attack", "How to read the poisoned labels. Default: they are the attacker's targets "
                      "(the lab's bd_*.h5 files).")
        mode = group.add_mutually_exclusive_group()
        mode.add_argument("--target", type=int, metavar="N",
                          help="all-to-one attack: poisoned labels are true classes, target N")
        mode.add_argument("--all-to-all", metavar="SHIFT|MAP",
                          help="all-to-all attack: true class c goes to (c+SHIFT) mod N, or a "
                               "comma-separated list giving the target of each class")
        mode.add_argument("--untargeted", action="store_true",
                          help="any misclassified poisoned input counts as a success")


_FORCE_HELP = {"DIR": "replace an earlier output folder of this command (never a folder it did "
                      "not write)",
               "FILE": "replace an earlier output file of this command (never a file it did not "
                       "write)",
               "PATH": "replace an earlier output of this command (never one it did not write)"}


def _output_options(parser, kind, wrappers=False):
    """--force (and --keep-wrappers for the commands that write pruned models)."""
    parser.add_argument("--force", action="store_true", help=_FORCE_HELP[kind])
    if wrappers:
        parser.add_argument("--keep-wrappers", action="store_true",
                            help="write models with their PruneByActivation layers (to fine-prune "
                                 "or --shrink them later; they load only with this package) "
                                 "instead of plain models with the masks folded into the weights")


def _sweep_options(parser, multiple=True):
    group = parser.add_argument_group("pruning")
    if multiple:
        group.add_argument("--layer", nargs="+", metavar="LAYER",
                           help="Conv or Dense layer to prune (default: the last conv layer); "
                                "several are pruned together, the same fraction of each")
        group.add_argument("--steps", type=int, default=None, metavar="N",
                           help="with several --layer: levels after level 0 (default: the widest "
                                "layer's channel count)")
    else:
        group.add_argument("--layer", metavar="LAYER",
                           help="Conv or Dense layer to prune (default: the last conv layer)")
    if multiple:
        group.add_argument("--thresholds", type=_fraction, nargs="+", default=[0.02, 0.04, 0.10],
                           metavar="DROP",
                           help="allowed drops in clean accuracy (absolute, 0.04 = 4 points); one "
                                "model per value")
    else:
        group.add_argument("--threshold", type=_fraction, default=0.04, metavar="DROP",
                           help="allowed drop in clean accuracy (absolute)")
    group.add_argument("--stopping-rule", choices=["largest_within", "first_reaching"],
                       default="largest_within",
                       help="largest_within: the largest level within the drop; "
                            "first_reaching: the first level reaching it, the lab reports' rule")


def build_parser():
    """The ``argparse`` parser of ``tf-backdoor-defense``."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter, epilog=_EPILOG,
        description="Repair backdoored tf-keras networks by pruning channels (Fine-Pruning, "
                    "Liu et al. 2018). Data files: HDF5 with 'data'/'label' (channels-first or "
                    "last), .npz with 'x'/'y', or a folder (or glob) of images labelled "
                    "'name_label=N.png' or by class subfolders.")
    from tf_backdoor_defense import __version__  # the package's __init__ loads no TensorFlow

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def add(name, help_text, examples, func, notes=None):
        epilog = "examples:\n" + textwrap.indent(examples, "  ")
        if notes:
            epilog += "\n\n" + notes
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=_Formatter, epilog=epilog)
        sub.set_defaults(func=func)
        return sub

    sub = add("inspect", "List a model's layers, which can be pruned, its input shape and classes.",
              f"{PROG} inspect bd_net.h5\n{PROG} inspect bd_net.h5 --json", cmd_inspect)
    sub.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    _common(sub)

    sub = add("evaluate", "Clean accuracy and attack success rate of a model.",
              f"{PROG} evaluate bd_net.h5 --clean valid.h5 --poisoned bd_valid.h5\n"
              f"{PROG} evaluate net.h5 --clean test.npz --poisoned triggered.npz --target 0 "
              "--scale 255\n"
              f"{PROG} evaluate goodnet.h5 --repaired --clean valid.h5 --poisoned bd_valid.h5",
              cmd_evaluate)
    sub.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    sub.add_argument("--clean", required=True, metavar="DATA", help="clean labelled data")
    sub.add_argument("--poisoned", metavar="DATA", help="triggered data (for the ASR)")
    sub.add_argument("--repaired", action="store_true",
                     help="MODEL is a repaired N+1 network: its last class means 'backdoor "
                          "suspected' and counts as a defended poisoned input")
    _common(sub, data=True, attack=True)

    sub = add("prune", "The pruning sweep: accuracy and ASR at every level, a model per threshold.",
              f"{PROG} prune bd_net.h5 --clean valid.h5 --poisoned bd_valid.h5 --output report/\n"
              f"{PROG} prune net.h5 --clean valid.npz --ranking-data train_subset.npz \\\n"
              "    --thresholds 0.04 --layer conv_3 --export --shrink --output report/",
              cmd_prune)
    sub.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    sub.add_argument("--clean", required=True, metavar="DATA",
                     help="clean data: accuracy at each level and the thresholds")
    sub.add_argument("--poisoned", metavar="DATA", help="triggered data: ASR at each level")
    sub.add_argument("--ranking-data", metavar="DATA",
                     help="clean data for the activation ranking (default: --clean)")
    sub.add_argument("-o", "--output", required=True, metavar="DIR",
                     help="writes sweep.csv, summary.json, sweep.png, activations.png, "
                          "models/pruned_drop_<t>.h5 (.keras for a Keras 3 MODEL; and "
                          "saved_models/ with --export)")
    sub.add_argument("--export", action="store_true",
                     help="also export each pruned model as a SavedModel")
    sub.add_argument("--shrink", action="store_true",
                     help="with --export: remove pruned channels instead of zeroing them")
    sub.add_argument("--no-plots", action="store_true", help="skip sweep.png and activations.png")
    _output_options(sub, "DIR", wrappers=True)
    _sweep_options(sub)
    _common(sub, data=True, attack=True)

    sub = add("fine-prune", "Prune within an accuracy budget, then fine-tune on clean data.",
              f"{PROG} fine-prune bd_net.h5 --train clean_train.h5 --clean valid.h5 \\\n"
              "    --poisoned bd_valid.h5 --epochs 5 --output fineprune/", cmd_fine_prune)
    sub.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    sub.add_argument("--train", required=True, metavar="DATA", help="clean data to fine-tune on")
    sub.add_argument("--clean", required=True, metavar="DATA",
                     help="clean data for the ranking and the accuracy budget")
    sub.add_argument("--poisoned", metavar="DATA", help="triggered data (ASR before and after)")
    sub.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    sub.add_argument("--train-batch-size", type=_positive(int), default=64, metavar="N",
                     help="fine-tuning batch size")
    sub.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning's shuffling")
    sub.add_argument("-o", "--output", required=True, metavar="DIR",
                     help="writes fine_pruned.h5 (.keras for a Keras 3 MODEL), history.csv, "
                          "sweep.csv, sweep.png, summary.json")
    sub.add_argument("--no-plots", action="store_true", help="skip sweep.png")
    _output_options(sub, "DIR", wrappers=True)
    _sweep_options(sub, multiple=False)
    _common(sub, data=True, attack=True)

    sub = add("defend", "Scan for a backdoor without the trigger, repair, verify: within an accuracy budget.",
              f"{PROG} defend bd_net.h5 --clean clean.npz --output defended/\n"
              f"{PROG} defend net.h5 --clean train.npz --validation val.npz --scale 255 \\\n"
              "    --methods unlearn ibau reinit-head --time-budget 600 --output defended/\n"
              f"{PROG} defend bd_net.h5 --clean valid.h5 --poisoned bd_valid.h5 --fail-if-active \\\n"
              "    --json --output defended/ > defense_run.json",
              cmd_defend,
              notes="1. Scan: reverse-engineer a trigger per class and an untargeted one from "
                    "--clean (no trigger\n   needed). A model the scan finds clean is written "
                    "back unchanged (see --repair-if-clean).\n"
                    "2. Repair a copy of MODEL with each of --methods.\n"
                    "3. Judge each repair on the validation data (--validation, else a held-out "
                    "share of --clean):\n   the accuracy drop is paired against MODEL on the same "
                    "inputs, and its upper bound at\n   --budget-confidence must stay within "
                    "--max-accuracy-drop; the backdoor signal is the ASR on\n   --poisoned when "
                    "given, else the share of stamped inputs the reversed\n   triggers still "
                    "send to a suspected target (all-to-all: along the scan's class map).\n"
                    "   A repair within budget whose signal is at most --asr-tolerance is "
                    "scanned again; if the\n   scan still finds a backdoor the next method runs "
                    "('unlearn' first unlearns what the\n   rescan finds, up to 3 rounds; a rescan's "
                    "second tier names only the first\n   scan's targets). The "
                    "first such repair in --methods order that the\n   rescan finds clean wins, "
                    "else the first that clears the signal. When none clears it,\n   the lowest "
                    "signal within budget wins if it is at most half the signal of MODEL; "
                    "otherwise\n   MODEL is written back unchanged. Both with a warning. "
                    "When no repair is within the\n   budget, MODEL is written back unchanged "
                    "too.\n"
                    "   A repair over the budget is judged again with its weights 0.8 of the way "
                    "from MODEL's\n   to its own (--interpolate), as a candidate of its own "
                    "right after it.\n"
                    "   After a scan that finds a backdoor, 'ibau' is I-BAU followed by one pass "
                    "of unlearning\n   the reversed triggers; over the budget, I-BAU's repair "
                    "without that pass is judged\n   next, as 'ibau-alone' (then its "
                    "interpolation, then the whole's).\n"
                    "4. Verify: a backdoor the scan still finds in the chosen model is a "
                    "warning.\n\n"
                    "When the backdoor may still be active a warning is printed (stderr, the "
                    "table and the JSON)\nand the exit code is still 0; --fail-if-active makes it "
                    "3 (the outputs are written all the same).\n\n"
                    "exit codes: 0 done, 2 bad input or existing outputs without --force, 3 "
                    "--fail-if-active and\nthe backdoor still active, 1 an internal error (a "
                    "bug).")
    sub.add_argument("model", metavar="MODEL", help="the suspect model: " + _MODEL_FILES)
    sub.add_argument("--clean", required=True, metavar="DATA",
                     help="the defender's clean data, to train the repairs on")
    sub.add_argument("--validation", metavar="DATA",
                     help="clean data to measure each repair on; without it, "
                          "--validation-split of --clean is held out from training")
    sub.add_argument("--validation-split", type=_fraction, default=0.25, metavar="FRACTION",
                     help="share of --clean held out when there is no --validation")
    sub.add_argument("--poisoned", metavar="DATA",
                     help="triggered validation data: picks the repair with the lowest ASR and "
                          "checks the backdoor is gone")
    sub.add_argument("-o", "--output", required=True, metavar="DIR",
                     help="writes repaired.h5 (the chosen model; repaired.keras for a Keras 3 "
                          "MODEL) and defense.json")
    _output_options(sub, "DIR", wrappers=True)
    sub.add_argument("--fail-if-active", action="store_true",
                     help="exit with code 3 when the backdoor is still active on --poisoned")
    group = sub.add_argument_group("defense")
    group.add_argument("--max-accuracy-drop", type=_fraction, default=0.01, metavar="DROP",
                       help="allowed drop of validation accuracy against MODEL (absolute)")
    group.add_argument("--methods", nargs="+", choices=list(DEFENSE_METHODS),
                       default=None, metavar="METHOD",
                       help="repairs to try, in order of preference, among: "
                            + ", ".join(DEFENSE_METHODS) + " (default: "
                            + " ".join(TARGETED_DEFENSE_METHODS) + f" when {_TARGETED_WHEN}, "
                            "else " + " ".join(DEFAULT_DEFENSE_METHODS) + ")")
    group.add_argument("--no-scan", action="store_true",
                       help="do not scan first: run every method whatever the model, and judge "
                            "by accuracy (and --poisoned) only")
    group.add_argument("--try-all", action="store_true",
                       help="run every method even after one qualifies (the table then shows "
                            "them all)")
    group.add_argument("--repair-if-clean", action="store_true",
                       help="repair even when the scan finds no backdoor")
    group.add_argument("--interpolate", type=float, nargs="*", default=list(DEFENSE_INTERPOLATE),
                       metavar="FRACTION",
                       help="a repair over the budget is judged again with its weights each "
                            "FRACTION of the way from MODEL's to its own, until one qualifies "
                            "(default: %(default)s; none: off)")
    group.add_argument("--budget-confidence", type=float, default=0.8, metavar="P",
                       help="one-sided confidence of the bound on the paired accuracy drop that "
                            "must stay within --max-accuracy-drop")
    group.add_argument("--time-budget", type=_positive(float), metavar="SECONDS",
                       help="skip the remaining methods once this many seconds are spent")
    group.add_argument("--epochs", type=_positive(int), default=20,
                       help="fine-tuning epochs of each method")
    group.add_argument("--learning-rate", type=_positive(float), nargs="+", default=[0.05],
                       metavar="RATE",
                       help="initial SGD rate (cosine decay); several rates: each method keeps "
                            "the one with the best validation accuracy")
    group.add_argument("--asr-tolerance", type=_fraction, default=0.02, metavar="ASR",
                       help="validation ASR above which the backdoor counts as still active")
    group.add_argument("--ibau-radius", type=_positive(float), default=DEFENSE_IBAU_RADIUS,
                       metavar="R",
                       help="L2 radius of ibau's universal perturbation, in units of the data's "
                            "value range: a prior on the trigger's size (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the validation split, the initialisations and shuffling")
    _common(sub, data=True, attack=True, batch_size=64, batch_help="fine-tuning batch size")

    sub = add("export", "Write a pruned model for serving: masks folded in (or channels removed).",
              f"{PROG} export report/models/pruned_drop_0.04.h5 --output served/ --version 1\n"
              f"{PROG} export pruned.h5 --output plain.keras --shrink", cmd_export)
    sub.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    sub.add_argument("-o", "--output", required=True, metavar="PATH",
                     help="a folder (SavedModel), or a .h5/.keras file")
    sub.add_argument("--format", choices=["auto", "saved_model", "h5", "keras"], default="auto",
                     help="auto: from the output's suffix")
    sub.add_argument("--shrink", action="store_true", help="remove pruned channels")
    sub.add_argument("--version", type=_positive(int), help="SavedModel version subfolder (TF Serving)")
    _output_options(sub, "PATH")
    _common(sub)

    sub = add("repair", "Build the repaired N+1 network: class N when the original and pruned "
                        "models disagree.",
              f"{PROG} repair bd_net.h5 --pruned report/models/pruned_drop_0.04.h5 "
              "--output goodnet.h5\n"
              f"{PROG} repair bd_net.h5 --clean valid.h5 --threshold 0.04 --poisoned bd_valid.h5 "
              "--output goodnet.h5", cmd_repair)
    sub.add_argument("model", metavar="MODEL",
                     help="the original (backdoored) model: " + _MODEL_FILES)
    sub.add_argument("--pruned", metavar="MODEL", help="its pruned copy (else prune with --clean)")
    sub.add_argument("--clean", metavar="DATA", help="clean data to prune on and/or evaluate")
    sub.add_argument("--poisoned", metavar="DATA", help="triggered data to evaluate on")
    sub.add_argument("-o", "--output", required=True, metavar="FILE", help=".h5 or .keras")
    _output_options(sub, "FILE")
    _sweep_options(sub, multiple=False)
    _common(sub, data=True, attack=True)

    from tf_backdoor_defense.cli._scan import add_scan_parser  # no TensorFlow at import

    add_scan_parser(commands, _common, formatter_class=_Formatter)

    sub = add("demo", "End to end on real MNIST digits: train a BadNet, prune it, print the table.",
              f"{PROG} demo\n{PROG} demo --epochs 5 --output demo_report/ --json", cmd_demo)
    sub.add_argument("--epochs", type=_positive(int), default=15,
                     help="training epochs of the BadNet")
    sub.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    sub.add_argument("-o", "--output", metavar="DIR",
                     help="also write sweep.csv, summary.json, plots and evaluation.csv there")
    _output_options(sub, "DIR")
    _common(sub, model=False)
    return parser


# -- main --------------------------------------------------------------------------------
def _error_line(error, command):
    """The one line shown for an input error, with the flag that addresses it."""
    from tf_backdoor_defense.io._loading import ModelFileError, UnsafeModelError

    message = str(error).strip() or type(error).__name__
    if isinstance(error, OutputExistsError):
        message = f"output already exists: {', '.join(map(_escape, error.paths[:5]))}" \
                  + (" ..." if len(error.paths) > 5 else "") \
                  + ". Pass --force to replace it (only an earlier output of this tool)."
    elif isinstance(error, UnsafeModelError):
        message = (f"{error.reason} If you trust its author, pass --trust-model-code (the file's "
                   "code then runs).")
        if error.unknown_class:
            message += (" If the class is your own, pass --custom-objects FILE.py, a file that "
                        "defines it (the file's other classes are still checked).")
    elif isinstance(error, ModelFileError) and error.needs_weights:
        message += " On the command line: MODEL is the architecture, --weights FILE the weights."
    elif isinstance(error, ModelFileError) and error.missing_class:
        message += (" On the command line: --custom-objects FILE.py, a file that defines the "
                    "class.")
    if not message.isprintable():  # a control character the raising code did not escape
        message = _escape(message)
    return f"{PROG} {command}: error: {message}"


def _silence_stdout():
    """Point stdout at the null device, so flushing it at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that outputs being written are removed on the way out."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """While the command runs, SIGTERM unwinds the stack (exit code 143) instead of killing it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args, console):
    """Load TensorFlow (inside the session: its start-up lines are hidden), then the command."""
    import tf_backdoor_defense._keras  # noqa: F401

    imported = []
    try:
        if getattr(args, "custom_objects", None):  # the user's classes, imported once
            args.custom_objects_loaded = _custom_objects(args.custom_objects, imported)
        return args.func(args, console)
    finally:
        for name in imported:
            sys.modules.pop(name, None)


def main(argv=None):
    """Run the command line; returns the exit code.

    0 success, 2 bad input (a usage error or an input error the library
    raises as such), 3 ``defend --fail-if-active`` with the backdoor still
    active, 1 anything else (a bug: one line says so; ``--debug`` shows the
    traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). An
    interrupted or terminated command leaves no partial output behind.

    Everything the command changes in the process lasts only as long as
    this call (:func:`~tf_backdoor_defense.cli._console.session`). Called
    with ``argv=None`` (the console script, ``python -m tf_backdoor_defense``),
    it also hides TensorFlow's native log lines unless ``--debug``.
    """
    as_command = argv is None
    argv = sys.argv[1:] if argv is None else [str(word) for word in argv]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help, --version or a usage error
        return stop.code if isinstance(stop.code, int) else 2
    console = Console(quiet=args.quiet, json_mode=args.json)
    with session(console, prog=PROG, quiet_native=as_command, debug=args.debug):
        try:
            with _sigterm_interrupts():
                return _run(args, console)
        except KeyboardInterrupt as stop:  # outputs being written were removed on the way out
            print(f"{PROG}: {'terminated' if isinstance(stop, _Terminated) else 'interrupted'}",
                  file=sys.stderr, flush=True)
            return 143 if isinstance(stop, _Terminated) else 130
        except BrokenPipeError:  # stdout closed early (`... | head -1`): not an error
            _silence_stdout()
            return 0
        except INPUT_ERRORS as error:
            if args.debug:
                traceback.print_exc()
            print(_error_line(error, args.command), file=sys.stderr, flush=True)
            return 2
        except ImportError as error:  # an optional package is missing: the message says which
            if args.debug:
                traceback.print_exc()
            print(f"{PROG} {args.command}: error: {error}", file=sys.stderr, flush=True)
            return 1
        except Exception as error:  # noqa: BLE001 - a bug: one short line, no traceback
            if args.debug:
                traceback.print_exc()
            first = _escape((str(error).strip().splitlines() or [""])[0])
            print(f"{PROG} {args.command}: internal error (this is a bug): "
                  f"{type(error).__name__}{': ' + first if first else ''}"
                  + ("" if args.debug else " (--debug shows the traceback)"),
                  file=sys.stderr, flush=True)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""A pruning sweep as files: ``sweep.csv``, ``summary.json``, ``sweep.png``, ``activations.png``.

Every file is written atomically (see :mod:`tf_backdoor_defense.io._data`).
Plots use matplotlib's Agg canvas and never touch pyplot's global state.
One layer and several are reported the same way: per-layer detail is keyed
by layer name.
"""

import importlib.metadata
import pathlib
import platform

import numpy as np
import pandas as pd

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense.io._data import atomic_write, check_outputs_free, write_json
from tf_backdoor_defense.report._analysis import (
    activation_frame,
    new_figure,
    plot_channel_activations,
    save_figure,
)

__all__ = ["REPORT_FILES", "package_versions", "sweep_summary", "sweep_csv", "plot_sweep",
           "write_sweep_report"]

#: Files :func:`write_sweep_report` writes (plots only with ``plots=True``).
REPORT_FILES = ("sweep.csv", "summary.json", "sweep.png", "activations.png")
#: Decimals kept in ``sweep.csv``: rates of up to a million examples stay exact.
CSV_DECIMALS = 6
_PACKAGES = ("tf_backdoor_defense", "tensorflow", "tf_keras", "tensorflow_model_optimization",
             "numpy", "pandas", "h5py", "matplotlib")
_COLORS = ("tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def package_versions():
    """Versions of Python and the packages that produced a result.

    >>> sorted(package_versions())[:2]
    ['h5py', 'matplotlib']
    """
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def _float(value):
    value = float(value)
    return value if np.isfinite(value) else None


def sweep_summary(result, *, evaluation=None, extra=None):
    """The content of ``summary.json`` for a :class:`~tf_backdoor_defense.pruning._sweep.SweepResult`.

    Parameters
    ----------
    result : SweepResult
    evaluation : list of dict, default=None
        Optional held-out scores (rows with ``model``, ``clean_accuracy``, ...).
    extra : dict, default=None
        Added at the top level (inputs, command line, ...).

    Returns
    -------
    dict
        ``layers``, ``channels`` and ``rankings`` (keyed by layer),
        ``before`` (level 0) and ``after`` (per threshold) clean accuracy and
        ASR (``None`` when not measured), ``thresholds`` (the level, channels
        pruned and which, per layer), ``timings`` and ``versions``.
    """
    history = result.history
    first = history.iloc[0]
    thresholds, after = [], {}
    for threshold, level in result.levels.items():
        row = history.iloc[level]
        entry = {
            "max_accuracy_drop": float(threshold),
            "level": int(level),
            "channels_pruned": int(row["channels_pruned"]),
            "fraction_pruned": float(row["fraction_pruned"]),
            "clean_accuracy": _float(row["clean_accuracy"]),
            "attack_success_rate": _float(row["attack_success_rate"]),
            "pruned_channels": {name: _zeros(mask)
                                for name, mask in result.masks[threshold].items()},
        }
        thresholds.append(entry)
        after[f"{threshold:g}"] = {k: entry[k] for k in ("channels_pruned", "clean_accuracy",
                                                         "attack_success_rate")}
    summary = {
        "layers": list(result.layers),
        "channels": {name: int(count) for name, count in result.channels.items()},
        "steps": int(result.steps),
        "stopping_rule": result.stopping_rule,
        "before": {"clean_accuracy": _float(first["clean_accuracy"]),
                   "attack_success_rate": _float(first["attack_success_rate"])},
        "after": after,
        "thresholds": thresholds,
        "rankings": {name: [int(c) for c in order] for name, order in result.rankings.items()},
        "timings": {k: float(v) for k, v in result.timings.items()},
        "versions": package_versions(),
    }
    if evaluation is not None:
        summary["evaluation"] = evaluation
    if extra:
        summary.update(extra)
    return summary


def _zeros(mask):
    return sorted(int(c) for c in np.flatnonzero(np.asarray(mask) == 0))


def sweep_csv(result):
    """``result.history`` as CSV text, rates rounded to :data:`CSV_DECIMALS` decimals.

    Missing values (ASR without poisoned data) are empty fields.

    >>> import pandas as pd
    >>> class Result:
    ...     history = pd.DataFrame({"channels_pruned": [0, 1], "accuracy_drop": [0.0, 0.958 - 0.933]})
    >>> print(sweep_csv(Result()), end="")
    channels_pruned,accuracy_drop
    0,0.0
    1,0.025
    """
    return result.history.round(CSV_DECIMALS).to_csv(index=False, lineterminator="\n")


def _percent(threshold):
    return f"{threshold * 100:g}%"


def plot_sweep(result, path=None):
    """Clean accuracy and ASR against the fraction of channels pruned (Fig. 6 of Fine-Pruning).

    For each threshold, a dashed horizontal line marks the lowest clean
    accuracy its budget allows and a dotted vertical line the level it
    chose; thresholds that choose the same level share that line in
    alternating dashes of their colours. The attack success rate is dashed
    over the solid accuracy line, so both stay visible where they coincide.
    The top axis counts channels pruned.

    Parameters
    ----------
    result : SweepResult
    path : str or os.PathLike, default=None
        Save the figure there (atomically).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> from tf_backdoor_defense import prune_to_threshold
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
    ...                           keras.layers.Dense(2, activation="softmax")])
    >>> x = np.random.default_rng(0).random((20, 4), dtype=np.float32)
    >>> result = prune_to_threshold(model, (x, np.zeros(20, int)), layers=model.layers[0].name)
    >>> plot_sweep(result).axes[0].get_ylabel()
    'clean accuracy / attack success rate'
    """
    history = result.history
    figure = new_figure(7.6, 5.0)
    ax = figure.add_subplot(1, 1, 1)
    fraction = history["fraction_pruned"].to_numpy(dtype=float)
    marker = "o" if len(history) <= 41 else None
    ax.plot(fraction, history["clean_accuracy"], color="tab:blue", linewidth=2.4, marker=marker,
            markersize=3, label="clean accuracy (validation data)", zorder=3)
    asr = history["attack_success_rate"].to_numpy(dtype=float)
    if np.any(np.isfinite(asr)):
        ax.plot(fraction, asr, color="tab:red", linewidth=1.6, linestyle=(0, (4, 2.5)),
                marker="x" if marker else None, markersize=4,
                label="attack success rate (poisoned validation data)", zorder=4)
    else:
        ax.plot([], [], " ", label="attack success rate: n/a (no poisoned data)")
    baseline = float(history["clean_accuracy"].iloc[0])
    thresholds = sorted(result.levels.items())
    colors = {t: _COLORS[i % len(_COLORS)] for i, (t, _) in enumerate(thresholds)}
    for threshold, _ in thresholds:
        floor = baseline - threshold
        ax.axhline(floor, color=colors[threshold], linestyle="--", linewidth=0.9, alpha=0.8,
                   label=f"max drop {_percent(threshold)}: accuracy floor {floor:.3f}")
    for level in sorted(set(result.levels.values())):
        sharing = [t for t, k in thresholds if k == level]
        pruned = int(history["channels_pruned"].iloc[level])
        for j, threshold in enumerate(sharing):
            dash = 3.0 if len(sharing) > 1 else 1.5
            style = (j * dash, (dash, dash * (len(sharing) - 1) or dash))
            ax.axvline(fraction[level], color=colors[threshold], linestyle=style, linewidth=1.6,
                       label=f"max drop {_percent(threshold)}: level {level} ({pruned} channels pruned)")
    total = int(sum(result.channels.values()))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.03, 1.05)
    names = ", ".join(f"'{name}'" for name in result.layers)
    plural = "s" if len(result.layers) > 1 else ""
    ax.set_xlabel(f"fraction of the channels of layer{plural} {names} pruned")
    ax.set_ylabel("clean accuracy / attack success rate")
    top = ax.secondary_xaxis("top", functions=(lambda f: f * total, lambda c: c / total))
    top.set_xlabel(f"channels pruned (of {total})", fontsize=9)
    ax.set_title("Pruning sweep: clean accuracy and attack success rate at every level",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
              frameon=False)
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path)
    return figure


def _activation_table(result, poisoned_means):
    """One activation table for the layers of ``result``, in its pruning order."""
    if poisoned_means is not None:
        if not isinstance(poisoned_means, dict):
            raise InputTypeError(f"The 'poisoned_means' parameter must be a {{layer: array}} dict. "
                            f"Got {type(poisoned_means).__name__} instead.")
        if set(poisoned_means) != set(result.layers):
            raise InputError(f"The 'poisoned_means' parameter must give the layers "
                             f"{list(result.layers)}. Got {sorted(poisoned_means)} instead.")
    parts = [activation_frame(result.mean_activations[name],
                              None if poisoned_means is None else poisoned_means[name],
                              ranking=result.rankings[name]).assign(layer=name)
             for name in result.layers]
    table = pd.concat(parts, ignore_index=True)
    return table[["layer"] + [c for c in table.columns if c != "layer"]]


def write_sweep_report(result, outdir, *, poisoned_means=None, evaluation=None, extra=None,
                       plots=True, overwrite=False):
    """Write ``sweep.csv``, ``summary.json`` and the plots of a sweep into ``outdir``.

    Parameters
    ----------
    result : SweepResult
    outdir : str or os.PathLike
        Created when missing.
    poisoned_means : dict, default=None
        ``{layer: mean activation per channel on poisoned inputs}``, for
        ``activations.png``.
    evaluation, extra : see :func:`sweep_summary`.
    plots : bool, default=True
        Also draw ``sweep.png`` and ``activations.png``.
    overwrite : bool, default=False
        Replace existing files; otherwise an existing one raises an error
        before anything is written.

    Returns
    -------
    dict
        ``{file name: path}`` of what was written.

    Examples
    --------
    >>> import tempfile, numpy as np, tf_keras as keras
    >>> from tf_backdoor_defense import prune_to_threshold
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
    ...                           keras.layers.Dense(2, activation="softmax")])
    >>> x = np.random.default_rng(0).random((20, 4), dtype=np.float32)
    >>> result = prune_to_threshold(model, (x, np.zeros(20, int)), layers=model.layers[0].name)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     sorted(write_sweep_report(result, folder, plots=False))
    ['summary.json', 'sweep.csv']
    """
    outdir = pathlib.Path(outdir)
    names = REPORT_FILES if plots else REPORT_FILES[:2]
    paths = {name: outdir / name for name in names}
    table = _activation_table(result, poisoned_means) if plots else None
    check_outputs_free(paths.values(), force=overwrite)
    outdir.mkdir(parents=True, exist_ok=True)
    with atomic_write(paths["sweep.csv"]) as handle:
        handle.write(sweep_csv(result))
    write_json(paths["summary.json"], sweep_summary(result, evaluation=evaluation, extra=extra))
    if plots:
        plot_sweep(result, paths["sweep.png"])
        plot_channel_activations(table, paths["activations.png"])
    return paths

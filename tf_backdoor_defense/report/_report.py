"""A pruning sweep as files: ``sweep.csv``, ``summary.json``, ``sweep.png``, ``activations.png``.

Every file is written atomically (see :mod:`tf_backdoor_defense.io._data`).
Plots use matplotlib's Agg canvas, imported only when a plot is drawn, and
never touch pyplot's global state.
"""

import importlib.metadata
import pathlib
import platform

import numpy as np

from tf_backdoor_defense.io._data import atomic_path, atomic_write, check_outputs_free, write_json

__all__ = ["REPORT_FILES", "package_versions", "sweep_summary", "plot_sweep",
           "plot_activations", "write_sweep_report"]

#: Files :func:`write_sweep_report` writes (plots only with ``plots=True``).
REPORT_FILES = ("sweep.csv", "summary.json", "sweep.png", "activations.png")
_PACKAGES = ("tf_backdoor_defense", "tensorflow", "tf_keras", "tensorflow_model_optimization",
             "numpy", "pandas", "h5py")


def package_versions():
    """Versions of Python and the packages that produced a result.

    >>> sorted(package_versions())[:2]
    ['h5py', 'numpy']
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
        ``before`` (level 0) and ``after`` (per threshold) clean accuracy and
        ASR, ``thresholds`` (channels pruned and which), ``timings`` and
        ``versions``.
    """
    history = result.history
    first = history.iloc[0]
    group = _is_group(result)
    thresholds, after = [], {}
    for threshold, level in result.levels.items():
        row = history.iloc[level]
        masks = result.masks[threshold]
        entry = {
            "max_accuracy_drop": float(threshold),
            "channels_pruned": int(row["channels_pruned"]),
            "fraction_pruned": float(row["fraction_pruned"]),
            "clean_accuracy": _float(row["clean_accuracy"]),
            "attack_success_rate": _float(row["attack_success_rate"]),
            "pruned_channels": ({name: _zeros(mask) for name, mask in masks.items()} if group
                                else _zeros(masks)),
        }
        thresholds.append(entry)
        after[f"{threshold:g}"] = {k: entry[k] for k in ("channels_pruned", "clean_accuracy",
                                                         "attack_success_rate")}
    summary = {
        "layer": result.layers if group else result.layer,
        "channels": ({name: int(order.size) for name, order in result.rankings.items()} if group
                     else int(result.ranking.size)),
        "stopping_rule": result.stopping_rule,
        "before": {"clean_accuracy": _float(first["clean_accuracy"]),
                   "attack_success_rate": _float(first["attack_success_rate"])},
        "after": after,
        "thresholds": thresholds,
        "ranking": ({name: [int(c) for c in order] for name, order in result.rankings.items()}
                    if group else [int(c) for c in result.ranking]),
        "timings": {k: float(v) for k, v in result.timings.items()},
        "versions": package_versions(),
    }
    if evaluation is not None:
        summary["evaluation"] = evaluation
    if extra:
        summary.update(extra)
    return summary


def _is_group(result):
    """True for a several-layer sweep (GroupSweepResult)."""
    from tf_backdoor_defense.pruning._group_sweep import GroupSweepResult

    return isinstance(result, GroupSweepResult)


def _zeros(mask):
    return sorted(int(c) for c in np.flatnonzero(np.asarray(mask) == 0))


def _figure(width, height):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("The plots need matplotlib: `pip install matplotlib` (or "
                          "`pip install 'tf_backdoor_defense[plot]'`), or pass --no-plots / "
                          "plots=False.") from None

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path, overwrite=True):
    with atomic_path(path, overwrite=overwrite) as temp:
        figure.savefig(temp, format=pathlib.Path(path).suffix.lstrip(".").lower() or "png",
                       dpi=120)


def plot_sweep(result, path=None):
    """Clean accuracy and ASR against the fraction of channels pruned (Fig. 6 of Fine-Pruning).

    For each threshold, a dotted vertical line marks the chosen level and a
    dashed horizontal line the lowest clean accuracy it allows.

    Parameters
    ----------
    result : SweepResult
    path : str or os.PathLike, default=None
        Save the figure there (atomically).

    Returns
    -------
    matplotlib.figure.Figure
    """
    history = result.history
    figure = _figure(6.4, 4.0)
    ax = figure.add_subplot(1, 1, 1)
    fraction = history["fraction_pruned"].to_numpy()
    ax.plot(fraction, history["clean_accuracy"], color="tab:blue", label="clean accuracy")
    asr = history["attack_success_rate"].to_numpy(dtype=float)
    if np.any(np.isfinite(asr)):
        ax.plot(fraction, asr, color="tab:red", label="attack success rate")
    colors = ["tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:gray"]
    baseline = float(history["clean_accuracy"].iloc[0])
    for i, (threshold, level) in enumerate(sorted(result.levels.items())):
        color = colors[i % len(colors)]
        pruned = int(history["channels_pruned"].iloc[level])
        ax.axvline(fraction[level], color=color, linestyle=":",
                   label=f"max drop {threshold:.0%}: {pruned} pruned")
        ax.axhline(baseline - threshold, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"fraction of channels of layers {', '.join(map(repr, result.layers))} pruned"
                  if _is_group(result) else f"fraction of channels of layer '{result.layer}' pruned")
    ax.set_ylabel("rate")
    ax.set_title("Pruning defense: clean accuracy and attack success rate", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    if path is not None:
        _save(figure, path)
    return figure


def plot_activations(mean_clean, mean_poisoned=None, *, ranking=None, layer=None, path=None):
    """Per-channel mean activation, clean against poisoned, in pruning order.

    Parameters
    ----------
    mean_clean : array of shape (channels,), or dict of them
        A ``{layer: array}`` dict draws one panel per layer (``mean_poisoned``
        and ``ranking`` are then dicts too).
    mean_poisoned : array of shape (channels,), default=None
    ranking : array, default=None
        Pruning order; default: increasing ``mean_clean``.
    layer : str, default=None
        Shown in the title.
    path : str or os.PathLike, default=None

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> figure = plot_activations([0.0, 2.0, 1.0], [3.0, 2.0, 0.5])
    >>> [t.get_text() for t in figure.axes[0].get_xticklabels()]
    ['0', '2', '1']
    >>> len(plot_activations({"conv": [1.0, 0.0], "fc": [0.5, 0.2, 0.1]}).axes)
    2
    """
    if isinstance(mean_clean, dict):
        panels = [(name, values, (mean_poisoned or {}).get(name), (ranking or {}).get(name))
                  for name, values in mean_clean.items()]
    else:
        panels = [(layer, mean_clean, mean_poisoned, ranking)]
    widest = max(np.asarray(values).size for _, values, _, _ in panels)
    figure = _figure(max(6.0, 0.12 * widest + 2.0), 3.5 * len(panels))
    for index, (name, clean, poisoned, order) in enumerate(panels):
        _activation_panel(figure.add_subplot(len(panels), 1, index + 1), name, clean, poisoned,
                          order)
    figure.tight_layout()
    if path is not None:
        _save(figure, path)
    return figure


def _activation_panel(ax, layer, mean_clean, mean_poisoned, ranking):
    clean = np.asarray(mean_clean, dtype=np.float64)
    order = np.argsort(clean, kind="stable") if ranking is None else np.asarray(ranking)
    positions = np.arange(clean.size)
    width = 0.42 if mean_poisoned is not None else 0.8
    offset = width / 2 if mean_poisoned is not None else 0.0
    ax.bar(positions - offset, clean[order], width, color="tab:blue", label="clean inputs")
    if mean_poisoned is not None:
        poisoned = np.asarray(mean_poisoned, dtype=np.float64)
        ax.bar(positions + offset, poisoned[order], width, color="tab:red",
               label="poisoned inputs")
    if clean.size <= 64:
        ax.set_xticks(positions)
        ax.set_xticklabels([str(int(c)) for c in order], fontsize=6, rotation=90)
    ax.set_xlabel("channels in pruning order (increasing mean activation on clean inputs)")
    ax.set_ylabel("mean activation")
    ax.set_title(f"Mean activation per channel of layer '{layer}'" if layer else
                 "Mean activation per channel", fontsize=10)
    ax.legend(fontsize=8)


def write_sweep_report(result, outdir, *, poisoned_means=None, evaluation=None, extra=None,
                       plots=True, overwrite=False):
    """Write ``sweep.csv``, ``summary.json`` and the plots of a sweep into ``outdir``.

    Parameters
    ----------
    result : SweepResult or GroupSweepResult
    outdir : str or os.PathLike
        Created when missing.
    poisoned_means : array, default=None
        Mean activation per channel on poisoned inputs, for ``activations.png``
        (a ``{layer: array}`` dict for a several-layer sweep).
    evaluation, extra : see :func:`sweep_summary`.
    plots : bool, default=True
        Also draw ``sweep.png`` and ``activations.png`` (needs matplotlib).
    overwrite : bool, default=False
        Replace existing files; otherwise an existing one raises ``FileExistsError``
        before anything is written.

    Returns
    -------
    dict
        ``{file name: path}`` of what was written.
    """
    outdir = pathlib.Path(outdir)
    names = REPORT_FILES if plots else REPORT_FILES[:2]
    paths = {name: outdir / name for name in names}
    check_outputs_free(paths.values(), force=overwrite)
    outdir.mkdir(parents=True, exist_ok=True)
    with atomic_write(paths["sweep.csv"]) as handle:
        result.history.to_csv(handle, index=False, lineterminator="\n")
    write_json(paths["summary.json"], sweep_summary(result, evaluation=evaluation, extra=extra))
    if plots:
        plot_sweep(result, paths["sweep.png"])
        if _is_group(result):
            plot_activations(result.mean_activations, poisoned_means, ranking=result.rankings,
                             path=paths["activations.png"])
        else:
            plot_activations(result.mean_activations, poisoned_means, ranking=result.ranking,
                             layer=result.layer, path=paths["activations.png"])
    return paths

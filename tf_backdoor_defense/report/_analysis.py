"""Per-channel activations on clean vs. poisoned inputs (Fig. 4 and 8 of Fine-Pruning).

The table explains the "three phases" seen when a layer is pruned in order
of increasing clean activation: first channels dormant on all inputs go
(nothing changes), then channels active only on poisoned inputs (the attack
fades while clean accuracy holds), and finally the channels clean inputs
rely on (clean accuracy falls).

Categories
----------
Both means are compared with one scale, the largest mean of any channel on
either input set, ``scale = max(mean_clean.max(), mean_poisoned.max())``. A
channel is *active* on a set when its mean there exceeds
``dormant_threshold * scale``; then:

============== ====================== =========================
category       active on clean inputs active on poisoned inputs
============== ====================== =========================
dormant        no                     no
backdoor-only  no                     yes
clean-only     yes                    no
shared         yes                    yes
============== ====================== =========================

When ``scale`` is 0 (every channel outputs 0) all channels are dormant.
Without poisoned means the category is missing (``None``).

:func:`plot_channel_activations` is the one plot of this kind: the report of
a sweep (``activations.png``) draws it too.
"""

import math
import pathlib

import numpy as np
import pandas as pd

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._validation import check_fraction, check_model
from tf_backdoor_defense.io._data import atomic_path
from tf_backdoor_defense.pruning._ranking import rank_channels
from tf_backdoor_defense.scoring._activations import mean_channel_activations, resolve_layer
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["CATEGORIES", "channel_activation_table", "plot_channel_activations"]

#: The channel categories, in the order the three pruning phases meet them.
CATEGORIES = ("dormant", "backdoor-only", "clean-only", "shared")
_COLUMNS = ("channel", "mean_clean", "mean_poisoned", "category", "rank")
_MAX_CHANNEL_LABELS = 80  # channel ids per panel before only every n-th is written
_DPI = 120


@with_caller_keras
def channel_activation_table(model, ranking_data, poisoned_ranking_data, *, layers=None,
                             dormant_threshold=0.05, batch_size=256):
    """Mean activation of every channel of ``layers`` on clean and on poisoned inputs.

    Parameters
    ----------
    model : tf_keras.Model
        The (possibly backdoored) model; it is not modified.
    ranking_data : (x, y) arrays, x alone, or tf.data.Dataset
        Clean inputs (labels are not used); their means give the pruning order.
    poisoned_ranking_data : (x, y) arrays, x alone, or tf.data.Dataset
        The triggered inputs whose means are compared with the clean ones.
    layers : str or list of str, default=None
        Conv or Dense layer(s); default: the last convolutional layer. A list
        gives one table for all of them, with a ``layer`` column first.
    dormant_threshold : float in [0, 1), default=0.05
        A channel is active on a set when its mean there exceeds
        ``dormant_threshold`` times the largest mean of any channel of its
        layer on either set (see the module doc for the categories).
    batch_size : int, default=256

    Returns
    -------
    pandas.DataFrame
        One row per channel, in channel order, with columns ``channel``,
        ``mean_clean``, ``mean_poisoned``, ``category`` and ``rank`` (position
        in the pruning order: increasing clean mean, ties by channel index;
        0 is pruned first). ``table.attrs`` holds ``layer`` (or ``layers``)
        and ``dormant_threshold``.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
    ...     3, activation="relu", kernel_initializer="identity", name="fc")])
    >>> clean, poisoned = np.array([[1., 0.]]), np.array([[1., 1.]])
    >>> table = channel_activation_table(model, clean, poisoned, layers="fc")
    >>> table[["channel", "category", "rank"]].values.tolist()
    [[0, 'shared', 2], [1, 'backdoor-only', 0], [2, 'dormant', 1]]
    """
    check_model(model)
    dormant_threshold = check_fraction(dormant_threshold, "dormant_threshold", allow_one=False)
    several = isinstance(layers, (list, tuple))
    if several and (not layers or not all(isinstance(n, str) for n in layers)):
        raise InputError(f"The 'layers' parameter must be a layer name or a non-empty list of "
                         f"names. Got {layers!r} instead.")
    names = [resolve_layer(model, name).name for name in (layers if several else [layers])]
    tables = []
    for name in names:
        clean = mean_channel_activations(model, ranking_data, name, batch_size=batch_size)
        poisoned = mean_channel_activations(model, poisoned_ranking_data, name,
                                            batch_size=batch_size)
        tables.append(activation_frame(clean, poisoned, dormant_threshold=dormant_threshold))
    if several:
        table = pd.concat([t.assign(layer=name) for name, t in zip(names, tables)],
                          ignore_index=True)
        table = table[["layer", *_COLUMNS]]
        table.attrs["layers"] = names
    else:
        table = tables[0]
        table.attrs["layer"] = names[0]
    table.attrs["dormant_threshold"] = dormant_threshold
    return table


def activation_frame(mean_clean, mean_poisoned=None, *, ranking=None, dormant_threshold=0.05):
    """The table of :func:`channel_activation_table` for one layer, from its means.

    ``ranking`` (the pruning order) defaults to increasing ``mean_clean``;
    without ``mean_poisoned`` that column is NaN and ``category`` is None.

    >>> table = activation_frame([0.0, 2.0, 1.0], [3.0, 2.0, 0.0])
    >>> table[["channel", "category", "rank"]].values.tolist()
    [[0, 'backdoor-only', 0], [1, 'shared', 2], [2, 'clean-only', 1]]
    """
    clean = np.asarray(mean_clean, dtype=np.float64).reshape(-1)
    order = rank_channels(clean) if ranking is None else np.asarray(ranking, dtype=np.int64)
    rank = np.empty(clean.size, np.int64)
    rank[order] = np.arange(clean.size)
    if mean_poisoned is None:
        poisoned = np.full(clean.size, np.nan)
        category = np.full(clean.size, None, dtype=object)
    else:
        poisoned = np.asarray(mean_poisoned, dtype=np.float64).reshape(-1)
        if poisoned.shape != clean.shape:
            raise InputError(f"The poisoned means must have one value per channel ({clean.size}). "
                             f"Got {poisoned.size} values instead.")
        scale = max(float(clean.max()), float(poisoned.max()), 0.0)
        limit = dormant_threshold * scale
        active_clean = (clean > limit) & (scale > 0)
        active_poisoned = (poisoned > limit) & (scale > 0)
        category = np.select(
            [~active_clean & ~active_poisoned, ~active_clean & active_poisoned,
             active_clean & ~active_poisoned],
            list(CATEGORIES[:3]), default=CATEGORIES[3]).astype(object)
    return pd.DataFrame({
        "channel": np.arange(clean.size, dtype=np.int64),
        "mean_clean": clean,
        "mean_poisoned": poisoned,
        "category": category,
        "rank": rank,
    })


def _check_table(table):
    if not isinstance(table, pd.DataFrame):
        raise InputTypeError(f"The 'table' parameter must be a pandas DataFrame from "
                        f"channel_activation_table. Got {type(table).__name__}.")
    missing = [c for c in _COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"The 'table' parameter lacks the columns {missing}; build it with "
                         "channel_activation_table.")
    if len(table) == 0:
        raise InputError("The 'table' parameter has no rows.")


def new_figure(width, height):
    """A matplotlib Figure on an Agg canvas (no display, no global pyplot state).

    >>> new_figure(4.0, 3.0).get_size_inches().tolist()
    [4.0, 3.0]
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path, overwrite=True):
    """Write ``figure`` atomically (format from the extension, PNG when none).

    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = pathlib.Path(folder) / "empty.png"
    ...     save_figure(new_figure(1.0, 1.0), path)
    ...     path.read_bytes()[:4]
    b'\\x89PNG'
    """
    suffix = pathlib.Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_path(path, overwrite=overwrite) as temp:
        figure.savefig(temp, format=suffix, dpi=_DPI)


def plot_channel_activations(table, path=None, ax=None):
    """Bar plot of clean vs. poisoned mean activation per channel, in pruning order.

    One panel per layer. Every panel has the same x-axis: the layer's channels
    in pruning order, spread over [0, 1] (the fraction of the layer pruned
    before each channel), so that panels of layers of different widths line
    up with each other and with the sweep's ``fraction_pruned``. Tick labels
    are channel ids: every channel up to 80 channels, every n-th beyond.

    Parameters
    ----------
    table : pandas.DataFrame
        The output of :func:`channel_activation_table` (with a ``layer``
        column for several layers).
    path : str or os.PathLike, default=None
        Where to save the figure (format from the extension, PNG when none);
        written atomically, so an error leaves no partial file.
    ax : matplotlib.axes.Axes, default=None
        Draw one layer into these axes; by default a new Agg figure is
        created (no display and no global pyplot state is touched).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"channel": [0, 1], "mean_clean": [0.0, 1.0],
    ...     "mean_poisoned": [2.0, 1.0], "category": ["backdoor-only", "shared"], "rank": [0, 1]})
    >>> figure = plot_channel_activations(table)
    >>> figure.axes[0].get_xlabel()
    'channel id, in pruning order (lowest mean activation on clean inputs first)'
    """
    _check_table(table)
    if "layer" in table.columns:
        panels = [(name, part) for name, part in table.groupby("layer", sort=False)]
    else:
        panels = [(table.attrs.get("layer"), table)]
    if ax is not None:
        if len(panels) != 1:
            raise InputError(f"The 'ax' parameter draws one layer; the table has {len(panels)}.")
        figure = ax.figure
        axes = [ax]
    else:
        figure = new_figure(9.6, 0.9 + 2.9 * len(panels))
        axes = [figure.add_subplot(len(panels), 1, i + 1) for i in range(len(panels))]
    for index, ((name, part), panel) in enumerate(zip(panels, axes)):
        _activation_panel(panel, name, part, top=index == 0)
    if ax is None:
        figure.tight_layout()
    if path is not None:
        save_figure(figure, path)
    return figure


def _activation_panel(ax, layer, table, top):
    ordered = table.sort_values("rank", kind="stable")
    count = len(ordered)
    centers = (np.arange(count) + 0.5) / count
    clean = ordered["mean_clean"].to_numpy(dtype=np.float64)
    poisoned = ordered["mean_poisoned"].to_numpy(dtype=np.float64)
    has_poisoned = bool(np.any(np.isfinite(poisoned)))
    slot = 1.0 / count
    width = 0.42 * slot if has_poisoned else 0.8 * slot
    offset = width / 2 if has_poisoned else 0.0
    ax.bar(centers - offset, clean, width, color="tab:blue", label="clean inputs")
    if has_poisoned:
        ax.bar(centers + offset, poisoned, width, color="tab:red", label="poisoned inputs")
    stride = max(1, math.ceil(count / _MAX_CHANNEL_LABELS))
    shown = np.arange(0, count, stride)
    ax.set_xticks(centers[shown])
    ax.set_xticklabels([str(int(c)) for c in ordered["channel"].to_numpy()[shown]],
                       fontsize=6.5 if count <= 32 else 6, rotation=90)
    if stride > 1:
        ax.set_xticks(centers, minor=True)
    ax.tick_params(axis="x", which="minor", length=2)
    ax.set_xlim(0.0, 1.0)
    for fraction in (0.25, 0.5, 0.75):
        ax.axvline(fraction, color="0.6", linewidth=0.6, linestyle=":", zorder=0)
    note = "" if stride == 1 else f"; every {_ordinal(stride)} id written"
    ax.set_xlabel("channel id, in pruning order (lowest mean activation on clean inputs first)"
                  + note, fontsize=8)
    ax.set_ylabel("mean activation", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    if top:
        fractions = ax.secondary_xaxis("top")
        fractions.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0])
        fractions.set_xticklabels(["0%", "25%", "50%", "75%", "100%"], fontsize=7)
        fractions.set_xlabel("share of the layer's channels pruned before it", fontsize=8)
    if has_poisoned:
        counts = ordered["category"].value_counts()
        detail = ", ".join(f"{counts.get(c, 0)} {c}" for c in CATEGORIES)
    else:
        detail = "no poisoned inputs measured"
    name = f"layer '{layer}', " if layer else ""
    ax.set_title(f"{name}{count} channels: {detail}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def _ordinal(number):
    return {2: "2nd", 3: "3rd"}.get(number, f"{number}th")

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
"""

import os
import tempfile

import numpy as np
import pandas as pd

from tf_backdoor_defense.scoring._activations import mean_channel_activations, resolve_layer
from tf_backdoor_defense._validation import check_fraction, check_model

__all__ = ["CATEGORIES", "channel_activation_table", "plot_channel_activations"]

#: The channel categories, in the order the three pruning phases meet them.
CATEGORIES = ("dormant", "backdoor-only", "clean-only", "shared")
_COLUMNS = ("channel", "mean_clean", "mean_poisoned", "category", "rank")


def _ranking(means):
    try:
        from tf_backdoor_defense.pruning._ranking import rank_channels
    except ImportError:  # pragma: no cover - ranking.py ships with the package
        return np.argsort(means, kind="stable")
    return rank_channels(means)


def channel_activation_table(model, clean_data, poisoned_data, *, layer=None,
                             dormant_threshold=0.05, batch_size=256):
    """Mean activation of every channel of ``layer`` on clean and on poisoned inputs.

    Parameters
    ----------
    model : tf_keras.Model
        The (possibly backdoored) model; it is not modified.
    clean_data, poisoned_data : (x, y) arrays, x alone, or tf.data.Dataset
        Clean inputs and triggered inputs (labels are not used).
    layer : str, default=None
        A Conv or Dense layer; default: the last convolutional layer.
    dormant_threshold : float in [0, 1), default=0.05
        A channel is active on a set when its mean there exceeds
        ``dormant_threshold`` times the largest mean of any channel on either
        set (see the module doc for the categories).
    batch_size : int, default=256

    Returns
    -------
    pandas.DataFrame
        One row per channel, in channel order, with columns ``channel``,
        ``mean_clean``, ``mean_poisoned``, ``category`` and ``rank`` (position
        in the pruning order: increasing clean mean, ties by channel index;
        0 is pruned first). ``table.attrs`` holds ``layer`` and
        ``dormant_threshold``.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
    ...     3, activation="relu", kernel_initializer="identity", name="fc")])
    >>> clean, poisoned = np.array([[1., 0.]]), np.array([[1., 1.]])
    >>> table = channel_activation_table(model, clean, poisoned, layer="fc")
    >>> table[["channel", "category", "rank"]].values.tolist()
    [[0, 'shared', 2], [1, 'backdoor-only', 0], [2, 'dormant', 1]]
    """
    check_model(model)
    dormant_threshold = check_fraction(dormant_threshold, "dormant_threshold", allow_one=False)
    found = resolve_layer(model, layer)
    clean = np.asarray(mean_channel_activations(model, clean_data, layer=found.name,
                                                batch_size=batch_size), np.float64)
    poisoned = np.asarray(mean_channel_activations(model, poisoned_data, layer=found.name,
                                                   batch_size=batch_size), np.float64)
    scale = max(float(clean.max()), float(poisoned.max()), 0.0)
    limit = dormant_threshold * scale
    active_clean = (clean > limit) & (scale > 0)
    active_poisoned = (poisoned > limit) & (scale > 0)
    category = np.select(
        [~active_clean & ~active_poisoned, ~active_clean & active_poisoned,
         active_clean & ~active_poisoned],
        list(CATEGORIES[:3]), default=CATEGORIES[3])
    rank = np.empty(clean.size, np.int64)
    rank[_ranking(clean)] = np.arange(clean.size)
    table = pd.DataFrame({
        "channel": np.arange(clean.size, dtype=np.int64),
        "mean_clean": clean,
        "mean_poisoned": poisoned,
        "category": pd.Categorical(category, categories=list(CATEGORIES)).astype(str),
        "rank": rank,
    })
    table.attrs["layer"] = found.name
    table.attrs["dormant_threshold"] = dormant_threshold
    return table


def _check_table(table):
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"The 'table' parameter must be a pandas DataFrame from "
                        f"channel_activation_table. Got {type(table).__name__}.")
    missing = [c for c in _COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"The 'table' parameter lacks the columns {missing}; build it with "
                         "channel_activation_table.")
    if len(table) == 0:
        raise ValueError("The 'table' parameter has no rows.")


def _save_atomically(figure, path):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1] or ".png"
    handle, temp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        figure.savefig(temp, format=suffix.lstrip(".").lower())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def plot_channel_activations(table, path=None, ax=None):
    """Bar plot of clean vs. poisoned mean activation per channel, in pruning order.

    Parameters
    ----------
    table : pandas.DataFrame
        The output of :func:`channel_activation_table`.
    path : str or os.PathLike, default=None
        Where to save the figure (format from the extension, PNG when none);
        written atomically, so an error leaves no partial file.
    ax : matplotlib.axes.Axes, default=None
        Draw into these axes; by default a new Agg figure is created (no
        display and no global pyplot state is touched).

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
    'channels in pruning order (increasing mean activation on clean inputs)'
    """
    _check_table(table)
    if ax is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(max(6.0, 0.12 * len(table) + 2.0), 3.5))
        FigureCanvasAgg(figure)
        ax = figure.add_subplot(1, 1, 1)
    else:
        figure = ax.figure
    ordered = table.sort_values("rank", kind="stable")
    positions = np.arange(len(ordered))
    width = 0.42
    ax.bar(positions - width / 2, ordered["mean_clean"], width, label="clean inputs", color="tab:blue")
    ax.bar(positions + width / 2, ordered["mean_poisoned"], width, label="poisoned inputs",
           color="tab:red")
    if len(ordered) <= 64:
        ax.set_xticks(positions)
        ax.set_xticklabels([str(c) for c in ordered["channel"]], fontsize=6, rotation=90)
    ax.set_xlabel("channels in pruning order (increasing mean activation on clean inputs)")
    ax.set_ylabel("mean activation")
    layer = table.attrs.get("layer")
    counts = ordered["category"].value_counts()
    summary = ", ".join(f"{counts.get(c, 0)} {c}" for c in CATEGORIES)
    ax.set_title((f"layer {layer}: " if layer else "") + summary, fontsize=9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    if path is not None:
        _save_atomically(figure, path)
    return figure

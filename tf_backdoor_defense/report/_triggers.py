"""The picture of a scan's reversed triggers: mask, pattern and mask x pattern per class."""

import numbers

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense.report._analysis import new_figure, save_figure

__all__ = ["plot_triggers"]


def _rows(result, top, untargeted):
    """(label, mask, pattern, suspected) rows: suspected targets first, then smallest masks."""
    table = result.table.set_index("class")
    order = list(result.suspected_targets)
    by_size = result.top(len(result.classes))["class"].tolist()
    order += [c for c in by_size if c not in order]
    rows = []
    for c in order[:top]:
        mask, pattern = result.trigger(int(c))
        row = table.loc[c]
        rate = row["attack_success_rate"]
        label = (f"class {c}" + (" (suspected)" if row["suspected"] else "")
                 + f"\nL1 {row['mask_l1']:.1f}, index {row['anomaly_index']:.2f}"
                 + ("" if rate != rate else f"\nsuccess {100 * rate:.0f}%"))
        rows.append((label, mask, pattern, bool(row["suspected"])))
    if untargeted:
        info = result.untargeted
        label = ("untargeted" + (" (all-to-all suspected)" if result.all_to_all_suspected else "")
                 + f"\nL1 {info['mask_l1']:.1f}, {info['statistic']:.2f} x median class"
                 + ("" if info["flip_rate"] != info["flip_rate"]
                    else f"\nmoves {100 * info['flip_rate']:.0f}% off their class"))
        row = (label, result.untargeted_mask, result.untargeted_pattern,
               result.all_to_all_suspected)
        # The suspected trigger comes first.
        rows = [row] + rows if result.all_to_all_suspected else rows + [row]
    return rows


def _show(ax, image):
    image = np.clip(image, 0.0, 1.0)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_triggers(scan_result, path=None, top=6, untargeted=True):
    """A grid of the reversed triggers: one row per class, suspected targets first.

    Columns: the mask (white = stamped), the pattern, and mask x pattern (what
    the trigger writes into an image, on black). Patterns are shown on the
    scan's value range. Each row is labelled with its class, the mask's L1
    norm, its anomaly index and its success rate on held-apart data; a red
    frame marks a suspected trigger. The untargeted trigger (the all-to-all
    test) is the last row, or the first when it is the suspected one.

    Parameters
    ----------
    scan_result : ScanResult
    path : str or os.PathLike, default=None
        Save the figure there, atomically (PNG unless the suffix says otherwise).
    top : int, default=6
        Classes shown: the suspected targets, then the smallest masks.
    untargeted : bool, default=True
        Add the untargeted trigger's row.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> from tf_backdoor_defense.scan import scan_model
    >>> model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
    ...                           keras.layers.Dense(3, activation="softmax")])
    >>> x = np.random.default_rng(0).random((30, 4, 4, 1)).astype("float32")
    >>> figure = plot_triggers(scan_model(model, (x, np.arange(30) % 3), steps=10), top=2)
    >>> len(figure.axes)  # two classes and the untargeted trigger, four panels each
    12
    """
    from tf_backdoor_defense.scan._scan import ScanResult

    if not isinstance(scan_result, ScanResult):
        raise InputTypeError(f"The 'scan_result' parameter must be a ScanResult from scan_model. "
                        f"Got {type(scan_result).__name__}.")
    if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 0:
        raise InputError(f"The 'top' parameter must be a non-negative int. Got {top!r}.")
    rows = _rows(scan_result, int(top), bool(untargeted))
    if not rows:
        raise InputError("Nothing to plot: top=0 and untargeted=False.")
    low, high = scan_result.value_range
    figure = new_figure(7.8, 0.6 + 2.0 * len(rows))
    columns = ("mask", "pattern", "mask x pattern")
    for r, (label, mask, pattern, suspected) in enumerate(rows):
        scaled = (np.asarray(pattern, np.float64) - low) / (high - low)
        images = (mask, scaled, mask * scaled)
        for c, image in enumerate(images):
            ax = figure.add_subplot(len(rows), 4, 4 * r + c + 2)
            _show(ax, image)
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
            if suspected:
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:red")
                    spine.set_linewidth(2.0)
        text = figure.add_subplot(len(rows), 4, 4 * r + 1)
        text.axis("off")
        text.text(1.0, 0.5, label, ha="right", va="center", fontsize=8.5,
                  color="tab:red" if suspected else "black", transform=text.transAxes)
    figure.suptitle(f"Reversed triggers: {scan_result.verdict}", fontsize=10, wrap=True)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    if path is not None:
        save_figure(figure, path)
    return figure

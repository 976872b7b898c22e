"""Statistics of reversed triggers: the anomaly index of their sizes (median absolute
deviation) and the matching share of where an untargeted trigger sends inputs."""

import numpy as np

__all__ = ["MAD_CONSISTENCY", "anomaly_index", "matching_share"]

#: Makes the median absolute deviation estimate the standard deviation of normal data.
MAD_CONSISTENCY = 1.4826


def anomaly_index(values, *, log=True):
    """How far below the median each value lies, in robust standard deviations.

    ``(median - v) / (1.4826 * median(|v - median|))``: positive for values
    below the median (a suspiciously small trigger), negative above it. With
    ``log=True`` (the default) the values are compared on a log scale, where
    a trigger half the median size is as far from it as one twice that size.

    Parameters
    ----------
    values : array of positive floats
        One mask L1 norm per class; NaN entries are ignored and get NaN.
    log : bool, default=True

    Returns
    -------
    float array of the same shape; all NaN when fewer than three values are
    finite or when their deviation is zero.

    Examples
    --------
    >>> import numpy as np
    >>> index = anomaly_index(np.array([100.0, 90.0, 110.0, 120.0, 80.0, 5.0]))
    >>> int(np.argmax(index)), bool(index[5] > 2), bool(index[0] < 2)
    (5, True, True)
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    finite = np.isfinite(values) & (values > 0 if log else True)
    if finite.sum() < 3:
        return out
    scaled = np.log(values[finite]) if log else values[finite]
    median = np.median(scaled)
    deviation = MAD_CONSISTENCY * np.median(np.abs(scaled - median))
    if deviation <= 0:
        return out
    out[finite] = (median - scaled) / deviation
    return out


def matching_share(pairs):
    """Share of moved inputs that one one-to-one map from true class to new class explains.

    ``pairs[i, j]`` counts inputs of class ``i`` that a trigger sent to class
    ``j`` (the diagonal, inputs kept in their class, is ignored). The share
    is the largest total of counts on cells with no two in one row or one
    column (an assignment, solved exactly), over all moved inputs. An
    all-to-all backdoor maps every class to its own target, so its trigger
    scores near 1; a natural universal perturbation sends inputs of many
    classes to the same few "sink" classes, and scores low (with ``k`` sinks,
    at most the share of the ``k`` best source-to-sink cells).

    Parameters
    ----------
    pairs : (K, K) array of non-negative counts

    Returns
    -------
    float in [0, 1]; NaN when nothing moved.

    Examples
    --------
    >>> import numpy as np
    >>> shifted = 10 * np.roll(np.eye(4), 1, axis=1)  # class c -> c + 1
    >>> float(matching_share(shifted))
    1.0
    >>> sink = np.zeros((4, 4)); sink[1:, 0] = 10; sink[0, 1] = 10  # all to class 0
    >>> float(matching_share(sink))
    0.5
    """
    from scipy.optimize import linear_sum_assignment

    pairs = np.array(pairs, dtype=np.float64)
    if pairs.ndim != 2 or pairs.shape[0] != pairs.shape[1]:
        raise ValueError(f"matching_share needs a square (K, K) count matrix. Got shape "
                         f"{pairs.shape}.")
    np.fill_diagonal(pairs, 0.0)
    moved = pairs.sum()
    if moved <= 0:
        return float("nan")
    rows, cols = linear_sum_assignment(pairs, maximize=True)
    return float(pairs[rows, cols].sum() / moved)

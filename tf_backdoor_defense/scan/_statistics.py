"""Statistics of reversed triggers: the anomaly index of their sizes (median absolute
deviation) and the matching share of where an untargeted trigger sends inputs."""

import numpy as np

__all__ = ["MAD_CONSISTENCY", "anomaly_index", "describe_map", "match", "matching_map",
           "matching_share"]

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


def _moved_pairs(pairs, name):
    pairs = np.array(pairs, dtype=np.float64)
    if pairs.ndim != 2 or pairs.shape[0] != pairs.shape[1]:
        raise ValueError(f"{name} needs a square (K, K) count matrix. Got shape "
                         f"{pairs.shape}.")
    np.fill_diagonal(pairs, 0.0)
    return pairs


def match(pairs, name="match"):
    """``(matching_share(pairs), matching_map(pairs))`` from one assignment (the map is None
    with one class). ``name`` starts the error message for a bad ``pairs``.

    >>> import numpy as np
    >>> share, found = match(10 * np.roll(np.eye(3), 1, axis=1))
    >>> share, found.tolist()
    (1.0, [1, 2, 0])
    """
    from scipy.optimize import linear_sum_assignment

    pairs = _moved_pairs(pairs, name)
    moved = pairs.sum()
    rows, cols = linear_sum_assignment(pairs, maximize=True)
    share = float(pairs[rows, cols].sum() / moved) if moved > 0 else float("nan")
    if len(pairs) < 2:
        return share, None
    result = np.empty(len(pairs), dtype=np.int64)
    result[rows] = cols
    overall = pairs.sum(axis=0)
    for source in np.flatnonzero(result == np.arange(len(pairs))):
        scores = (pairs[source] if pairs[source].sum() > 0 else overall).copy()
        scores[source] = -1.0
        result[source] = int(np.argmax(scores))
    return share, result


def matching_map(pairs):
    """The one-to-one class map that explains the most moved inputs of ``pairs``.

    ``result[i]`` is the class that inputs of class ``i`` are sent to: the
    assignment :func:`matching_share` scores. A class the assignment leaves
    on itself (none of its inputs moved along the map) is sent where most of
    its moved inputs went, or, when none moved, where most moved inputs of
    all classes went; no class is sent to itself. For an all-to-all backdoor
    this is its estimated target map, which a repair can search along
    (``ibau(target=...)``).

    Parameters
    ----------
    pairs : (K, K) array of non-negative counts, K >= 2

    Returns
    -------
    int64 array (K,)

    Examples
    --------
    >>> import numpy as np
    >>> shifted = 10 * np.roll(np.eye(4), 1, axis=1)  # class c -> c + 1
    >>> matching_map(shifted).tolist()
    [1, 2, 3, 0]
    >>> swapped = np.zeros((3, 3)); swapped[0, 1] = swapped[1, 0] = 10; swapped[2, 0] = 1
    >>> matching_map(swapped).tolist()  # class 2: where its one moved input went
    [1, 0, 0]
    """
    _, result = match(pairs, "matching_map")
    if result is None:
        raise ValueError("matching_map needs at least 2 classes.")
    return result


def matching_share(pairs):
    """Share of moved inputs that one one-to-one map from true class to new class explains.

    ``pairs[i, j]`` counts inputs of class ``i`` that a trigger sent to class
    ``j`` (the diagonal, inputs kept in their class, is ignored). The share
    is the largest total of counts on cells with no two in one row or one
    column (an assignment, solved exactly; :func:`matching_map` gives it),
    over all moved inputs. An all-to-all backdoor maps every class to its own
    target, so its trigger scores near 1; a natural universal perturbation
    sends inputs of many classes to the same few "sink" classes, and scores
    low (with ``k`` sinks, at most the share of the ``k`` best source-to-sink
    cells).

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
    return match(pairs, "matching_share")[0]


def describe_map(class_map, limit=None):
    """A class map as ``"0->1, 1->2, ..."``, cut after ``limit`` classes (``", ..."``).

    >>> describe_map([1, 2, 0]), describe_map([1, 2, 0], limit=2)
    ('0->1, 1->2, 2->0', '0->1, 1->2, ...')
    """
    pairs = [f"{c}->{int(t)}" for c, t in enumerate(class_map)]
    if limit is not None and len(pairs) > limit:
        return ", ".join(pairs[:limit]) + ", ..."
    return ", ".join(pairs)

"""The anomaly index of reversed-trigger sizes (median absolute deviation)."""

import numpy as np

__all__ = ["MAD_CONSISTENCY", "anomaly_index"]

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

"""Label arrays -> class indices: the one label normaliser (NumPy only, no TensorFlow).

The data checks of the public functions, the data-file reader and the
poisoning helpers all read labels through :func:`class_indices`, so they
accept the same forms and say the same things about bad ones.
"""

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError

__all__ = ["class_indices"]


def class_indices(y, what):
    """Labels as int64 class indices: the one reading of a label array in the package.

    Accepts class indices (shape ``(N,)`` or ``(N, 1)``) and one-hot or
    probability rows (shape ``(N, K)``, non-negative and summing to 1, read by
    argmax; other rows, such as all-zero ones or ``[label, weight]`` pairs, are
    refused). ``what`` starts the error messages, e.g.
    ``"The labels of `validation_data`"``.

    >>> class_indices([[0, 1], [1, 0]], "y").tolist(), class_indices([[2.0], [0.0]], "y").tolist()
    ([1, 0], [2, 0])
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        _check_rows(y, what)
        y = np.argmax(y, axis=1)
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise InputError(f"{what} must be 1-D class indices or 2-D one-hot rows. "
                         f"Got shape {y.shape}.")
    _check_real(y, what)
    if y.size and not np.issubdtype(y.dtype, np.integer) and y.dtype != bool:
        if not np.all(np.isfinite(y)):
            raise InputError(f"{what} contain NaN or Inf values.")
        if not np.all(np.equal(np.round(y), y)):
            raise InputError(f"{what} must be whole class indices.")
        if y.max() >= 2 ** 31 or y.min() < -(2 ** 31):
            raise InputError(f"{what} include a label out of range ({float(y.max()):g}); labels "
                             "are class indices 0..N-1.")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise InputError(f"{what} include a negative label ({int(y.min())}); labels are class "
                         "indices 0..N-1.")
    return y


def _check_rows(y, what):
    """Refuse 2-D label rows that argmax would misread: rows that are neither one-hot nor
    probabilities (non-negative, summing to 1)."""
    _check_real(y, what)
    if not y.size:
        return
    rows = y.astype(np.float64)
    if not np.all(np.isfinite(rows)):
        raise InputError(f"{what} contain NaN or Inf values.")
    bad = np.flatnonzero(np.any(rows < 0, axis=1) | ~np.isclose(rows.sum(axis=1), 1.0, atol=1e-3))
    if bad.size:
        raise InputError(
            f"{what} are 2-D rows, read as one-hot or class probabilities, but "
            f"{bad.size} of {len(rows)} rows are not (row {int(bad[0])}: "
            f"{np.array2string(y[bad[0]], threshold=12)}); a row must be non-negative and sum "
            "to 1 (an all-zero row has no class). Pass class indices of shape (N,) instead.")


def _check_real(y, what):
    """Refuse labels that are not real numbers (or booleans)."""
    if y.dtype != bool and not np.issubdtype(y.dtype, np.number):
        raise InputTypeError(f"{what} must be numbers. Got dtype {y.dtype}.")
    if np.iscomplexobj(y):
        raise InputTypeError(f"{what} must be real numbers. Got dtype {y.dtype}.")

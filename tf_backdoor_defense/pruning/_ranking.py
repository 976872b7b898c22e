"""Activation statistics -> a stable channel pruning order."""

import numpy as np

__all__ = ["rank_channels", "level_mask"]


def rank_channels(mean_activations):
    """Channels in pruning order: increasing mean activation, ties by channel index.

    Examples
    --------
    >>> rank_channels([0.5, 0.0, 0.2, 0.0]).tolist()
    [1, 3, 2, 0]
    """
    means = np.asarray(mean_activations, dtype=np.float64).reshape(-1)
    if means.size == 0:
        raise ValueError("Cannot rank an empty list of channels.")
    if not np.all(np.isfinite(means)):
        raise ValueError("Mean activations contain NaN or Inf; check the model and the data.")
    return np.argsort(means, kind="stable").astype(np.int64)


def level_mask(ranking, level, channels=None):
    """Mask (1 = kept) with the first ``level`` channels of ``ranking`` pruned.

    Examples
    --------
    >>> level_mask([2, 0, 1], 2).tolist()
    [0.0, 1.0, 0.0]
    """
    ranking = np.asarray(ranking, dtype=np.int64)
    channels = ranking.size if channels is None else int(channels)
    if not 0 <= int(level) <= ranking.size:
        raise ValueError(f"level must be in [0, {ranking.size}]. Got {level}.")
    mask = np.ones(channels, dtype=np.float32)
    mask[ranking[: int(level)]] = 0.0
    return mask

"""Activation statistics -> a stable channel pruning order -> the masks of a level.

Level ``k`` of a sweep with ``steps`` levels prunes ``round(k / steps * C)``
of the ``C`` channels of every layer, in that layer's ranking: the same
fraction of each. Channels a ``PruneByActivation`` wrapper already masks come
first in their layer's ranking and stay pruned at every level.
"""

import numpy as np

from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense.masks._wrapper import PruneByActivation, channel_count
from tf_backdoor_defense.scoring._activations import mean_channel_activations, resolve_layer
from tf_backdoor_defense.scoring._distributed import distributed_channel_means, is_distributed

__all__ = ["rank_channels", "level_mask", "layer_rankings", "fraction_masks"]


def rank_channels(mean_activations):
    """Channels in pruning order: increasing mean activation, ties by channel index.

    Examples
    --------
    >>> rank_channels([0.5, 0.0, 0.2, 0.0]).tolist()
    [1, 3, 2, 0]
    """
    means = np.asarray(mean_activations, dtype=np.float64).reshape(-1)
    if means.size == 0:
        raise InputError("Cannot rank an empty list of channels.")
    if not np.all(np.isfinite(means)):
        raise InputError("Mean activations contain NaN or Inf; check the model and the data.")
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
        raise InputError(f"level must be in [0, {ranking.size}]. Got {level}.")
    mask = np.ones(channels, dtype=np.float32)
    mask[ranking[: int(level)]] = 0.0
    return mask


def base_mask(layer):
    """The mask ``layer`` arrives with: its wrapper's, or all ones for a plain layer."""
    if isinstance(layer, PruneByActivation):
        return np.asarray(layer.get_mask(), np.float32)
    return np.ones(channel_count(layer), np.float32)


def pruned_first(order, mask):
    """``order`` with the channels ``mask`` already prunes moved to the front (stable)."""
    order = np.asarray(order, dtype=np.int64)
    already = np.asarray(mask)[order] == 0
    return np.concatenate([order[already], order[~already]])


def layer_rankings(model, layers, ranking_data, batch_size=256, strategy=None):
    """Per-layer pruning orders on ``ranking_data``, with the channels already pruned first.

    Parameters
    ----------
    model : tf_keras.Model
    layers : list of str
        Names of prunable layers.
    ranking_data : LabeledData, (x, y) arrays, x alone or tf.data.Dataset
        Clean data on which the mean activations are computed.
    batch_size : int, default=256
    strategy : tf.distribute.Strategy, default=None
        With several replicas or workers the mean activations are computed on
        all of them and reduced
        (:func:`~tf_backdoor_defense.scoring._distributed.distributed_channel_means`);
        None or one replica: this device.

    Returns
    -------
    (rankings, means, base_masks) : tuple of dict
        Each keyed by layer name: channels in pruning order (increasing mean
        activation, ties by index, channels a ``PruneByActivation`` wrapper
        already masks before all others), the mean activations, and the masks
        the model already has (all ones for an unwrapped layer).

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(3, activation="relu", kernel_initializer="identity", name="fc")])
    >>> x = np.array([[0.0, 2.0, 1.0], [0.0, 4.0, 3.0]], np.float32)
    >>> rankings, means, base = layer_rankings(model, ["fc"], (x, np.zeros(2, int)))
    >>> rankings["fc"].tolist(), means["fc"].tolist(), base["fc"].tolist()
    ([0, 2, 1], [0.0, 3.0, 2.0], [1.0, 1.0, 1.0])
    """
    rankings, means, base_masks = {}, {}, {}
    for name in layers:
        base_masks[name] = base_mask(resolve_layer(model, name))
        if not is_distributed(strategy):
            means[name] = np.asarray(mean_channel_activations(model, ranking_data, name,
                                                              batch_size=batch_size))
        else:
            means[name] = np.asarray(distributed_channel_means(
                model, ranking_data, name, strategy=strategy, batch_size=batch_size))
        rankings[name] = pruned_first(rank_channels(means[name]), base_masks[name])
    return rankings, means, base_masks


def fraction_masks(rankings, base_masks, fraction):
    """``{layer: mask}`` pruning ``round(fraction * channels)`` of each layer, plus those
    already pruned.

    >>> import numpy as np
    >>> masks = fraction_masks({"a": np.array([2, 0, 1, 3]), "b": np.array([1, 0])},
    ...                        {"a": np.ones(4), "b": np.array([1.0, 0.0])}, 0.5)
    >>> {name: mask.tolist() for name, mask in masks.items()}
    {'a': [0.0, 1.0, 0.0, 1.0], 'b': [1.0, 0.0]}
    """
    return {name: np.minimum(base_masks[name],
                             level_mask(order, int(round(fraction * order.size)), order.size))
            for name, order in rankings.items()}

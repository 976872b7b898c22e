"""The pruning defense: rank channels, sweep every pruning level, pick thresholds.

``prune_to_threshold`` evaluates the model at every level from 0 to all
channels pruned, on clean data and optionally on poisoned data, with the
incremental engine of :mod:`tf_backdoor_defense.pruning._incremental`. It returns a
:class:`SweepResult` holding the whole curve and the pruned models.

The stopping rules that turn an accuracy budget into a level are in
:mod:`tf_backdoor_defense.pruning._levels`. A list of layers is swept together by
:mod:`tf_backdoor_defense.pruning._group_sweep`.
"""

import time

import numpy as np
import pandas as pd

from tf_backdoor_defense.scoring._activations import mean_channel_activations, resolve_layer
from tf_backdoor_defense.pruning._group_sweep import sweep_layers
from tf_backdoor_defense.pruning._levels import STOPPING_RULES, LevelResult, select_level
from tf_backdoor_defense.pruning._incremental import LevelEvaluator
from tf_backdoor_defense.masks._wrapper import PruneByActivation, channel_count, wrap_layers
from tf_backdoor_defense.metrics import count_attack_successes
from tf_backdoor_defense.pruning._ranking import level_mask, rank_channels
from tf_backdoor_defense._validation import (
    check_data,
    check_model,
    check_number,
    check_target,
    check_thresholds,
    num_classes_of,
)

__all__ = ["prune_to_threshold", "SweepResult", "STOPPING_RULES", "select_level"]

class SweepResult(LevelResult):
    """What :func:`prune_to_threshold` found.

    Attributes
    ----------
    history : pandas.DataFrame
        One row per level 0..C: ``channels_pruned``, ``fraction_pruned``,
        ``pruned_channel`` (the channel removed at that level, -1 at level 0),
        ``clean_accuracy``, ``accuracy_drop``, ``attack_success_rate`` (NaN
        without poisoned data) and ``utility`` (clean accuracy minus ASR).
    ranking : numpy.ndarray
        Channels in pruning order.
    mean_activations : numpy.ndarray
        Mean activation per channel on the ranking data.
    layer : str
        The pruned layer.
    thresholds : tuple of float
    levels : dict
        ``{threshold: channels pruned}``.
    masks : dict
        ``{threshold: mask}`` (1 = kept).
    models : dict
        ``{threshold: pruned model}``: copies with the layer wrapped in
        ``PruneByActivation``.
    timings : dict
        Seconds spent on statistics and on the sweep.
    """

    def __init__(self, *, model, layer, history, ranking, mean_activations, thresholds, levels,
                 base_mask, stopping_rule, timings):
        self.layer = layer
        self.ranking = ranking
        self.mean_activations = mean_activations
        self._base_mask = base_mask
        super().__init__(model=model, history=history, thresholds=thresholds, levels=levels,
                         stopping_rule=stopping_rule, timings=timings)

    def _masks_at(self, level):
        return self.mask_at(level)

    def mask_at(self, level):
        """Mask with the first ``level`` ranked channels pruned (and any pruned before)."""
        return level_mask(self.ranking, level) * self._base_mask

    def pruned_model(self, level):
        """A new model with the first ``level`` ranked channels pruned."""
        return wrap_layers(self._model, [self.layer], masks={self.layer: self.mask_at(level)})

    def summary(self):
        """The chosen level per threshold as a DataFrame."""
        rows = []
        for threshold, level in self.levels.items():
            row = self.history.iloc[level]
            rows.append({"max_accuracy_drop": threshold, "channels_pruned": level,
                         "fraction_pruned": row["fraction_pruned"],
                         "clean_accuracy": row["clean_accuracy"],
                         "attack_success_rate": row["attack_success_rate"]})
        return pd.DataFrame(rows)

    def __repr__(self):
        return (f"SweepResult(layer={self.layer!r}, channels={self.ranking.size}, "
                f"levels={self.levels})")


def prune_to_threshold(model, clean_data, *, layer=None, max_accuracy_drop=0.04,
                       poisoned_data=None, target=None, stopping_rule="largest_within",
                       ranking_data=None, ranking=None, batch_size=256, steps=None):
    """Prune the channels of ``layer`` by mean activation until clean accuracy drops.

    The channels are ranked by increasing mean activation on clean data (ties
    by index) and pruned one at a time. Every level, from 0 to all channels, is
    evaluated exactly on ``clean_data`` and, when given, ``poisoned_data``.
    ``model`` is never modified: the pruned models are copies.

    With a list of layers, they are pruned together: each keeps its own
    ranking and every level prunes the same fraction of each (see
    :mod:`tf_backdoor_defense.pruning._group_sweep`); the result is then a
    :class:`~tf_backdoor_defense.pruning._group_sweep.GroupSweepResult`.

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network (Functional or Sequential, one input and output).
    clean_data : (x, y) arrays or tf.data.Dataset
        Clean labelled data on which accuracy and the threshold are measured.
    layer : str or list of str, default=None
        Conv or Dense layer to prune; default: the last convolutional layer.
        Several names prune those layers together.
    max_accuracy_drop : float or list of float, default=0.04
        Allowed drop in clean accuracy, in absolute points (0.04 = 4 points).
        A list such as ``[0.02, 0.04, 0.10]`` gives one model per value.
    poisoned_data : (x, y) arrays or tf.data.Dataset, default=None
        Triggered inputs, labelled as described in :mod:`tf_backdoor_defense.metrics`.
    target : None, int, "untargeted", array, dict or callable, default=None
        How to read the poisoned labels (see :mod:`tf_backdoor_defense.metrics`).
    stopping_rule : {"largest_within", "first_reaching"}, default="largest_within"
        See :mod:`tf_backdoor_defense.pruning._levels`.
    ranking_data : (x, y) arrays or tf.data.Dataset, default=None
        Data for the activation statistics; default: ``clean_data``. Pass a
        separate set to keep ranking and threshold selection apart.
    ranking : sequence of int, default=None
        A precomputed pruning order (skips the statistics; one layer only).
    batch_size : int, default=256
    steps : int, default=None
        Several layers only: the number of levels after level 0 (default: the
        widest layer's channel count, so that layer loses one channel per level).

    Returns
    -------
    SweepResult, or GroupSweepResult for several layers

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((6, 6, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"), keras.layers.Flatten(),
    ...     keras.layers.Dense(4, activation="relu", name="fc"),
    ...     keras.layers.Dense(2, activation="softmax")])
    >>> x = np.random.default_rng(0).random((32, 6, 6, 1), dtype=np.float32)
    >>> y = np.argmax(model.predict(x, verbose=0), axis=1)
    >>> result = prune_to_threshold(model, (x, y), max_accuracy_drop=0.10)
    >>> list(result.history.columns[:4])
    ['channels_pruned', 'fraction_pruned', 'pruned_channel', 'clean_accuracy']
    >>> result.history["channels_pruned"].tolist()
    [0, 1, 2, 3, 4]
    >>> float(result.history["clean_accuracy"].iloc[0])
    1.0
    >>> both = prune_to_threshold(model, (x, y), layer=["conv", "fc"], steps=2)
    >>> both.history[["level", "pruned_conv", "pruned_fc", "channels_pruned"]].values.tolist()
    [[0, 0, 0, 0], [1, 2, 2, 4], [2, 4, 4, 8]]
    """
    check_model(model)
    thresholds = check_thresholds(max_accuracy_drop)
    if stopping_rule not in STOPPING_RULES:
        raise ValueError(f"The 'stopping_rule' parameter must be one of {list(STOPPING_RULES)}. "
                         f"Got {stopping_rule!r} instead.")
    batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
    layers = _layer_list(layer)
    if len(layers) == 1:
        layer = layers[0]
    found = resolve_layer(model, layer) if len(layers) <= 1 else None
    if found is None:
        if ranking is not None:
            raise ValueError("The 'ranking' parameter applies to one layer; several layers are "
                             "each ranked by their own mean activations.")
        if steps is not None:
            steps = int(check_number(steps, "steps", 1, integer=True))
        for name in layers:
            resolve_layer(model, name)
    elif steps is not None:
        raise ValueError("The 'steps' parameter applies to several layers; one layer is swept "
                         "channel by channel.")
    classes = num_classes_of(model)
    clean = check_data(clean_data, "clean_data", model=model)
    poisoned = None
    if poisoned_data is not None:
        target = check_target(target, classes)
        poisoned = check_data(poisoned_data, "poisoned_data", model=model)
    elif target is not None:
        raise ValueError("The 'target' parameter needs `poisoned_data`.")

    if found is None:
        stats_data = clean if ranking_data is None else check_data(ranking_data, "ranking_data",
                                                                   model=model)
        return sweep_layers(model, clean, poisoned, target, layers, thresholds=thresholds,
                            stopping_rule=stopping_rule, ranking_data=stats_data,
                            batch_size=batch_size, steps=steps)

    started = time.perf_counter()
    means = None
    if ranking is None:
        stats_data = clean if ranking_data is None else check_data(ranking_data, "ranking_data",
                                                                   model=model)
        means = mean_channel_activations(model, stats_data, layer=found.name, batch_size=batch_size)
        ranking = rank_channels(means)
    channels = channel_count(found)
    ranking = _check_ranking(ranking, channels)
    stats_seconds = time.perf_counter() - started

    started = time.perf_counter()
    evaluator = LevelEvaluator(model, found, max_rows=max(8192, batch_size))
    correct = np.zeros(channels + 1, dtype=np.int64)
    total = 0
    for x, y in clean.batches(batch_size):
        predictions = evaluator.predictions(x, ranking)
        correct += np.sum(predictions == y[None, :], axis=1)
        total += y.size
    accuracy = correct / total
    asr = np.full(channels + 1, np.nan)
    if poisoned is not None:
        success = np.zeros(channels + 1, dtype=np.int64)
        attacked = 0
        for x, y in poisoned.batches(batch_size):
            predictions = evaluator.predictions(x, ranking)
            counts = [count_attack_successes(p, y, target) for p in predictions]
            success += np.array([c[0] for c in counts])
            attacked += counts[0][1]
        if attacked == 0:
            raise ValueError("No input of `poisoned_data` is attacked: every true label equals "
                             "its target.")
        asr = success / attacked
    sweep_seconds = time.perf_counter() - started

    levels = np.arange(channels + 1)
    history = pd.DataFrame({
        "channels_pruned": levels,
        "fraction_pruned": levels / channels,
        "pruned_channel": np.concatenate([[-1], ranking]),
        "clean_accuracy": accuracy,
        "accuracy_drop": accuracy[0] - accuracy,
        "attack_success_rate": asr,
        "utility": accuracy - asr,
    })
    chosen = {t: select_level(accuracy, t, stopping_rule) for t in thresholds}
    base_mask = found.get_mask() if isinstance(found, PruneByActivation) else np.ones(channels, np.float32)
    if means is None:
        means = np.full(channels, np.nan)
    return SweepResult(model=model, layer=found.name, history=history, ranking=ranking,
                       mean_activations=np.asarray(means), thresholds=thresholds, levels=chosen,
                       base_mask=base_mask, stopping_rule=stopping_rule,
                       timings={"statistics_seconds": stats_seconds, "sweep_seconds": sweep_seconds})


def _layer_list(layer):
    """``layer`` as a list of names: [] for the default, one or several."""
    if layer is None or isinstance(layer, str):
        return [] if layer is None else [layer]
    if not isinstance(layer, (list, tuple)) or not all(isinstance(n, str) for n in layer):
        raise TypeError(f"The 'layer' parameter must be a layer name or a list of names. "
                        f"Got {layer!r} instead.")
    if not layer:
        raise ValueError("The 'layer' parameter must name at least one layer.")
    if len(set(layer)) != len(layer):
        raise ValueError(f"The 'layer' parameter names a layer twice: {list(layer)}.")
    return list(layer)


def _check_ranking(ranking, channels):
    ranking = np.asarray(ranking)
    if ranking.shape != (channels,) or not np.issubdtype(ranking.dtype, np.integer) or \
            sorted(ranking.tolist()) != list(range(channels)):
        raise ValueError(f"The 'ranking' parameter must be a permutation of the {channels} "
                         f"channel indices. Got {ranking!r} instead.")
    return ranking.astype(np.int64)

"""The pruning sweep over several layers at once.

A backdoor need not live in one layer: :func:`prune_to_threshold` with a list
of layers (for example the last convolution and the penultimate dense layer)
prunes them together. Each layer keeps its own ranking, increasing mean
activation on clean data with ties by index, exactly as in the one-layer
sweep, and level ``k`` of ``steps`` prunes ``round(k / steps * C)`` of the
``C`` channels of every layer: the same fraction of each, the rule of
:func:`tf_backdoor_defense.defenses._search.search_pruning_level`, which shares these
rankings. Channels pruned before (an already wrapped layer) come first in
their layer's ranking and stay pruned at every level.

Every level is evaluated exactly, on one masked copy of the model whose masks
are set level by level. The part of the network before the pruned layers runs
once per batch; only the rest runs once per level, so a sweep costs one pass
of the prefix and ``steps + 1`` passes of the rest over the clean (and
poisoned) data.
"""

import time

import numpy as np
import pandas as pd

from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.scoring._activations import mean_channel_activations, resolve_layer
from tf_backdoor_defense.pruning._incremental import replay_nodes, split_after_inputs_of
from tf_backdoor_defense.pruning._levels import LevelResult, select_level
from tf_backdoor_defense.masks._wrapper import PruneByActivation, channel_count, wrap_layers
from tf_backdoor_defense.metrics import count_attack_successes, labels_from_outputs
from tf_backdoor_defense.pruning._ranking import level_mask, rank_channels

__all__ = ["GroupSweepResult", "sweep_layers", "layer_rankings", "fraction_masks"]


def layer_rankings(model, names, data, batch_size=256):
    """Per-layer pruning orders on ``data``, with the channels already pruned first.

    Returns ``(rankings, means, base_masks)``, each a dict keyed by layer name:
    channels in pruning order (increasing mean activation, ties by index,
    channels a ``PruneByActivation`` wrapper already masks before all others),
    the mean activations, and the masks the model already has (all ones for an
    unwrapped layer).

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
    for name in names:
        layer = resolve_layer(model, name)
        base_masks[name] = (layer.get_mask() if isinstance(layer, PruneByActivation)
                            else np.ones(channel_count(layer), np.float32))
        means[name] = mean_channel_activations(model, data, layer=name, batch_size=batch_size)
        order = rank_channels(means[name])
        already = base_masks[name][order] == 0
        rankings[name] = np.concatenate([order[already], order[~already]])
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


class GroupSweepResult(LevelResult):
    """What :func:`prune_to_threshold` found when it pruned several layers together.

    Attributes
    ----------
    layers : list of str
        The pruned layers, in the order given.
    history : pandas.DataFrame
        One row per level 0..steps: ``level``, ``fraction_pruned``,
        ``channels_pruned`` (all layers together), one ``pruned_<layer>``
        count per layer, ``clean_accuracy``, ``accuracy_drop``,
        ``attack_success_rate`` (NaN without poisoned data) and ``utility``.
    rankings : dict
        ``{layer: channels in pruning order}``.
    mean_activations : dict
        ``{layer: mean activation per channel}`` on the ranking data.
    thresholds : tuple of float
    levels : dict
        ``{threshold: level}`` (a row of ``history``).
    masks : dict
        ``{threshold: {layer: mask}}`` (1 = kept).
    models : dict
        ``{threshold: pruned model}``: copies with the layers wrapped in
        ``PruneByActivation``.
    timings : dict
        Seconds spent on statistics and on the sweep.
    """

    def __init__(self, *, model, layers, history, rankings, mean_activations, thresholds,
                 levels, base_masks, steps, stopping_rule, timings):
        self.layers = layers
        self.rankings = rankings
        self.mean_activations = mean_activations
        self.steps = steps
        self._base_masks = base_masks
        super().__init__(model=model, history=history, thresholds=thresholds, levels=levels,
                         stopping_rule=stopping_rule, timings=timings)

    def _masks_at(self, level):
        return self.masks_at(level)

    def masks_at(self, level):
        """``{layer: mask}`` at ``level`` (0..steps), with any channels pruned before."""
        return fraction_masks(self.rankings, self._base_masks, level / self.steps)

    def pruned_model(self, level):
        """A new model with every layer pruned as at ``level``."""
        return wrap_layers(self._model, self.layers, masks=self.masks_at(level))

    def summary(self):
        """The chosen level per threshold as a DataFrame."""
        columns = ["fraction_pruned", "channels_pruned"] + [f"pruned_{n}" for n in self.layers] + \
            ["clean_accuracy", "attack_success_rate"]
        counts = columns[1:-2]
        rows = [{"max_accuracy_drop": t, **self.history.iloc[k][columns].to_dict()}
                for t, k in self.levels.items()]
        table = pd.DataFrame(rows, columns=["max_accuracy_drop"] + columns)
        table[counts] = table[counts].astype(np.int64)
        return table

    def __repr__(self):
        return f"GroupSweepResult(layers={self.layers!r}, steps={self.steps}, levels={self.levels})"


def sweep_layers(model, clean, poisoned, target, layers, *, thresholds, stopping_rule, ranking_data,
                 batch_size, steps):
    """The several-layer sweep behind ``prune_to_threshold(layer=[...])``.

    Arguments arrive checked (``clean``/``poisoned`` as ``LabeledData``);
    ``layers`` are names of distinct prunable layers.
    """
    started = time.perf_counter()
    rankings, means, base = layer_rankings(model, layers, ranking_data, batch_size)
    steps = max(order.size for order in rankings.values()) if steps is None else steps
    stats_seconds = time.perf_counter() - started

    started = time.perf_counter()
    masked = wrap_layers(model, layers, masks=base)
    runner = _LevelRunner(masked, layers)
    level_masks = [fraction_masks(rankings, base, level / steps) for level in range(steps + 1)]
    correct, total = runner.count(clean, level_masks, batch_size, lambda p, y: (np.sum(p == y), y.size))
    accuracy = correct / total
    asr = np.full(steps + 1, np.nan)
    if poisoned is not None:
        success, attacked = runner.count(poisoned, level_masks, batch_size,
                                         lambda p, y: count_attack_successes(p, y, target))
        if attacked == 0:
            raise ValueError("No input of `poisoned_data` is attacked: every true label equals "
                             "its target.")
        asr = success / attacked
    rows = []
    for level, masks in enumerate(level_masks):
        pruned = {f"pruned_{name}": int(np.sum(mask == 0)) for name, mask in masks.items()}
        rows.append({"level": level, "fraction_pruned": level / steps,
                     "channels_pruned": sum(pruned.values()), **pruned,
                     "clean_accuracy": accuracy[level], "attack_success_rate": asr[level]})
    history = pd.DataFrame(rows)
    history.insert(history.columns.get_loc("clean_accuracy") + 1, "accuracy_drop",
                   history["clean_accuracy"].iloc[0] - history["clean_accuracy"])
    history["utility"] = history["clean_accuracy"] - history["attack_success_rate"]
    sweep_seconds = time.perf_counter() - started

    accuracy = history["clean_accuracy"].to_numpy()
    chosen = {t: select_level(accuracy, t, stopping_rule) for t in thresholds}
    return GroupSweepResult(model=model, layers=list(layers), history=history, rankings=rankings,
                            mean_activations=means, thresholds=thresholds, levels=chosen,
                            base_masks=base, steps=steps, stopping_rule=stopping_rule,
                            timings={"statistics_seconds": stats_seconds,
                                     "sweep_seconds": sweep_seconds})


class _LevelRunner:
    """Predictions of ``masked`` level by level, its prefix run once per batch.

    The prefix is everything the pruned layers do not influence; the suffix
    (the pruned layers and all downstream of them) is replayed for each set
    of masks. When the pruned layers read the model input directly, the whole
    model runs per level.
    """

    def __init__(self, masked, names):
        self._masked = masked
        self._layers = [masked.get_layer(name) for name in names]
        sides, suffix = split_after_inputs_of(masked, self._layers)
        spec = tf.TensorSpec([None] + list(masked.inputs[0].shape[1:]), tf.float32)
        inputs = {id(t) for t in masked.inputs}
        if any(id(t) in inputs for t in sides):
            self._prefix = None
            self._suffix = tf.function(lambda x: masked(x, training=False), input_signature=[spec])
            return
        prefix = keras.Model(masked.inputs, sides)
        self._prefix = tf.function(lambda x: prefix(x, training=False), input_signature=[spec])
        side_specs = [tf.TensorSpec([None] + t.shape.as_list()[1:], t.dtype) for t in sides]
        self._suffix = tf.function(
            lambda *values: replay_nodes(suffix, sides, values, masked.outputs[0]),
            input_signature=side_specs)

    def count(self, data, level_masks, batch_size, tally):
        """Sum ``tally(labels, y) -> (hits, size)`` over ``data`` at every level."""
        hits = np.zeros(len(level_masks), dtype=np.int64)
        size = 0
        for x, y in data.batches(batch_size):
            values = [x] if self._prefix is None else self._prefix(x)
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            for level, masks in enumerate(level_masks):
                for layer in self._layers:
                    layer.set_mask(masks[layer.name])
                labels = labels_from_outputs(self._suffix(*values).numpy())
                found, counted = tally(labels, y)
                hits[level] += found
            size += counted
        return hits, size

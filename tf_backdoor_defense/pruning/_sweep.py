"""The pruning defense: rank channels, sweep every pruning level, pick thresholds.

One engine for one layer or several (one layer is a list of one).
``prune_to_threshold`` ranks each layer's channels by mean activation on
clean data, then evaluates the model at every level from 0 (nothing more
pruned) to ``steps`` (every channel pruned) on the validation data and,
when given, the poisoned validation data. Level ``k`` prunes
``round(k / steps * C)`` of the ``C`` channels of each layer, so one layer
loses one channel per level. It returns a :class:`SweepResult` holding the
whole curve and the pruned models.

Every level is evaluated exactly. The part of the network before the pruned
layers runs once per batch. With one layer, the engine also skips the
(level, example) pairs where the channel pruned at that level is zero, and
stacks the levels along the batch axis (see
:mod:`tf_backdoor_defense.pruning._incremental`); with several, the rest of the
network runs once per level on one masked copy of the model. With one layer
ranked on ``validation_data``, the statistics and the sweep's inputs come
from one pass over the network before the layer: its outputs are kept
within ``memory_budget`` bytes and recomputed beyond it.

Every pass over data runs under a ``tf.distribute`` strategy (the model's,
by default: one device outside any ``strategy.scope()``). Each worker runs
the statistics and the evaluation of every level for each of its replicas,
over that replica's rows ``r, r + R, ...`` of every batch
(:class:`~tf_backdoor_defense._distribute.ReplicaShard`), and the channel
sums and the per-level counts are added over all replicas of all workers
with ``strategy.reduce(SUM)``
(:func:`~tf_backdoor_defense._distribute.sum_over_local_replicas`). Counts
are exact, so the table, the levels and the masks are those of one device;
the channel means agree within float32 rounding, since each replica's
forward pass sees other batches (an order could only change for channels
whose means tie to that precision). The replicas of one worker run one
after the other; there is one collective per pass, not one per batch.

The stopping rules that turn an accuracy budget into a level are in
:mod:`tf_backdoor_defense.pruning._levels`.
"""

import collections.abc
import contextlib
import dataclasses
import time

import numpy as np
import pandas as pd

from tf_backdoor_defense._distribute import (
    ReplicaShard,
    local_replica_count,
    resolve_strategy,
    sum_over_local_replicas,
)
from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense._validation import (
    check_data,
    check_ranking_data,
    check_model,
    check_number,
    check_target,
    check_thresholds,
    num_classes_of,
    renamed_argument,
)
from tf_backdoor_defense.keras3._caller import with_caller_keras
from tf_backdoor_defense.masks._wrapper import layer_names, wrap_layers
from tf_backdoor_defense.metrics import (count_attack_successes, label_threshold,
                                         labels_from_outputs)
from tf_backdoor_defense.pruning._incremental import (
    PrefixCache,
    level_evaluator,
    replay_nodes,
    split_after_inputs_of,
)
from tf_backdoor_defense.pruning._levels import STOPPING_RULES, select_level
from tf_backdoor_defense.pruning._ranking import (
    base_mask,
    fraction_masks,
    pruned_first,
    rank_channels,
)
from tf_backdoor_defense.scoring._activations import _stats_fn, resolve_layer, total_channel_sums

__all__ = ["prune_to_threshold", "SweepResult", "STOPPING_RULES", "select_level",
           "DEFAULT_MEMORY_BUDGET"]

#: Bytes of the pruned layer's outputs kept between the statistics and the sweep (256 MiB).
DEFAULT_MEMORY_BUDGET = 256 * 2**20


class LazyModels(collections.abc.Mapping):
    """A read-only ``{key: model}`` mapping whose models are made when first read, then kept.

    A sweep's pruned copies cost a model copy each; most callers read one of
    them or none. Each is made in the ``tf.distribute`` strategy scope the
    mapping was made in, if any.

    >>> built = []
    >>> models = LazyModels(lambda key: built.append(key) or f"model {key}", [0.02, 0.1])
    >>> list(models), built
    ([0.02, 0.1], [])
    >>> 0.02 in models, models[0.1], models[0.1], built
    (True, 'model 0.1', 'model 0.1', [0.1])
    """

    def __init__(self, make, keys):
        self._make, self._keys, self._made = make, tuple(keys), {}
        self._strategy = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        if key not in self._made:
            scope = self._strategy.scope() if self._strategy else contextlib.nullcontext()
            with scope:
                self._made[key] = self._make(key)
        return self._made[key]

    def __contains__(self, key):  # without making the model, unlike Mapping's
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __repr__(self):
        return f"LazyModels({list(self._keys)}, made: {list(self._made)})"


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class SweepResult:
    """What :func:`prune_to_threshold` found, for one layer or several.

    Attributes
    ----------
    layers : tuple of str
        The pruned layers, in the order given.
    channels : dict
        ``{layer: number of channels}``.
    rankings : dict
        ``{layer: channels in pruning order}``; channels the model arrived
        with already pruned come first.
    mean_activations : dict
        ``{layer: mean activation per channel}`` on the ranking data (NaN
        when a precomputed ``ranking`` was given).
    history : pandas.DataFrame
        One row per level ``0..steps`` (the index is the level):
        ``channels_pruned`` (every channel whose mask is 0 at that level, in
        all layers, including channels pruned before the sweep),
        ``fraction_pruned`` (``channels_pruned`` over all the layers'
        channels), one ``pruned_<layer>`` count per layer,
        ``clean_accuracy``, ``accuracy_drop`` (from level 0),
        ``attack_success_rate`` (NaN without poisoned data) and ``utility``
        (clean accuracy minus ASR).
    thresholds : tuple of float
    levels : dict
        ``{threshold: level}`` (a row of ``history``).
    steps : int
        The last level; every channel is pruned there.
    stopping_rule : str
    timings : dict
        Seconds spent on statistics and on the sweep. With one layer ranked
        on the validation data, the statistics' pass also computes the
        sweep's inputs for that data, and its time counts as statistics.
    masks : dict
        ``{threshold: {layer: mask}}`` (1 = kept).
    models : LazyModels
        ``{threshold: pruned model}``: copies with the layers wrapped in
        ``PruneByActivation``, each made when first read.
    """

    layers: tuple
    channels: dict
    rankings: dict
    mean_activations: dict
    history: pd.DataFrame
    thresholds: tuple
    levels: dict
    steps: int
    stopping_rule: str
    timings: dict
    masks: dict
    models: collections.abc.Mapping
    _model: object
    _base_masks: dict

    def masks_at(self, level):
        """``{layer: mask}`` at ``level`` (0..steps), with any channels pruned before."""
        if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, np.integer)) or \
                not 0 <= level <= self.steps:
            raise InputError(f"The 'level' parameter must be an integer in [0, {self.steps}]. "
                             f"Got {level!r} instead.")
        return fraction_masks(self.rankings, self._base_masks, int(level) / self.steps)

    def pruned_model(self, level):
        """A new model with every layer pruned as at ``level``."""
        return wrap_layers(self._model, list(self.layers), masks=self.masks_at(level))

    @property
    def model(self):
        """The pruned model, when exactly one threshold was asked for."""
        if len(self.models) != 1:
            raise AttributeError(
                f"Several thresholds were asked for ({list(self.models)}); use `models[threshold]`."
            )
        return next(iter(self.models.values()))

    @property
    def baseline_accuracy(self):
        """Clean accuracy before pruning (level 0)."""
        return float(self.history["clean_accuracy"].iloc[0])

    def summary(self):
        """The chosen level per threshold as a DataFrame."""
        counts = ["channels_pruned"] + [f"pruned_{name}" for name in self.layers]
        columns = ["channels_pruned", "fraction_pruned"] + counts[1:] + \
            ["clean_accuracy", "attack_success_rate"]
        rows = [{"max_accuracy_drop": t, **self.history.iloc[k][columns].to_dict()}
                for t, k in self.levels.items()]
        table = pd.DataFrame(rows, columns=["max_accuracy_drop"] + columns)
        table[counts] = table[counts].astype(np.int64)
        return table

    def __repr__(self):
        return (f"SweepResult(layers={self.layers!r}, channels={self.channels}, "
                f"steps={self.steps}, levels={self.levels})")


@with_caller_keras
def prune_to_threshold(model, validation_data, *, layers=None, max_accuracy_drop=0.04,
                       ranking_data=None, poisoned_validation_data=None, target=None,
                       stopping_rule="largest_within", ranking=None, steps=None, batch_size=256,
                       memory_budget=DEFAULT_MEMORY_BUDGET, strategy=None, layer=None,
                       poisoned_data=None):
    """Prune the channels of ``layers`` by mean activation until clean accuracy drops.

    The channels of each layer are ranked by increasing mean activation on
    ``ranking_data`` (ties by index) and pruned in that order; level ``k`` of
    ``steps`` prunes ``round(k / steps * C)`` of the ``C`` channels of each
    layer. Every level, from 0 to all channels, is evaluated exactly on
    ``validation_data`` and, when given, ``poisoned_validation_data``.
    ``model`` is never modified: the pruned models are copies.

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network (Functional or Sequential, one input and output).
    validation_data : (x, y) arrays or tf.data.Dataset
        Clean labelled data on which accuracy is measured and the level is
        chosen.
    layers : str or list of str, default=None
        Conv or Dense layer(s) to prune; default: the last convolutional
        layer. Several names prune those layers together.
    max_accuracy_drop : float or list of float, default=0.04
        Allowed drop in clean accuracy, in absolute points (0.04 = 4 points).
        A list such as ``[0.02, 0.04, 0.10]`` gives one model per value.
    ranking_data : (x, y) arrays, x alone, or a tf.data.Dataset of (x, y) or of x, default=None
        Clean data for the activation statistics; default:
        ``validation_data``. Pass a separate set to keep ranking and level
        selection apart.
    poisoned_validation_data : (x, y) arrays or tf.data.Dataset, default=None
        Triggered inputs beside ``validation_data``, labelled as described in
        :mod:`tf_backdoor_defense.metrics`; gives the ASR of every level.
    target : None, int, "untargeted", array, dict or callable, default=None
        How to read the poisoned labels (see :mod:`tf_backdoor_defense.metrics`).
    stopping_rule : {"largest_within", "first_reaching"}, default="largest_within"
        See :mod:`tf_backdoor_defense.pruning._levels`.
    ranking : sequence of int, or dict, default=None
        A precomputed pruning order (skips the statistics): a permutation of
        the channel indices for one layer, or ``{layer: permutation}``.
    steps : int, default=None
        Several layers only: the number of levels after level 0 (default: the
        widest layer's channel count, so that layer loses one channel per
        level). One layer is swept channel by channel.
    batch_size : int, default=256
    memory_budget : int, default=268435456 (256 MiB)
        Bytes kept between the statistics and the sweep when one layer is
        ranked on ``validation_data`` (no ``ranking_data``, no ``ranking``).
        The network up to the pruned layer (and the pooling after it) then
        runs once over ``validation_data``: the values the rest of the
        network reads from it, and the labels, are kept for the first
        batches that fit in the budget, and the other batches run through
        it again. A ``tf.data.Dataset`` that does not fit is read again
        whole. 0 keeps nothing. The results do not depend on it. The lab's
        face network keeps 4.8 kB per example (``conv_3`` pooled to 5x4x60
        in float32, and the label), so 256 MiB holds about 55,000 examples.
        Under a strategy, each replica of a worker keeps its share of it.
    strategy : tf.distribute.Strategy, default=None
        Runs the statistics and the evaluation of every level on the
        strategy's replicas and workers (each takes its rows of every batch)
        and adds their channel sums and counts with ``strategy.reduce``;
        every worker must pass the same data. The history, levels and masks
        are those of one device. Default: ``model.distribute_strategy`` (the
        strategy whose ``scope()`` the call runs in, else one device).
    layer, poisoned_data : deprecated
        The old names of ``layers`` and ``poisoned_validation_data``; they
        still work in this release, with a ``DeprecationWarning``.

    Returns
    -------
    SweepResult

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
    >>> result.layers, list(result.history.columns[:4])
    (('conv',), ['channels_pruned', 'fraction_pruned', 'pruned_conv', 'clean_accuracy'])
    >>> result.history["channels_pruned"].tolist()
    [0, 1, 2, 3, 4]
    >>> float(result.history["clean_accuracy"].iloc[0])
    1.0
    >>> both = prune_to_threshold(model, (x, y), layers=["conv", "fc"], steps=2)
    >>> both.history[["pruned_conv", "pruned_fc", "channels_pruned"]].values.tolist()
    [[0, 0, 0], [2, 2, 4], [4, 4, 8]]
    """
    layers = renamed_argument("prune_to_threshold", "layer", layer, "layers", layers)
    poisoned_validation_data = renamed_argument("prune_to_threshold", "poisoned_data", poisoned_data,
                                                "poisoned_validation_data", poisoned_validation_data)
    check_model(model)
    thresholds = check_thresholds(max_accuracy_drop)
    if stopping_rule not in STOPPING_RULES:
        raise InputError(f"The 'stopping_rule' parameter must be one of {list(STOPPING_RULES)}. "
                         f"Got {stopping_rule!r} instead.")
    batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
    memory_budget = int(check_number(memory_budget, "memory_budget", 0, integer=True))
    found = {name: resolve_layer(model, name) for name in layer_names(model, layers)}
    names = list(found)
    if steps is not None:
        if len(names) == 1:
            raise InputError("The 'steps' parameter applies to several layers; one layer is swept "
                             "channel by channel.")
        steps = int(check_number(steps, "steps", 1, integer=True))
    classes = num_classes_of(model)
    validation = check_data(validation_data, "validation_data", model=model)
    poisoned = None
    if poisoned_validation_data is not None:
        target = check_target(target, classes)
        poisoned = check_data(poisoned_validation_data, "poisoned_validation_data", model=model)
    elif target is not None:
        raise InputError("The 'target' parameter needs `poisoned_validation_data`.")

    strategy = resolve_strategy(strategy, model)

    def shard(data, replica, replicas):
        return data if replicas == 1 else ReplicaShard(data, batch_size, replica, replicas)

    started = time.perf_counter()
    evaluator = None
    caches = {}  # {replica: (PrefixCache, its shard of validation)}
    if len(names) == 1:
        evaluator = level_evaluator(model, found[names[0]], max_rows=max(8192, batch_size))
    base = {name: base_mask(found[name]) for name in names}
    if ranking is None:
        # One layer ranked on validation_data: one pass over the network before the layer
        # gives the statistics and the sweep's inputs.
        one_pass = ranking_data is None and evaluator is not None
        stats_data = validation if ranking_data is None else check_ranking_data(
            ranking_data, "ranking_data", model=model)
        budget = memory_budget // local_replica_count(strategy)

        def statistics(replica, replicas):
            part = shard(stats_data, replica, replicas)
            if one_pass:
                cache = PrefixCache(evaluator, budget)
                caches[replica] = (cache, part)
                sums = {names[0]: cache.channel_sums(part, batch_size)}
            else:
                sums = {name: total_channel_sums(part.batches(batch_size),
                                                 _stats_fn(model, found[name])) for name in names}
            return {name: (np.zeros(base[name].size) if totals is None else totals, count)
                    for name, (totals, count) in sums.items()}

        summed = sum_over_local_replicas(strategy, statistics)
        if any(float(count) == 0 for _, count in summed.values()):
            raise ValueError("`data` is empty: it has no examples.")
        means = {name: totals / float(count) for name, (totals, count) in summed.items()}
        rankings = {name: pruned_first(rank_channels(means[name]), base[name]) for name in names}
    else:
        orders = _check_rankings(ranking, found)
        rankings = {name: pruned_first(orders[name], base[name]) for name in names}
        means = {name: np.full(orders[name].size, np.nan) for name in names}
    channels = {name: int(order.size) for name, order in rankings.items()}
    steps = max(channels.values()) if steps is None else steps
    stats_seconds = time.perf_counter() - started

    started = time.perf_counter()
    level_masks = [fraction_masks(rankings, base, level / steps) for level in range(steps + 1)]
    if evaluator is not None:
        predict = _OneLayerLevels(model, found[names[0]], rankings[names[0]], level_masks,
                                  batch_size, evaluator=evaluator)
    else:
        predict = _MaskedLevels(model, names, base, level_masks)
    accuracy_counts = lambda p, y: (int(np.sum(p == y)), y.size)  # noqa: E731

    def counts(replica, replicas):
        if replica in caches:
            cache, part = caches.pop(replica)
            found_counts = {"clean": _count(((predict.from_prefix(outputs), y)
                                             for outputs, y in cache.outputs(part, batch_size)),
                                            accuracy_counts)}
        else:
            found_counts = {"clean": _tally(predict, shard(validation, replica, replicas),
                                            batch_size, accuracy_counts)}
        if poisoned is not None:
            found_counts["poisoned"] = _tally(predict, shard(poisoned, replica, replicas),
                                              batch_size,
                                              lambda p, y: count_attack_successes(p, y, target))
        return {key: (np.zeros(steps + 1, np.int64) if hits is None else hits, size)
                for key, (hits, size) in found_counts.items()}

    summed = {key: (np.rint(hits).astype(np.int64), int(np.rint(size)))
              for key, (hits, size) in sum_over_local_replicas(strategy, counts).items()}
    correct, total = summed["clean"]
    accuracy = correct / total
    asr = np.full(steps + 1, np.nan)
    if poisoned is not None:
        success, attacked = summed["poisoned"]
        if attacked == 0:
            raise InputError("No input of `poisoned_validation_data` is attacked: every true "
                             "label equals its target.")
        asr = success / attacked
    sweep_seconds = time.perf_counter() - started

    pruned = {f"pruned_{name}": np.array([int(np.sum(masks[name] == 0)) for masks in level_masks],
                                         dtype=np.int64) for name in names}
    channels_pruned = np.sum(list(pruned.values()), axis=0).astype(np.int64)
    history = pd.DataFrame({
        "channels_pruned": channels_pruned,
        "fraction_pruned": channels_pruned / sum(channels.values()),
        **pruned,
        "clean_accuracy": accuracy,
        "accuracy_drop": (correct[0] - correct) / total,
        "attack_success_rate": asr,
        "utility": accuracy - asr,
    })
    chosen = {t: select_level(accuracy, t, stopping_rule) for t in thresholds}
    return SweepResult(
        layers=tuple(names), channels=channels, rankings=rankings, mean_activations=means,
        history=history, thresholds=thresholds, levels=chosen, steps=steps,
        stopping_rule=stopping_rule,
        timings={"statistics_seconds": stats_seconds, "sweep_seconds": sweep_seconds},
        masks={t: level_masks[k] for t, k in chosen.items()},
        models=LazyModels(lambda t: wrap_layers(model, names, masks=level_masks[chosen[t]]),
                          chosen),
        _model=model, _base_masks=base)




def _check_rankings(ranking, found):
    """``ranking`` (one permutation, or ``{layer: permutation}``) as ``{layer: int64 array}``."""
    if not isinstance(ranking, dict):
        if len(found) != 1:
            raise InputError("A 'ranking' sequence applies to one layer; for several layers pass "
                             "a {layer: permutation} dict.")
        ranking = {next(iter(found)): ranking}
    if set(ranking) != set(found):
        raise InputError(f"The 'ranking' parameter must give one permutation for each of the "
                         f"layers {list(found)}. Got {sorted(ranking)} instead.")
    orders = {}
    for name, layer in found.items():
        channels = int(base_mask(layer).size)
        order = np.asarray(ranking[name])
        if order.shape != (channels,) or not np.issubdtype(order.dtype, np.integer) or \
                sorted(order.tolist()) != list(range(channels)):
            raise InputError(f"The 'ranking' parameter must be a permutation of the {channels} "
                             f"channel indices of layer '{name}'. Got {ranking[name]!r} instead.")
        orders[name] = order.astype(np.int64)
    return orders


def _tally(predict, data, batch_size, count):
    """Sum ``count(labels, y) -> (hits, size)`` over ``data`` at every level."""
    return _count(((predict(x), y) for x, y in data.batches(batch_size)), count)


def _count(predicted, count):
    """Sum ``count(labels, y)`` over ``(labels at every level, y)`` batches."""
    hits, size = None, 0
    for levels, y in predicted:
        counted = [count(labels, y) for labels in levels]
        found = np.array([c[0] for c in counted], dtype=np.int64)
        hits = found if hits is None else hits + found
        size += counted[0][1]
    return hits, size


class _OneLayerLevels:
    """Predicted labels at every level for one layer: the incremental fast path.

    :class:`~tf_backdoor_defense.pruning._incremental.LevelEvaluator` gives the
    predictions with the first ``n`` channels of the ranking pruned, for every
    ``n``; level ``k`` reads row ``n_k``, the number of ranked channels its
    mask prunes. Channels the layer's wrapper already masks output zero and
    cost nothing.
    """

    def __init__(self, model, layer, order, level_masks, batch_size, evaluator=None):
        self._evaluator = evaluator if evaluator is not None else \
            level_evaluator(model, layer, max_rows=max(8192, batch_size))
        self._order = order
        name = layer.name
        self._rows = np.array([_ranked_prefix(order, masks[name]) for masks in level_masks])

    def __call__(self, x):
        return self._evaluator.predictions(x, self._order)[self._rows]

    def from_prefix(self, outputs):
        """:meth:`__call__` from the prefix's outputs for a batch (see ``PrefixCache``)."""
        return self._evaluator.predictions_from(outputs, self._order)[self._rows]


def _ranked_prefix(order, mask):
    """How many channels at the start of ``order`` ``mask`` prunes (they come first)."""
    kept = np.flatnonzero(np.asarray(mask)[order] != 0)
    return int(kept[0]) if kept.size else int(order.size)


class _MaskedLevels:
    """Predicted labels at every level for several layers, on one masked copy.

    The prefix is everything the pruned layers do not influence; the suffix
    (the pruned layers and all downstream of them) is replayed for each set
    of masks. When the pruned layers read the model input directly, the whole
    model runs per level.
    """

    def __init__(self, model, names, base, level_masks):
        masked = wrap_layers(model, names, masks=base)
        self._level_masks = level_masks
        self._threshold = label_threshold(masked)
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

    def __call__(self, x):
        values = [x] if self._prefix is None else self._prefix(x)
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        labels = []
        for masks in self._level_masks:
            for layer in self._layers:
                layer.set_mask(masks[layer.name])
            labels.append(labels_from_outputs(self._suffix(*values).numpy(), self._threshold))
        return np.stack(labels)

"""Exact, incremental evaluation of a model at every pruning level of one layer.

A naive sweep re-runs the whole network once per level. This engine splits
the graph at the pruned layer instead:

1. The *prefix* (everything up to the pruned layer, plus any tensor the rest
   of the graph needs from before it) runs once per batch.
2. The mask is applied as late as is exact: it commutes with layers that act
   on each channel alone and map 0 to 0 (pooling, dropout, ReLU, padding,
   cropping), and with ``Flatten`` (channel ``c`` of a flattened HxWxC tensor
   sits at ``c, c+C, c+2C, ...``). Those layers also run once per batch.
3. Pruning a channel that is exactly zero for an example changes nothing
   for that example: its prediction at that level is the previous level's.
   Only the (level, example) pairs where the newly pruned channel is active
   are evaluated; dormant channels, which pruning removes first, cost nothing.
   Once an example's last active channel is pruned, the suffix reads only
   zeros from the layer: when it reads nothing else, that prediction is the
   same for every example and is computed once per batch.
4. The *suffix* runs for all those pairs at once, stacked along the batch
   axis, so each call is one large, efficient batch. When the layers that
   read the masked output are linear in its channels (convolutions, dense
   layers, maybe after a ``Flatten``), they run on the channels that are not
   zero for every example of the batch alone (see
   :mod:`~tf_backdoor_defense.pruning._subset`); a row whose two best
   outputs are nearly tied is run again the exact way.
5. The statistics that rank the channels can come from the same pass over
   the prefix (:meth:`LevelEvaluator.prefix_with_sums`): :class:`PrefixCache`
   keeps the prefix's outputs for the data set within a memory budget, and
   the sweep reads them instead of running the prefix again. Batches beyond
   the budget are run through the prefix again, so memory stays flat.

Every predicted label equals what an explicitly masked model computes.
"""

import collections
import weakref

import numpy as np

from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.graph._replay import downstream_nodes, replay_nodes, run_layer, \
    topological_nodes
from tf_backdoor_defense.masks._registry import (IDENTITY_AT_INFERENCE, PADDING_CROPPING_TYPES,
                                                 POOLING_TYPES, ZERO_PRESERVING_ACTIVATIONS)
from tf_backdoor_defense.masks._wrapper import channel_axis
from tf_backdoor_defense.metrics import label_threshold
from tf_backdoor_defense.pruning._subset import output_labels, subset_rows
from tf_backdoor_defense.scoring._activations import channel_sum_fn, total_channel_sums

__all__ = ["LevelEvaluator", "PrefixCache", "level_evaluator"]

# {model: {(layer name, id, max_rows): LevelEvaluator}}. An evaluator holds the model's
# layers and compiled functions but only a weak reference to the model, so the entry
# dies with the model, and sweeps of one model reuse the traced functions.
_EVALUATORS = weakref.WeakKeyDictionary()

#: Rows run on a subset of the channels only when it keeps at most this share of them:
#: on the zoo's MNIST nets, batches that keep two thirds or more ran slower that way (the
#: margin check and the cut kernels cost more than the channels left out save); the lab's
#: face network keeps 14 of 60.
SUBSET_MAX_FRACTION = 0.5


def _commutes_with_mask(layer):
    """True when ``layer(x * m) == layer(x) * m`` for a 0/1 channel mask ``m``."""
    data_format = getattr(layer, "data_format", "channels_last")
    if data_format not in (None, "channels_last"):
        return False
    if isinstance(layer, keras.layers.ReLU):
        return float(layer.threshold) == 0.0
    if isinstance(layer, IDENTITY_AT_INFERENCE + POOLING_TYPES + PADDING_CROPPING_TYPES):
        return True
    if isinstance(layer, keras.layers.Activation):
        name = getattr(layer.activation, "__name__", "")
        return name in ZERO_PRESERVING_ACTIVATIONS
    if isinstance(layer, keras.layers.LeakyReLU):
        return True
    return False


def split_after_inputs_of(model, layers):
    """Split ``model`` where the first of ``layers`` starts.

    Returns ``(sides, suffix)``: ``suffix`` holds, in order, the nodes of
    ``layers`` and every node downstream of them; ``sides`` the tensors those
    nodes read from the rest of the graph (the prefix, which does not depend on
    ``layers``).
    """
    return downstream_nodes(topological_nodes(model), layers=layers)


class LevelEvaluator:
    """Evaluate ``model`` with a layer's channels masked, for many masks at once.

    Parameters
    ----------
    model : tf_keras.Model
        A Functional or Sequential model with one input and one output.
    layer : keras.layers.Layer
        The Conv/Dense layer (or ``PruneByActivation``) whose output channels
        are masked. It must be called exactly once in ``model``.
    max_rows : int, default=8192
        Upper bound on the stacked batch (levels x examples) of one suffix call.
    """

    def __init__(self, model, layer, max_rows=8192):
        if not getattr(model, "_is_graph_network", False):
            raise InputError("The incremental sweep needs a Functional or Sequential model.")
        self._model = weakref.ref(model)
        self.layer = layer
        self._threshold = label_threshold(model)  # for a one-unit output
        self.max_rows = int(max_rows)
        self.channels = int(layer.output.shape[channel_axis(layer)])
        self._axis_last = channel_axis(layer) == -1
        #: Run rows on the batch's non-zero channels where that applies (``subset_available``);
        #: False runs every row on all channels, the masked model's way (same labels).
        self.use_channel_subset = True
        self._build(model)

    @property
    def subset_available(self):
        """Whether the layers reading this layer let rows run on a channel subset
        (:mod:`~tf_backdoor_defense.pruning._subset`)."""
        return self._subset is not None

    @property
    def model(self):
        """The evaluated model (held weakly: None once it is gone)."""
        return self._model()

    # -- graph split -----------------------------------------------------
    def _build(self, model):
        nodes = topological_nodes(model)
        (start,) = [n for n in nodes if n.layer is self.layer]
        consumers = {}
        for node in nodes:
            for tensor in node.keras_inputs:
                consumers.setdefault(id(tensor), []).append(node)

        # Advance the masking point through mask-commuting, single-consumer layers.
        frontier = self.layer.output
        expand = "channel"
        head = [start]
        while self._axis_last:
            users = consumers.get(id(frontier), [])
            if len(users) != 1 or len(users[0].keras_inputs) != 1:
                break
            nxt = users[0]
            if any(t is frontier for t in model.outputs):
                break
            if _commutes_with_mask(nxt.layer) and expand == "channel":
                pass
            elif isinstance(nxt.layer, keras.layers.Flatten) and expand == "channel":
                expand = "flatten"
            else:
                break
            head.append(nxt)
            frontier = nxt.outputs[0] if isinstance(nxt.outputs, (list, tuple)) else nxt.outputs
        self._frontier = frontier
        self._expand = expand
        frontier_shape = frontier.shape.as_list()
        self._positions = int(np.prod(frontier_shape[1:])) // self.channels if expand == "flatten" else 1

        # Nodes downstream of the frontier form the suffix; anything else they
        # read from earlier in the graph is a side input computed by the prefix.
        head_ids = {id(n) for n in head}
        sides, suffix = downstream_nodes([n for n in nodes if id(n) not in head_ids],
                                         tensors=[frontier])
        downstream_tensors = {id(t) for n in suffix for t in tf.nest.flatten(n.outputs)}
        if not any(id(t) in downstream_tensors for t in model.outputs) and \
                model.outputs[0] is not frontier:
            raise InputError(f"The model's output does not depend on layer '{self.layer.name}'.")
        self._sides = sides
        self._suffix = suffix
        self._output = model.outputs[0]
        self._prefix = keras.Model(model.inputs, [frontier] + sides)
        spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)
        self.prefix = tf.function(lambda x: self._prefix(x, training=False), input_signature=[spec])
        self._prefix_with_sums = tf.function(
            channel_sum_fn(model, self.layer, outputs=[frontier] + sides), input_signature=[spec])
        self._frontier_rank = len(frontier_shape)
        side_specs = [tf.TensorSpec([None] + t.shape.as_list()[1:], t.dtype) for t in sides]
        rows_spec = [
            tf.TensorSpec([None] + frontier_shape[1:], frontier.dtype),
            side_specs,
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, self.channels], tf.float32),
        ]
        self._run_rows = tf.function(self._rows_outputs, input_signature=rows_spec)
        self._batch_info = tf.function(self._frontier_info, input_signature=rows_spec[:1])
        self._subset = subset_rows(frontier, expand, self.channels, suffix,
                                   self._output) if self._axis_last else None
        if self._subset is not None:
            subset_spec = rows_spec[:3] + [tf.TensorSpec([None, None], tf.float32),
                                           tf.TensorSpec([None], tf.int32)]
            self._run_subset = tf.function(self._subset_outputs, input_signature=subset_spec)

    def _run_suffix(self, frontier_value, side_values, call=run_layer):
        if not self._suffix:
            return frontier_value
        return replay_nodes(self._suffix, [self._frontier] + self._sides,
                            [frontier_value] + list(side_values), self._output, call=call)

    def _masked_rows(self, values, side_values, example_index, masks):
        """The rows' frontier values (example ``example_index[i]`` of ``values`` under
        ``masks[i]``) and side inputs."""
        rows = tf.shape(masks)[0]
        if self._expand == "flatten":
            masks = tf.tile(masks, [1, self._positions])
        rank = self._frontier_rank
        if self._axis_last:
            mask_shape = tf.concat([[rows], tf.ones([rank - 2], tf.int32), [-1]], axis=0)
        else:  # channels_first: channels on axis 1 of each example
            mask_shape = tf.concat([[rows, -1], tf.ones([rank - 2], tf.int32)], axis=0)
        stacked = tf.gather(values, example_index) * tf.cast(tf.reshape(masks, mask_shape),
                                                             values.dtype)
        return stacked, [tf.gather(side, example_index) for side in side_values]

    def _rows_outputs(self, frontier_value, side_values, example_index, masks):
        """Predicted labels for rows (example ``example_index[i]`` under ``masks[i]``)."""
        return output_labels(self._run_suffix(
            *self._masked_rows(frontier_value, side_values, example_index, masks)),
            self._threshold)

    def _subset_outputs(self, frontier_value, side_values, example_index, masks, subset):
        """``(labels, unsure)`` of rows on the frontier's channels ``subset`` (see ``_subset``)."""
        if self._expand == "flatten":
            values = tf.gather(frontier_value, self._subset.flat_index(subset), axis=-1)
        else:
            values = tf.gather(frontier_value, subset, axis=-1)
        stacked, gathered_sides = self._masked_rows(values, side_values, example_index, masks)
        return self._subset.labels(self._run_suffix(stacked, gathered_sides,
                                                    call=self._subset.replay_call(subset)),
                                   self._threshold)

    # -- evaluation ------------------------------------------------------
    def prefix_outputs(self, x):
        """The prefix's outputs for the batch ``x``: ``[frontier] + side inputs``."""
        outs = self.prefix(x)
        return list(outs) if isinstance(outs, (list, tuple)) else [outs]

    def prefix_with_sums(self, x):
        """``(sums, size, outputs)`` from one pass over the prefix for the batch ``x``.

        ``sums`` and ``size`` are what
        :func:`~tf_backdoor_defense.scoring._activations.channel_sum_fn` gives
        for the layer (its activations summed per channel, in float64);
        ``outputs`` is :meth:`prefix_outputs`.
        """
        sums, size, outputs = self._prefix_with_sums(x)
        return sums, size, list(outputs)

    def predictions(self, x, ranking):
        """Predicted labels at every level 0..C for the batch ``x``.

        Returns an int64 array of shape (C + 1, batch): row ``k`` holds the
        predictions with the first ``k`` channels of ``ranking`` masked. An
        example is only re-evaluated at level ``k`` when the channel pruned
        there is non-zero for it; otherwise its level ``k - 1`` prediction is
        exact and is reused.
        """
        return self.predictions_from(self.prefix_outputs(x), ranking)

    def predictions_from(self, outputs, ranking):
        """:meth:`predictions` from the prefix's ``outputs`` for a batch (:meth:`prefix_outputs`)."""
        ranking = np.asarray(ranking, dtype=np.int64)
        frontier, sides = outputs[0], list(outputs[1:])
        batch = int(frontier.shape[0])
        active, finite = (value.numpy() for value in self._batch_info(frontier))
        # evaluate[k, i]: example i must be run at level k.
        evaluate = np.zeros((ranking.size + 1, batch), dtype=bool)
        evaluate[0] = True
        evaluate[1:] = active[:, ranking].T
        zeroed = self._zeroed_rows(finite, active, ranking, evaluate)
        levels, examples = np.nonzero(evaluate & ~zeroed)
        # masks[k]: the first k ranked channels masked; the extra last row masks every channel.
        masks = np.ones((ranking.size + 2, self.channels), dtype=np.float32)
        for k in range(1, ranking.size + 1):
            masks[k] = masks[k - 1]
            masks[k, ranking[k - 1]] = 0.0
        masks[-1] = 0.0
        shared = np.flatnonzero(zeroed.any(axis=0))
        if shared.size:  # one row of a (finite) example with every channel masked: all zeros
            levels = np.append(levels, ranking.size + 1)
            examples = np.append(examples, shared[0])
        labels = self._row_labels(frontier, sides, levels, examples, masks, active, ranking)
        result = np.empty((ranking.size + 1, batch), dtype=np.int64)
        if shared.size:
            result[zeroed] = labels[-1]
            levels, examples, labels = levels[:-1], examples[:-1], labels[:-1]
        result[levels, examples] = labels
        for level in range(1, ranking.size + 1):
            result[level] = np.where(evaluate[level], result[level], result[level - 1])
        self.rows_evaluated = int(levels.size + bool(shared.size))
        return result

    def _frontier_info(self, frontier_value):
        """``(active, finite)`` of a batch's frontier: per example, which channels are not all
        zero (batch x channels), and whether every value is finite."""
        values = frontier_value
        if not self._axis_last:  # channels_first: channels on axis 1 of each example
            rank = self._frontier_rank
            values = tf.transpose(values, [0] + list(range(2, rank)) + [1])
        flat = tf.reshape(values, [tf.shape(values)[0], -1, self.channels])
        return (tf.reduce_any(tf.not_equal(flat, 0), axis=1),
                tf.reduce_all(tf.math.is_finite(flat), axis=[1, 2]))

    def _row_labels(self, frontier, sides, levels, examples, masks, active, ranking):
        """Predicted labels of the rows (example ``examples[i]`` at level ``levels[i]``).

        With a channel-subset plan (see ``_subset``; ``use_channel_subset``), the
        rows (in level order, ``max_rows`` at a time) run on the channels that
        are not zero for every example of the batch and not yet pruned at the
        first row's level; rows near a tie, and calls that would keep more than
        ``SUBSET_MAX_FRACTION`` of the channels, run the masked model's exact
        way. ``rows_on_subset`` counts the rows run on a subset,
        ``rows_rechecked`` those of them run again. (More, smaller groups by
        level, each leaving out more channels, measured slower on the lab's
        network: every new shape costs more than it saves.)
        """
        labels = np.empty(levels.size, dtype=np.int64)
        exact = []
        self.rows_on_subset = self.rows_rechecked = 0
        if self._subset is None or not self.use_channel_subset:
            exact.append(np.arange(levels.size))
        else:
            # The channels zero for every example of the batch add nothing to any row.
            batch_active = np.asarray(active).any(axis=0)
            for start in range(0, levels.size, self.max_rows):
                rows = np.arange(start, min(start + self.max_rows, levels.size))
                alive = batch_active.copy()
                alive[ranking[:levels[rows[0]]]] = False
                subset = np.flatnonzero(alive).astype(np.int32)
                if not 0 < subset.size <= SUBSET_MAX_FRACTION * self.channels:
                    exact.append(rows)
                    continue
                found, unsure = self._run_subset(
                    frontier, sides, tf.constant(examples[rows], tf.int32),
                    tf.constant(masks[levels[rows]][:, subset]), tf.constant(subset))
                labels[rows] = found.numpy()
                self.rows_on_subset += rows.size
                unsure = rows[unsure.numpy()]  # near a tie: the exact computation decides
                self.rows_rechecked += unsure.size
                exact.append(unsure)
        exact = np.concatenate(exact)
        for start in range(0, exact.size, self.max_rows):
            rows = exact[start:start + self.max_rows]
            labels[rows] = self._run_rows(frontier, sides, tf.constant(examples[rows], tf.int32),
                                          tf.constant(masks[levels[rows]])).numpy()
        return labels

    def _zeroed_rows(self, finite, active, ranking, evaluate):
        """The (level, example) rows of ``evaluate`` at which the masked frontier is all zero.

        Once the last of an example's active channels is pruned, every value the
        suffix reads from the layer is 0, whatever the example: its prediction
        there is the one prediction of an all-zero frontier, computed once per
        batch instead of once per example. That holds only when the suffix reads
        nothing else (no side inputs) and the example's values are finite
        (``0 * inf`` is NaN, not 0): ``finite`` says which are, per example.
        """
        zeroed = np.zeros_like(evaluate)
        if self._sides or not evaluate.size:
            return zeroed
        unranked = np.ones(self.channels, dtype=bool)
        unranked[ranking] = False
        # The level at which each example's last active channel is pruned (0: none active).
        pruned_at = np.zeros(self.channels, dtype=np.int64)
        pruned_at[ranking] = np.arange(1, ranking.size + 1)
        last = np.max(np.where(active, pruned_at, 0), axis=1)
        shared = finite & ~np.any(active & unranked, axis=1)
        examples = np.flatnonzero(shared)
        zeroed[last[examples], examples] = True
        return zeroed & evaluate


def level_evaluator(model, layer, max_rows=8192):
    """The :class:`LevelEvaluator` of ``layer`` in ``model``, built once per model and layer.

    Sweeps of the same model reuse its traced functions; the entry dies with
    the model.
    """
    key = (layer.name, id(layer), int(max_rows))
    evaluators = _EVALUATORS.setdefault(model, {})
    if key not in evaluators:
        evaluators[key] = LevelEvaluator(model, layer, max_rows=max_rows)
    return evaluators[key]


class PrefixCache:
    """The prefix's outputs for one data set, kept from the statistics' pass for the sweep.

    :meth:`channel_means` runs every batch of the data through the prefix
    once, for the layer's mean activations, and keeps the prefix's outputs
    (and labels) of the batches that fit in ``memory_budget`` bytes.
    :meth:`outputs` then gives the prefix's outputs of every batch: the kept
    ones, and the rest run through the prefix again. Array data keeps its
    first batches up to the budget. A stream (``tf.data.Dataset``) that does
    not fit keeps nothing, since a second read may not give the same batches
    in the same order; the sweep reads it again from the start.

    Parameters
    ----------
    evaluator : LevelEvaluator
    memory_budget : int
        Bytes of prefix outputs and labels kept at most; 0 keeps nothing.

    Attributes
    ----------
    kept_bytes : int
        Bytes held now.
    peak_bytes : int
        The most bytes held at once.
    complete : bool
        Whether every batch was kept.
    """

    def __init__(self, evaluator, memory_budget):
        self.evaluator = evaluator
        self.memory_budget = int(memory_budget)
        self._entries = collections.deque()
        self._data = None
        self.kept_bytes = 0
        self.peak_bytes = 0
        self.complete = True

    def channel_means(self, data, batch_size):
        """Mean activation of each channel of the layer over ``data`` (a ``LabeledData``).

        The same float64 accumulation as
        :func:`~tf_backdoor_defense.scoring._activations.mean_channel_activations`,
        batch by batch; the prefix's outputs are kept as they come within
        the budget.
        """
        totals, count = self.channel_sums(data, batch_size)
        if totals is None:
            raise ValueError("`data` is empty: it has no examples.")
        return totals / count

    def channel_sums(self, data, batch_size):
        """``(totals, count)`` of :meth:`channel_means` (see ``total_channel_sums``).

        ``data`` may be one replica's share of the data
        (:class:`~tf_backdoor_defense._distribute.ReplicaShard`); the totals of
        all shares add up to those of the whole.
        """
        self._entries.clear()
        self._data, self._batch_size = data, batch_size
        self.kept_bytes, self.complete = 0, True
        stream = data.size is None
        labels = []

        def batches():
            for x, y in data.batches(batch_size):
                labels.append(y)
                yield x, y

        def step(x):
            sums, size, outputs = self.evaluator.prefix_with_sums(x)
            self._keep(outputs, labels.pop(), stream)
            return sums, size

        return total_channel_sums(batches(), step)

    def _keep(self, outputs, y, stream):
        if not self.complete:
            return
        size = sum(int(t.shape.num_elements()) * t.dtype.size for t in outputs) + y.nbytes
        if self.kept_bytes + size <= self.memory_budget:
            self._entries.append((outputs, y))
            self.kept_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.kept_bytes)
            return
        self.complete = False
        if stream:
            self._entries.clear()
            self.kept_bytes = 0

    def outputs(self, data, batch_size):
        """``(prefix outputs, y)`` for every batch of ``data``, in order.

        ``data`` and ``batch_size`` must be those given to
        :meth:`channel_means`. Each kept batch is released once given.
        """
        if data is not self._data or batch_size != self._batch_size:
            raise ValueError("PrefixCache.outputs() needs the data and batch size of channel_means().")
        if not self.complete:
            kept = len(self._entries)
            for index, (x, y) in enumerate(data.batches(batch_size)):
                if index < kept:
                    yield self._release()
                else:
                    yield self.evaluator.prefix_outputs(x), y
        while self._entries:
            yield self._release()

    def _release(self):
        outputs, y = self._entries.popleft()
        self.kept_bytes -= sum(int(t.shape.num_elements()) * t.dtype.size for t in outputs) + y.nbytes
        return outputs, y

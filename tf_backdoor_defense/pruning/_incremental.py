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
4. The *suffix* runs for all those pairs at once, stacked along the batch
   axis, so each call is one large, efficient batch.

Every result equals what an explicitly masked model computes.
"""

import numpy as np

from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.graph._replay import downstream_nodes, replay_nodes, topological_nodes
from tf_backdoor_defense.masks._registry import (IDENTITY_AT_INFERENCE, PADDING_CROPPING_TYPES,
                                                 POOLING_TYPES, ZERO_PRESERVING_ACTIVATIONS)
from tf_backdoor_defense.masks._wrapper import channel_axis

__all__ = ["LevelEvaluator"]


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
        self.model = model
        self.layer = layer
        self.max_rows = int(max_rows)
        self.channels = int(layer.output.shape[channel_axis(layer)])
        self._axis_last = channel_axis(layer) == -1
        self._build()

    # -- graph split -----------------------------------------------------
    def _build(self):
        model = self.model
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
        self._prefix = keras.Model(model.inputs, [frontier] + sides)
        spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)
        self.prefix = tf.function(lambda x: self._prefix(x, training=False), input_signature=[spec])
        self._frontier_rank = len(frontier_shape)
        side_specs = [tf.TensorSpec([None] + t.shape.as_list()[1:], t.dtype) for t in sides]
        rows_spec = [
            tf.TensorSpec([None] + frontier_shape[1:], frontier.dtype),
            side_specs,
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, self.channels], tf.float32),
        ]
        self._run_rows = tf.function(self._rows_outputs, input_signature=rows_spec)

    def _run_suffix(self, frontier_value, side_values):
        if not self._suffix:
            return frontier_value
        return replay_nodes(self._suffix, [self._frontier] + self._sides,
                            [frontier_value] + list(side_values), self.model.outputs[0])

    def _rows_outputs(self, frontier_value, side_values, example_index, masks):
        """Predicted labels for rows (example ``example_index[i]`` under ``masks[i]``)."""
        rows = tf.shape(masks)[0]
        if self._expand == "flatten":
            masks = tf.tile(masks, [1, self._positions])
        rank = self._frontier_rank
        if self._axis_last:
            mask_shape = tf.concat([[rows], tf.ones([rank - 2], tf.int32), [-1]], axis=0)
        else:  # channels_first: channels on axis 1 of each example
            mask_shape = tf.concat([[rows, -1], tf.ones([rank - 2], tf.int32)], axis=0)
        stacked = tf.gather(frontier_value, example_index) * tf.cast(
            tf.reshape(masks, mask_shape), frontier_value.dtype)
        gathered_sides = [tf.gather(side, example_index) for side in side_values]
        outputs = self._run_suffix(stacked, gathered_sides)
        if outputs.shape[-1] == 1:
            return tf.cast(outputs[:, 0] > 0.5, tf.int64)
        return tf.argmax(outputs, axis=-1)

    # -- evaluation ------------------------------------------------------
    def predictions(self, x, ranking):
        """Predicted labels at every level 0..C for the batch ``x``.

        Returns an int64 array of shape (C + 1, batch): row ``k`` holds the
        predictions with the first ``k`` channels of ``ranking`` masked. An
        example is only re-evaluated at level ``k`` when the channel pruned
        there is non-zero for it; otherwise its level ``k - 1`` prediction is
        exact and is reused.
        """
        ranking = np.asarray(ranking, dtype=np.int64)
        outs = self.prefix(x)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        frontier, sides = outs[0], list(outs[1:])
        batch = int(frontier.shape[0])
        # Channels are last, also after Flatten (channel c sits at c, c+C, ...).
        values = frontier if self._axis_last else tf.experimental.numpy.moveaxis(frontier, 1, -1)
        flat = tf.reshape(values, [batch, -1, self.channels])
        active = tf.reduce_any(tf.not_equal(flat, 0), axis=1).numpy()  # (batch, channels)
        # evaluate[k, i]: example i must be run at level k.
        evaluate = np.zeros((ranking.size + 1, batch), dtype=bool)
        evaluate[0] = True
        evaluate[1:] = active[:, ranking].T
        levels, examples = np.nonzero(evaluate)
        masks = np.ones((ranking.size + 1, self.channels), dtype=np.float32)
        for k in range(1, ranking.size + 1):
            masks[k] = masks[k - 1]
            masks[k, ranking[k - 1]] = 0.0
        labels = np.empty(levels.size, dtype=np.int64)
        for start in range(0, levels.size, self.max_rows):
            part = slice(start, start + self.max_rows)
            labels[part] = self._run_rows(frontier, sides, tf.constant(examples[part], tf.int32),
                                          tf.constant(masks[levels[part]])).numpy()
        result = np.empty((ranking.size + 1, batch), dtype=np.int64)
        result[levels, examples] = labels
        for level in range(1, ranking.size + 1):
            result[level] = np.where(evaluate[level], result[level], result[level - 1])
        self.rows_evaluated = int(levels.size)
        return result

"""The levels' rows on the pruned layer's non-zero channels alone, checked against ties.

In one batch of the incremental sweep, most of the pruned layer's channels
are often zero for every example (the dormant channels that pruning removes
first). When every layer that reads the (masked) layer output is linear in
its channels (a convolution or a dense layer, maybe after a ``Flatten``), a
channel that is zero in every row adds nothing to them: they can run on the
other channels alone, with their kernels cut to those channels, and the
rows cost a fraction of the full layers.

That computes the same sums in another order, so the outputs can differ
from the masked model's in the last bits. The output is therefore taken
before its softmax or sigmoid when the last layer applies one, and a row
whose winning output is within :data:`RELATIVE_TOLERANCE` of the runner-up
(``1e-3 * (1 + |winner|)``; for one unit, of the decision threshold), or
that is not finite, is flagged: the caller evaluates it again the exact way.
Reordered float32 sums of this size differ by far less (on the lab's face
network, at most 5e-5 in logits up to 191): a label kept differs from the
masked model's only if reordering alone moved an output by more than a
thousandth of its size, which the tolerance is set far above.
"""

import numpy as np

from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.graph._replay import run_layer
from tf_backdoor_defense.masks._registry import is_conv

__all__ = ["RELATIVE_TOLERANCE", "SubsetRows", "output_labels", "subset_rows"]

#: A row is evaluated again the exact way when its two best outputs (or one
#: unit's output and its threshold) are closer than this times (1 + |best|).
RELATIVE_TOLERANCE = 1e-3


def output_labels(outputs, threshold=0.5):
    """Predicted labels of a batch of outputs (a tensor): argmax, or for one unit its value above
    ``threshold`` (0.5 for a probability; 0 for a logit whose sigmoid was left out), the rule
    of :func:`tf_backdoor_defense.metrics.labels_from_outputs`."""
    if outputs.shape[-1] == 1:
        return tf.cast(outputs[:, 0] > threshold, tf.int64)
    return tf.argmax(outputs, axis=-1)


def _float32(layer):
    return getattr(layer, "dtype_policy", None) is None or \
        getattr(layer.dtype_policy, "name", "float32") == "float32"


def _single_input_readers(nodes, tensor):
    """The nodes of ``nodes`` that read ``tensor``, or None if one reads anything else too."""
    readers = [n for n in nodes if any(t is tensor for t in n.keras_inputs)]
    if any(len(n.keras_inputs) != 1 for n in readers):
        return None
    return readers


def _dense_reads(layer, rank):
    return type(layer) is keras.layers.Dense and rank == 2 and _float32(layer)


def _conv_reads(layer):
    return (is_conv(layer) and layer.groups == 1 and _float32(layer)
            and layer.data_format == "channels_last" and layer.padding in ("valid", "same"))


class SubsetRows:
    """How to run a :class:`LevelEvaluator`'s suffix on a subset of the layer's channels.

    Built by :func:`subset_rows`, which returns None where it does not apply.
    """

    def __init__(self, channels, positions, plans, peel):
        self.channels, self.positions = channels, positions
        self._plans = plans  # {id(node): "conv" | "dense" | "flatten"}
        self._peel = peel  # (id of the output node, "softmax" | "sigmoid") or None

    def flat_index(self, subset):
        """Indices, in the frontier flattened per example, of the channels ``subset``."""
        per_position = tf.range(self.positions, dtype=tf.int32)[:, None] * self.channels
        return tf.reshape(per_position + subset[None, :], [-1])

    def replay_call(self, subset):
        """The ``call`` of ``replay_nodes`` that runs the suffix on the frontier's channels
        ``subset`` (its output before a peeled softmax/sigmoid)."""
        flat = self.flat_index(subset)
        peel_id = self._peel[0] if self._peel else None

        def call(node, args, kwargs):
            plan = self._plans.get(id(node))
            peeled = id(node) == peel_id
            if plan is None and not peeled:
                return run_layer(node, args, kwargs)
            layer, x = node.layer, args[0]
            if plan == "flatten":
                return tf.reshape(x, [tf.shape(x)[0], -1])
            if plan == "conv":
                kernel = tf.gather(layer.kernel, subset, axis=layer.kernel.shape.rank - 2)
                return _finish(layer, layer.convolution_op(x, kernel), peeled)
            if isinstance(layer, keras.layers.Dense):
                kernel = tf.gather(layer.kernel, flat, axis=0) if plan == "dense" else layer.kernel
                return _finish(layer, tf.matmul(x, kernel), peeled)
            return x  # a Softmax or Activation output layer, left out
        return call

    def labels(self, outputs, threshold=0.5):
        """``(labels, unsure)``: predicted labels (:func:`output_labels` of the model's
        output, whose one unit means class 1 above ``threshold``), and the rows to evaluate
        again exactly."""
        if outputs.shape[-1] == 1:
            if self._peel and self._peel[1] == "sigmoid":
                threshold = 0.0  # the logit the peeled sigmoid would have read
            value = outputs[:, 0]
            near = tf.abs(value - threshold) <= RELATIVE_TOLERANCE * (1.0 + tf.abs(value))
            return output_labels(outputs, threshold), near | ~tf.math.is_finite(value)
        best = tf.reduce_max(outputs, axis=-1)
        tolerance = RELATIVE_TOLERANCE * (1.0 + tf.abs(best))
        close = tf.reduce_sum(tf.cast(outputs >= (best - tolerance)[:, None], tf.int32), axis=-1)
        # reduce_max propagates NaN: a best that is finite means a row without NaN or +inf.
        return output_labels(outputs), (close != 1) | ~tf.math.is_finite(best)


def _finish(layer, outputs, peeled):
    if layer.use_bias:
        outputs = tf.nn.bias_add(outputs, layer.bias)
    if peeled or layer.activation is None:
        return outputs
    return layer.activation(outputs)


def _peel(output_node):
    """The softmax or sigmoid the output node applies last, if it can be left out, else None."""
    layer = output_node.layer
    if not _float32(layer):
        return None
    name = getattr(getattr(layer, "activation", None), "__name__", "")
    if type(layer) is keras.layers.Dense and len(output_node.keras_inputs) == 1 and \
            output_node.keras_inputs[0].shape.rank == 2:
        if name in ("softmax", "softmax_v2") and layer.units > 1:
            return "softmax"
        return "sigmoid" if name == "sigmoid" and layer.units == 1 else None
    if isinstance(layer, keras.layers.Softmax) and layer.axis in (-1, [-1], (-1,)):
        return "softmax"
    if type(layer) is keras.layers.Activation and name in ("softmax", "softmax_v2", "sigmoid"):
        return "sigmoid" if name == "sigmoid" else "softmax"
    return None


def subset_rows(frontier, expand, channels, suffix, output):
    """A :class:`SubsetRows` for the split of a :class:`LevelEvaluator`, or None.

    It applies when every node that reads the frontier is a convolution
    (channels last, one group) or a dense layer on a flat frontier, or a
    ``Flatten`` read only by dense layers, all in float32.
    """
    if not suffix or output.shape.rank != 2:
        return None
    readers = _single_input_readers(suffix, frontier)
    if not readers:
        return None
    plans = {}
    for node in readers:
        layer = node.layer
        if expand == "flatten" or frontier.shape.rank == 2:
            if not _dense_reads(layer, frontier.shape.rank):
                return None
            plans[id(node)] = "dense"
        elif _conv_reads(layer):
            plans[id(node)] = "conv"
        elif type(layer) is keras.layers.Flatten and \
                getattr(layer, "data_format", "channels_last") == "channels_last":
            flat = node.outputs[0] if isinstance(node.outputs, (list, tuple)) else node.outputs
            dense = _single_input_readers(suffix, flat)
            if not dense or any(not _dense_reads(n.layer, 2) for n in dense):
                return None
            plans[id(node)] = "flatten"
            plans.update({id(n): "dense" for n in dense})
        else:
            return None
    last = [n for n in suffix if any(o is output for o in tf.nest.flatten(n.outputs))]
    kind = _peel(last[0]) if len(last) == 1 else None
    peel = (id(last[0]), kind) if kind else None
    positions = int(np.prod(frontier.shape.as_list()[1:])) // int(channels)
    return SubsetRows(int(channels), positions, plans, peel)

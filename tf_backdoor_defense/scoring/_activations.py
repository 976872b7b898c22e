"""Streaming per-channel mean activations of one layer over clean data."""

import weakref

import numpy as np

from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.masks._registry import (ACTIVATION_LAYER_TYPES, IDENTITY_AT_INFERENCE,
                                                 PRUNABLE_LAYER_TYPES)
from tf_backdoor_defense.masks._wrapper import (PruneByActivation, channel_axis, find_layer,
                                                last_conv_layer, layer_names)
from tf_backdoor_defense._errors import InputTypeError
from tf_backdoor_defense._validation import check_model, check_ranking_data, renamed_argument
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["mean_channel_activations", "resolve_layer", "activation_tensor", "channel_sum_fn",
           "average_channel_sums", "total_channel_sums"]

# {model: {layer key: compiled statistics}}. A value holds the feature extractor built
# from the model's layers, never the model itself, so the entry dies with the model
# (tests/test_metrics.py checks it).
_STAT_FNS = weakref.WeakKeyDictionary()


def resolve_layer(model, layer=None):
    """The layer object to prune: ``layer`` by name (default: the last conv layer)."""
    name = last_conv_layer(model) if layer is None else layer
    if not isinstance(name, str):
        raise TypeError(f"The 'layer' parameter must be a layer name (str). Got {name!r} instead.")
    found = find_layer(model, name)
    inner = found.layer if isinstance(found, PruneByActivation) else found
    if not isinstance(inner, PRUNABLE_LAYER_TYPES):
        raise ValueError(
            f"Layer '{name}' of type {type(inner).__name__} cannot be pruned by channel: "
            "expected a Conv1D, Conv2D, Conv3D or Dense layer."
        )
    if len(found._inbound_nodes) != 1:
        raise ValueError(f"Layer '{name}' is used {len(found._inbound_nodes)} times in the model; "
                         "a shared layer cannot be pruned by activation.")
    return found


def activation_tensor(model, layer, *, through_batch_norm=True):
    """The symbolic output of ``layer`` after its activation function.

    When the layer itself is linear and its output reaches a separate
    activation layer through a chain of single-consumer layers, the activation
    layer's output is used: ``Conv2D -> ReLU``, and with ``through_batch_norm``
    also ``Conv2D -> BatchNormalization -> ReLU`` (the usual ResNet/VGG block)
    and inference-time identities such as ``Dropout`` on the way. Otherwise
    the layer's own output is used.

    Examples
    --------
    >>> import tf_keras as keras
    >>> inputs = keras.Input((4, 4, 1))
    >>> x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    >>> x = keras.layers.BatchNormalization(name="bn")(x)
    >>> x = keras.layers.ReLU(name="relu")(x)
    >>> model = keras.Model(inputs, keras.layers.Flatten()(x))
    >>> activation_tensor(model, model.get_layer("conv")).name.split("/")[0]
    'relu'
    """
    output = layer.output
    inner = layer.layer if isinstance(layer, PruneByActivation) else layer
    if getattr(inner, "activation", None) is not keras.activations.linear:
        return output
    passes = IDENTITY_AT_INFERENCE + ((keras.layers.BatchNormalization,) if through_batch_norm else ())
    current = layer
    while True:
        consumers = [node.layer for node in current._outbound_nodes if node.layer in model.layers]
        if len(consumers) != 1 or len(consumers[0]._inbound_nodes) != 1:
            return output
        current = consumers[0]
        if isinstance(current, ACTIVATION_LAYER_TYPES):
            return current.output
        if not isinstance(current, passes) or (
                isinstance(current, keras.layers.BatchNormalization)
                and not _normalizes_channels(current, layer)):
            return output


def _normalizes_channels(batch_norm, layer):
    """True when ``batch_norm`` normalises ``layer``'s channel axis (one scale per channel)."""
    axes = batch_norm.axis if isinstance(batch_norm.axis, (list, tuple)) else [batch_norm.axis]
    rank = len(layer.output.shape)
    return [a % rank for a in axes] == [channel_axis(layer) % rank]


def channel_sum_fn(model, layer, outputs=()):
    """A function ``x -> (sums, size)`` over ``layer``'s activations, in float64.

    ``sums`` holds one total per channel (summed over every axis but the
    channel axis: examples and positions) and ``size`` the number of values
    summed, so ``size / channels`` is the count behind each total. It traces
    inside ``tf.function`` and ``strategy.run``.

    ``outputs``, symbolic tensors of ``model``, are computed in the same pass
    and returned after ``size`` as a list: ``x -> (sums, size, values)``. The
    pruning sweep takes its inputs from the pass that gives the statistics.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)),
    ...     keras.layers.Dense(2, activation="relu", kernel_initializer="identity", name="fc")])
    >>> sums, size = channel_sum_fn(model, model.get_layer("fc"))(np.array([[1., -1.], [3., 2.]]))
    >>> sums.numpy().tolist(), float(size)
    ([4.0, 2.0], 4.0)
    """
    extra = list(outputs)
    features = keras.Model(model.inputs, [activation_tensor(model, layer)] + extra)
    rank = len(features.outputs[0].shape)
    axes = [a for a in range(rank) if a != channel_axis(layer) % rank]

    def sums(x):
        values = features(x, training=False)
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        out = tf.cast(values[0], tf.float64)
        totals = tf.reduce_sum(out, axis=axes), tf.cast(tf.size(out), tf.float64)
        return totals + (values[1:],) if extra else totals

    return sums


def average_channel_sums(batches, step):
    """Mean per channel from ``step(x) -> (sums, size)`` (see :func:`channel_sum_fn`) over batches.

    ``batches`` yields ``(x, y)``; the totals are accumulated in float64 in
    batch order. Raises ``ValueError`` when there is no batch.
    """
    totals, count = total_channel_sums(batches, step)
    if totals is None:
        raise ValueError("`data` is empty: it has no examples.")
    return totals / count


def total_channel_sums(batches, step):
    """``(totals, count)`` behind :func:`average_channel_sums`: its mean is ``totals / count``.

    ``totals`` is None when there is no batch (``count`` is then 0). Sums of
    several shards of the data add up to the totals of the whole.
    """
    totals, count = None, 0.0
    for x, _ in batches:
        sums, size = step(x)
        sums = np.asarray(sums.numpy(), dtype=np.float64)
        totals = sums if totals is None else totals + sums
        count += float(size.numpy()) / sums.shape[0]
    return totals, count


def _stats_fn(model, layer):
    key = (layer.name, id(layer))
    cache = _STAT_FNS.setdefault(model, {})
    if key not in cache:
        spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)
        cache[key] = tf.function(channel_sum_fn(model, layer), input_signature=[spec])
    return cache[key]


@with_caller_keras
def mean_channel_activations(model, ranking_data=None, layers=None, batch_size=256, *,
                             data=None, layer=None):
    """Mean activation of each channel of one layer, or of each of several, over clean data.

    The mean is taken after the layer's activation function, over every
    example and spatial position, accumulated in float64 batch by batch, so
    memory does not grow with the data set and the result is deterministic.

    Parameters
    ----------
    model : tf_keras.Model
    ranking_data : (x, y) arrays, x alone, or a tf.data.Dataset of (x, y) or of x
        Clean inputs (labels are not used).
    layers : str or list of str, default=None
        Name of a Conv or Dense layer, or a list of names; default: the
        last convolutional layer.
    batch_size : int, default=256
    data, layer
        Old names of ``ranking_data`` and ``layers`` (deprecated; they warn).

    Returns
    -------
    numpy.ndarray of shape (channels,), float64
        For one layer name (or None).
    dict of {name: numpy.ndarray}
        For a list of names, in the list's order.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)),
    ...     keras.layers.Dense(2, activation="relu", kernel_initializer="identity", name="fc")])
    >>> x = np.array([[1., -1.], [3., 2.]])
    >>> mean_channel_activations(model, x, "fc").tolist()
    [2.0, 1.0]
    >>> {k: v.tolist() for k, v in mean_channel_activations(model, x, ["fc"]).items()}
    {'fc': [2.0, 1.0]}
    """
    ranking_data = renamed_argument("mean_channel_activations()", "data", data,
                                    "ranking_data", ranking_data)
    layers = renamed_argument("mean_channel_activations()", "layer", layer, "layers", layers)
    check_model(model)
    if ranking_data is None:
        raise InputTypeError("mean_channel_activations() needs 'ranking_data': clean inputs.")
    single = layers is None or isinstance(layers, str)
    names = layer_names(model, layers)
    found = [resolve_layer(model, name) for name in names]
    checked = check_ranking_data(ranking_data, "ranking_data", model=model, num_classes=None)
    means = {layer.name: average_channel_sums(checked.batches(batch_size), _stats_fn(model, layer))
             for layer in found}
    return next(iter(means.values())) if single else means

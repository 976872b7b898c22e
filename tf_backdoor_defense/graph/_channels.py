"""Channel-dependency graph of a Sequential or Functional tf-keras model.

Channels are on the last axis (NHWC, Keras' ``channels_last``). A layer's
output channels travel through *channel-wise* layers (activations,
BatchNormalization, pooling, padding, dropout, ...), which keep channel ``c``
as channel ``c``, until they reach a layer that *consumes* them: a Conv or
Dense layer (one input row per channel), a Flatten (channel ``c`` of an
``H x W x C`` tensor becomes entries ``c, c + C, c + 2C, ...``), a
Concatenate (channels shifted by an offset) or an elementwise merge such as
Add (channels joined with the other branches').

:func:`channel_consumers` answers "who reads this layer's channels, through
which ops", which is what physical channel removal must rewrite.
"""

from dataclasses import dataclass

from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.graph._replay import check_graph_model, topological_nodes
from tf_backdoor_defense.masks._registry import (CHANNELWISE_TYPES, MERGE_TYPES,
                                                 PRUNABLE_LAYER_TYPES, is_prunable)
from tf_backdoor_defense.masks._wrapper import find_layer, layer_names, unwrap

__all__ = ["ChannelUse", "layer_kind", "tensor_consumers", "channel_consumers"]


def _channels_last(layer):
    fmt = getattr(layer, "data_format", None)
    return fmt in (None, "channels_last")


def layer_kind(layer):
    """How ``layer`` treats the channels of its input.

    Returns one of ``"input"``, ``"linear"`` (Conv/Dense: one kernel row per
    input channel; also a ``PruneByActivation``), ``"channelwise"``,
    ``"flatten"``, ``"concatenate"``, ``"merge"`` or ``"other"`` (anything
    else: channel removal cannot pass it).

    Examples
    --------
    >>> import tf_keras as keras
    >>> layer_kind(keras.layers.MaxPooling2D()), layer_kind(keras.layers.Dense(2))
    ('channelwise', 'linear')
    """
    inner = unwrap(layer)
    if isinstance(inner, keras.layers.InputLayer):
        return "input"
    if isinstance(inner, PRUNABLE_LAYER_TYPES):
        if is_prunable(inner) and getattr(inner, "groups", 1) == 1 and _channels_last(inner):
            return "linear"
        return "other"
    if isinstance(inner, keras.layers.BatchNormalization):
        axis = list(inner.axis) if isinstance(inner.axis, (list, tuple)) else [inner.axis]
        ndim = getattr(inner.input_spec, "ndim", None)
        return "channelwise" if axis == [-1] or (ndim and axis == [ndim - 1]) else "other"
    if isinstance(inner, CHANNELWISE_TYPES):
        return "channelwise" if _channels_last(inner) else "other"
    if isinstance(inner, keras.layers.Flatten):
        return "flatten" if _channels_last(inner) else "other"
    if isinstance(inner, keras.layers.Concatenate):
        return "concatenate"
    if isinstance(inner, MERGE_TYPES):
        return "merge"
    return "other"


def tensor_consumers(model):
    """``{id(keras_tensor): [node, ...]}``: the nodes that read each tensor."""
    readers = {}
    for node in topological_nodes(model):
        for tensor in node.keras_inputs:
            readers.setdefault(id(tensor), []).append(node)
    return readers


@dataclass(frozen=True)
class ChannelUse:
    """One consumer of a layer's channels.

    Attributes
    ----------
    consumer : str
        Name of the layer that mixes, reshapes or joins the channels (``None``
        when they reach a model output unchanged).
    kind : str
        ``layer_kind`` of the consumer (``"output"`` for a model output).
    via : tuple of str
        Channel-wise layers passed on the way, in order.
    """

    consumer: str
    kind: str
    via: tuple

    def __str__(self):
        path = " > ".join(self.via + ((self.consumer,) if self.consumer else ("<output>",)))
        return f"{path} ({self.kind})"


def channel_consumers(model, layers):
    """Where the output channels of ``layers`` are consumed, and through which ops.

    Follows the channels forward through channel-wise layers and Flatten
    (which keeps track of channels, see the module doc) to the first layer
    that mixes or joins them.

    Parameters
    ----------
    model : tf_keras.Model
        A Sequential or Functional model (wrapped layers allowed).
    layers : str or list of str
        Name of the layer whose channels are followed, or a list of names.

    Returns
    -------
    list of ChannelUse, or dict
        For one name, its uses; for a list of names, ``{name: uses}``.

    Examples
    --------
    >>> import tf_keras as keras
    >>> inputs = keras.Input((8, 8, 1))
    >>> x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    >>> x = keras.layers.MaxPooling2D(name="pool")(x)
    >>> x = keras.layers.Flatten(name="flat")(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))
    >>> [str(use) for use in channel_consumers(model, "conv")]
    ['pool > flat > fc (linear)']
    >>> {name: len(uses) for name, uses in channel_consumers(model, ["conv", "fc"]).items()}
    {'conv': 1, 'fc': 1}
    """
    check_graph_model(model)
    if isinstance(layers, str):
        return _consumers(model, layers)
    return {name: _consumers(model, name) for name in layer_names(model, layers)}


def _consumers(model, name):
    source = find_layer(model, name)
    readers = tensor_consumers(model)
    outputs = {id(t) for t in model.outputs}
    uses = []
    start = [n for n in topological_nodes(model) if n.layer is source]
    stack = [(tensor, ()) for node in start for tensor in tf.nest.flatten(node.outputs)]
    seen = set()
    while stack:
        tensor, via = stack.pop()
        if id(tensor) in outputs:
            uses.append(ChannelUse(None, "output", via))
        for node in readers.get(id(tensor), []):
            key = (id(node), via)
            if key in seen:
                continue
            seen.add(key)
            kind = layer_kind(node.layer)
            if kind in ("channelwise", "flatten"):
                for out in tf.nest.flatten(node.outputs):
                    stack.append((out, via + (node.layer.name,)))
            else:
                uses.append(ChannelUse(node.layer.name, kind, via))
    return sorted(uses, key=lambda use: (use.via, use.consumer or ""))

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

from tf_backdoor_defense._keras import check_keras2_model, keras
from tf_backdoor_defense.masks._wrapper import PruneByActivation, find_layer

__all__ = [
    "ChannelUse",
    "layer_kind",
    "topological_nodes",
    "tensor_consumers",
    "channel_consumers",
]

L = keras.layers

#: Layers whose output equals their input at inference time.
IDENTITY_AT_INFERENCE = (
    L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
    L.GaussianNoise, L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization,
)
#: Layers that map channel ``c`` to channel ``c`` (per-channel, maybe spatial).
CHANNELWISE_TYPES = IDENTITY_AT_INFERENCE + (
    L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.ThresholdedReLU,
    L.BatchNormalization,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D,
    L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
)
#: Elementwise merges: every input must have the same channels.
MERGE_TYPES = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
_TRANSPOSED = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D, L.DepthwiseConv1D, L.DepthwiseConv2D)
#: Layers with one kernel row per input channel: ``kernel[..., c, :]``.
LINEAR_TYPES = (L.Conv1D, L.Conv2D, L.Conv3D, L.Dense)


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
    inner = layer.layer if isinstance(layer, PruneByActivation) else layer
    if isinstance(inner, keras.layers.InputLayer):
        return "input"
    if isinstance(inner, LINEAR_TYPES) and not isinstance(inner, _TRANSPOSED + _SEPARABLE):
        if getattr(inner, "groups", 1) == 1 and _channels_last(inner):
            return "linear"
        return "other"
    if isinstance(inner, L.BatchNormalization):
        axis = list(inner.axis) if isinstance(inner.axis, (list, tuple)) else [inner.axis]
        ndim = getattr(inner.input_spec, "ndim", None)
        return "channelwise" if axis == [-1] or (ndim and axis == [ndim - 1]) else "other"
    if isinstance(inner, CHANNELWISE_TYPES):
        return "channelwise" if _channels_last(inner) else "other"
    if isinstance(inner, L.Flatten):
        return "flatten" if _channels_last(inner) else "other"
    if isinstance(inner, L.Concatenate):
        return "concatenate"
    if isinstance(inner, MERGE_TYPES):
        return "merge"
    return "other"


def _check_graph_model(model):
    check_keras2_model(model)
    if not model.built or not getattr(model, "_is_graph_network", False):
        raise ValueError(
            "Expected a built Sequential or Functional model (subclassed models have no "
            f"layer graph). Received the model '{model.name}' of type {type(model).__name__}."
        )
    return model


def topological_nodes(model):
    """The model's layer calls (Keras ``Node`` objects) in execution order.

    Input layers are left out. Each node has ``.layer``, ``.call_args``,
    ``.call_kwargs``, ``.keras_inputs`` and ``.outputs``.
    """
    _check_graph_model(model)
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if not node.is_input:
                nodes.append(node)
    return nodes


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


def channel_consumers(model, layer):
    """Where the output channels of ``layer`` are consumed, and through which ops.

    Follows the channels forward through channel-wise layers and Flatten
    (which keeps track of channels, see the module doc) to the first layer
    that mixes or joins them.

    Parameters
    ----------
    model : tf_keras.Model
        A Sequential or Functional model (wrapped layers allowed).
    layer : str
        Name of the layer whose channels are followed.

    Returns
    -------
    list of ChannelUse

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
    """
    _check_graph_model(model)
    source = find_layer(model, layer)
    readers = tensor_consumers(model)
    outputs = {id(t) for t in model.outputs}
    uses = []
    start = [n for n in topological_nodes(model) if n.layer is source]
    stack = [(tensor, ()) for node in start for tensor in _flat(node.outputs)]
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
                for out in _flat(node.outputs):
                    stack.append((out, via + (node.layer.name,)))
            else:
                uses.append(ChannelUse(node.layer.name, kind, via))
    return sorted(uses, key=lambda use: (use.via, use.consumer or ""))


def _flat(structure):
    if isinstance(structure, (list, tuple)):
        out = []
        for item in structure:
            out.extend(_flat(item))
        return out
    if isinstance(structure, dict):
        return _flat(list(structure.values()))
    return [structure]

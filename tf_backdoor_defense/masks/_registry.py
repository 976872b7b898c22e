"""The layer-kind registry: which tf-keras layer classes play which part.

Every module that asks "is this a convolution?", "can this layer be pruned
by channel?", "does this layer pass channel ``c`` through as channel ``c``?"
reads the answer here, so the answers cannot disagree.

Note that tf-keras' transposed convolutions subclass the plain ones
(``Conv2DTranspose`` is a ``Conv2D``): :func:`is_conv` and
:func:`is_prunable` leave them out, ``isinstance(layer, CONV_TYPES)`` does not.
"""

from tf_backdoor_defense._keras import keras

__all__ = [
    "CONV_TYPES",
    "TRANSPOSED_CONV_TYPES",
    "SEPARABLE_CONV_TYPES",
    "PRUNABLE_LAYER_TYPES",
    "IDENTITY_AT_INFERENCE",
    "ACTIVATION_LAYER_TYPES",
    "POOLING_TYPES",
    "PADDING_CROPPING_TYPES",
    "UPSAMPLING_TYPES",
    "CHANNELWISE_TYPES",
    "MERGE_TYPES",
    "ZERO_PRESERVING_ACTIVATIONS",
    "ELEMENTWISE_ACTIVATIONS",
    "is_conv",
    "is_prunable",
]

_L = keras.layers

#: Convolutions with one kernel slice per output channel (and, through
#: subclassing, their transposed forms).
CONV_TYPES = (_L.Conv1D, _L.Conv2D, _L.Conv3D)
#: Transposed convolutions: their kernel holds output channels on axis -2.
TRANSPOSED_CONV_TYPES = (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose)
#: Depthwise and separable convolutions: one filter per input channel.
SEPARABLE_CONV_TYPES = (_L.SeparableConv1D, _L.SeparableConv2D, _L.DepthwiseConv1D,
                        _L.DepthwiseConv2D)
#: Layers ``PruneByActivation`` can wrap (transposed convolutions excepted, see
#: :func:`is_prunable`): one kernel row per input channel, ``kernel[..., c, :]``.
PRUNABLE_LAYER_TYPES = CONV_TYPES + (_L.Dense,)
#: Layers whose output equals their input at inference time.
IDENTITY_AT_INFERENCE = (
    _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D,
    _L.GaussianNoise, _L.GaussianDropout, _L.AlphaDropout, _L.ActivityRegularization,
)
#: Layers that apply an activation function to their input.
ACTIVATION_LAYER_TYPES = (_L.Activation, _L.ReLU, _L.LeakyReLU, _L.ELU, _L.PReLU,
                          _L.ThresholdedReLU)
#: Local and global pooling: each channel pooled on its own.
POOLING_TYPES = (
    _L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D,
    _L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D,
    _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D,
    _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D,
)
#: Zero padding and cropping: positions added or removed, channels untouched.
PADDING_CROPPING_TYPES = (
    _L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D,
    _L.Cropping1D, _L.Cropping2D, _L.Cropping3D,
)
#: Upsampling by repetition.
UPSAMPLING_TYPES = (_L.UpSampling1D, _L.UpSampling2D, _L.UpSampling3D)
#: Layers that map channel ``c`` to channel ``c`` (per channel, maybe spatially).
#: BatchNormalization only does so over the channel axis; see
#: :func:`tf_backdoor_defense.graph.layer_kind`.
CHANNELWISE_TYPES = IDENTITY_AT_INFERENCE + (
    _L.Activation, _L.ReLU, _L.LeakyReLU, _L.ELU, _L.ThresholdedReLU,
    _L.BatchNormalization,
) + POOLING_TYPES + PADDING_CROPPING_TYPES + UPSAMPLING_TYPES
#: Elementwise merges: every input must have the same channels.
MERGE_TYPES = (_L.Add, _L.Subtract, _L.Multiply, _L.Average, _L.Maximum, _L.Minimum)
#: Layers that read their inputs as token or category IDs: no gradient reaches those inputs.
ID_READER_TYPES = (_L.Embedding, _L.CategoryEncoding, _L.IntegerLookup, _L.StringLookup,
                   _L.Hashing)

#: Activation names with ``f(0) == 0``, applied one value at a time.
ZERO_PRESERVING_ACTIVATIONS = frozenset({
    "relu", "linear", "elu", "selu", "tanh", "swish", "silu", "gelu", "relu6", "leaky_relu",
    "softsign", "mish",
})
#: Activation names applied one value at a time (one channel never affects another).
ELEMENTWISE_ACTIVATIONS = ZERO_PRESERVING_ACTIVATIONS | frozenset({
    "sigmoid", "softplus", "exponential", "hard_sigmoid", "hard_silu", "hard_swish",
})


def is_conv(layer):
    """True for a Conv1D/2D/3D layer object that is not a transposed convolution.

    >>> import tf_keras as keras
    >>> is_conv(keras.layers.Conv2D(2, 3)), is_conv(keras.layers.Conv2DTranspose(2, 3))
    (True, False)
    """
    return isinstance(layer, CONV_TYPES) and not isinstance(layer, TRANSPOSED_CONV_TYPES)


def is_prunable(layer):
    """True for a layer object ``PruneByActivation`` can wrap: a Conv (not transposed) or Dense.

    >>> import tf_keras as keras
    >>> is_prunable(keras.layers.Dense(2)), is_prunable(keras.layers.DepthwiseConv2D(3))
    (True, False)
    """
    return is_conv(layer) or isinstance(layer, _L.Dense)

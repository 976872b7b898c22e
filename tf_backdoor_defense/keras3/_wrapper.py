"""The Keras 3 ``PruneByActivation``: a per-output-channel mask written with ``keras.ops`` only.

It mirrors :class:`tf_backdoor_defense.masks.PruneByActivation` (the tf-keras
layer): the same non-trainable variables, ``channel_mask`` and the three
``fine_pruning_*`` scalars of a ``FinePruning`` run, so that a model converts
between the two Keras versions without losing masks or state. The forward
pass uses ``keras.ops`` only; tfmot composition stays with the tf-keras layer
(tfmot itself is tf-keras only).
"""

import numpy as np

from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense.keras3._backend import keras3

from tf_backdoor_defense.masks._registry import PRUNABLE_LAYER_TYPES  # noqa: E402

keras = keras3()
ops = keras.ops

__all__ = ["PruneByActivation", "PRUNABLE_KERAS3_TYPES"]

#: Keras 3 layer classes whose output channels can be masked: the Keras 3 classes of
#: the same names as the registry's tf-keras ones.
PRUNABLE_KERAS3_TYPES = tuple(getattr(keras.layers, kind.__name__) for kind in PRUNABLE_LAYER_TYPES)

_STATE = (("fine_pruning_step", "int64", 0), ("fine_pruning_baseline", "float64", -1.0),
          ("fine_pruning_status", "int64", 0))


def _channels(layer):
    return int(layer.units if isinstance(layer, keras.layers.Dense) else layer.filters)


@keras.saving.register_keras_serializable(package="tf_backdoor_defense")
class PruneByActivation(keras.layers.Wrapper):
    """Wraps a Keras 3 Conv1D/Conv2D/Conv3D or Dense layer with a per-channel mask.

    The wrapped layer's output (after its activation) is multiplied by the
    mask along the channel axis; a channel whose mask is 0 outputs exactly 0.

    Parameters
    ----------
    layer : keras.layers.Conv1D, Conv2D, Conv3D or Dense
        The Keras 3 layer to wrap.
    **kwargs
        Passed to ``keras.layers.Wrapper`` (``name``, ...).

    Examples
    --------
    >>> import numpy as np, keras
    >>> from tf_backdoor_defense.keras3 import PruneByActivation
    >>> layer = PruneByActivation(keras.layers.Dense(3, kernel_initializer="ones"))
    >>> _ = layer(np.ones((1, 2), "float32"))
    >>> layer.set_mask([1, 0, 1])
    >>> np.asarray(layer(np.ones((1, 2), "float32"))).tolist()
    [[2.0, 0.0, 2.0]]
    """

    def __init__(self, layer, **kwargs):
        if isinstance(layer, PruneByActivation):
            raise InputError(f"Layer '{layer.name}' is already wrapped in PruneByActivation.")
        if not isinstance(layer, PRUNABLE_KERAS3_TYPES):
            names = ", ".join(t.__name__ for t in PRUNABLE_KERAS3_TYPES)
            raise InputError(f"Layer '{getattr(layer, 'name', layer)}' of type "
                             f"{type(layer).__name__} cannot be pruned by channel. Expected a "
                             f"Keras 3 layer of type: {names}.")
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self.mask = None
        self.fine_pruning_step = self.fine_pruning_baseline = self.fine_pruning_status = None

    @property
    def channels(self):
        """Number of output channels (filters or units) of the wrapped layer."""
        return _channels(self.layer)

    @property
    def _channels_first(self):
        return (not isinstance(self.layer, keras.layers.Dense)
                and getattr(self.layer, "data_format", None) == "channels_first")

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.mask = self.add_weight(name="channel_mask", shape=(self.channels,),
                                    initializer="ones", trainable=False, dtype="float32")
        for name, dtype, value in _STATE:
            setattr(self, name, self.add_weight(
                name=name, shape=(), dtype=dtype, trainable=False, autocast=False,
                initializer=keras.initializers.Constant(value)))
        self.built = True

    def call(self, inputs, training=None):
        outputs = self.layer(inputs, training=training)
        mask = ops.cast(self.mask, outputs.dtype)
        if self._channels_first:
            mask = ops.reshape(mask, (1, -1) + (1,) * (len(outputs.shape) - 2))
        return outputs * mask

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    # -- mask access -------------------------------------------------------------
    def _require_built(self):
        if self.mask is None:
            raise InputError(f"PruneByActivation layer '{self.name}' is not built yet; call it "
                             "on an input (or build the model) first.")

    def get_mask(self):
        """The mask as a float32 numpy array (1 = kept, 0 = pruned)."""
        self._require_built()
        return np.array(ops.convert_to_numpy(self.mask), dtype=np.float32)

    def set_mask(self, mask):
        """Set the mask from a sequence of 0/1 values, one per channel."""
        self._require_built()
        values = np.asarray(mask, dtype=np.float32).reshape(-1)
        if values.size != self.channels or not np.all((values == 0) | (values == 1)):
            raise InputError(f"The mask of layer '{self.name}' must be {self.channels} values "
                             f"of 0 or 1. Got {np.asarray(mask).tolist()!r} instead.")
        self.mask.assign(values)

    @property
    def pruned_channels(self):
        """Indices of the channels whose mask is 0, in increasing order."""
        return np.flatnonzero(self.get_mask() == 0)

    def zero_pruned_weights(self):
        """Set the kernel slices and biases of pruned channels to exactly zero."""
        keep = self.get_mask()
        if np.all(keep == 1):
            return
        kernel = ops.convert_to_numpy(self.layer.kernel)
        self.layer.kernel.assign(kernel * keep.astype(kernel.dtype))
        if getattr(self.layer, "use_bias", False) and self.layer.bias is not None:
            bias = ops.convert_to_numpy(self.layer.bias)
            self.layer.bias.assign(bias * keep.astype(bias.dtype))

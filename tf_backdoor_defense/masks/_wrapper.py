"""`PruneByActivation`: a per-output-channel mask around a Conv or Dense layer.

The mask is a non-trainable variable of the wrapper (1 = kept, 0 = pruned),
so it is saved with the weights, copied by ``get_weights``/``set_weights`` and
identical on every replica. Callbacks and the sweep only read and write it.
"""

import warnings
import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import check_keras2_model, keras, tf, tfmot
from tf_backdoor_defense.keras3._caller import with_caller_keras
from tf_backdoor_defense.masks._registry import (CONV_TYPES, PRUNABLE_LAYER_TYPES, is_conv,
                                                 is_prunable)

__all__ = [
    "PruneByActivation",
    "OutputLayerPruningWarning",
    "PRUNABLE_LAYER_TYPES",
    "wrap_layers",
    "find_layer",
    "last_conv_layer",
    "get_mask",
    "set_mask",
    "masked_layers",
    "channel_axis",
    "channel_count",
    "unwrap",
    "layer_names",
    "apply_masks",
]


def channel_count(layer):
    """Number of output channels (filters, or units for Dense) of ``layer``, wrapped or not.

    >>> import tf_keras as keras
    >>> channel_count(keras.layers.Dense(3)), channel_count(keras.layers.Conv2D(5, 3))
    (3, 5)
    """
    inner = unwrap(layer)
    return int(inner.units if isinstance(inner, keras.layers.Dense) else inner.filters)


def channel_axis(layer):
    """Axis of ``layer``'s output that holds its channels (units for Dense)."""
    inner = unwrap(layer)
    if isinstance(inner, CONV_TYPES) and getattr(inner, "data_format", None) == "channels_first":
        return 1
    return -1


def _check_prunable(layer):
    if isinstance(layer, PruneByActivation):
        raise InputError(f"Layer '{layer.name}' is already wrapped in PruneByActivation.")
    if not is_prunable(layer):
        names = ", ".join(t.__name__ for t in PRUNABLE_LAYER_TYPES)
        raise InputError(
            f"Layer '{layer.name}' of type {type(layer).__name__} cannot be pruned by "
            f"channel. Expected one of: {names}."
        )


@keras.utils.register_keras_serializable(package="tf_backdoor_defense")
class PruneByActivation(keras.layers.Wrapper, tfmot.sparsity.keras.PrunableLayer):
    """Wraps a Conv1D/Conv2D/Conv3D or Dense layer with a per-channel mask.

    The wrapped layer's output (after its activation function) is multiplied
    by the mask along the channel axis, so a channel whose mask is 0 outputs
    exactly zero. The mask is a non-trainable weight named ``channel_mask``.
    Three non-trainable scalars, ``fine_pruning_step``,
    ``fine_pruning_baseline`` and ``fine_pruning_status``, hold the state of a
    ``FinePruning`` run, so that it survives another ``fit()`` and a restart.

    The wrapper implements tfmot's ``PrunableLayer``: ``prune_low_magnitude``
    can wrap it for unstructured pruning of the kernel, and ``strip_pruning``
    leaves it in place.

    Parameters
    ----------
    layer : keras.layers.Conv1D, Conv2D, Conv3D or Dense
        The layer to wrap. It must not be built into another wrapper.
    **kwargs
        Passed to ``keras.layers.Wrapper`` (``name``, ...).

    Examples
    --------
    >>> from tf_backdoor_defense import PruneByActivation
    >>> import numpy as np, tf_keras as keras
    >>> layer = PruneByActivation(keras.layers.Dense(3, kernel_initializer="ones"))
    >>> _ = layer(np.ones((1, 2), "float32"))
    >>> layer.set_mask([1, 0, 1])
    >>> layer(np.ones((1, 2), "float32")).numpy().tolist()
    [[2.0, 0.0, 2.0]]
    """

    def __init__(self, layer, **kwargs):
        _check_prunable(layer)
        kwargs.setdefault("name", f"{layer.name}")
        super().__init__(layer, **kwargs)
        self.mask = None
        self.fine_pruning_step = self.fine_pruning_baseline = self.fine_pruning_status = None

    @property
    def channels(self):
        """Number of output channels (filters or units) of the wrapped layer."""
        return channel_count(self.layer)

    def build(self, input_shape):
        if not self.layer.built:
            with tf.name_scope(self.layer.name):
                self.layer.build(input_shape)
        self.mask = self.add_weight(
            name="channel_mask",
            shape=(self.channels,),
            initializer="ones",
            trainable=False,
            dtype=self.dtype if self.dtype else "float32",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            synchronization=tf.VariableSynchronization.ON_WRITE,
        )
        # Fine-pruning state, kept as tfmot keeps `pruning_step`: saved with the weights, so a
        # FinePruning callback continues after another fit() or a restart within its first
        # budget (tf_backdoor_defense.finetune._callbacks reads and writes them).
        self.fine_pruning_step = self._state_weight("fine_pruning_step", "int64", 0)
        self.fine_pruning_baseline = self._state_weight("fine_pruning_baseline", "float64", -1.0)
        self.fine_pruning_status = self._state_weight("fine_pruning_status", "int64", 0)
        super().build(input_shape)

    def _state_weight(self, name, dtype, value):
        return self.add_weight(
            name=name, shape=(), dtype=dtype, trainable=False, autocast=False,
            initializer=keras.initializers.Constant(value),
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            synchronization=tf.VariableSynchronization.ON_WRITE,
        )

    def _broadcast_mask(self, rank, dtype=None):
        # the wrapped layer's dtype: under mixed precision it computes in float16
        mask = tf.cast(self.mask, dtype or self.compute_dtype)
        if channel_axis(self) == 1:
            return tf.reshape(mask, [1, -1] + [1] * (rank - 2))
        return mask

    def call(self, inputs, training=None):
        if training is None:
            outputs = self.layer(inputs)
        else:
            outputs = self.layer(inputs, training=training)
        return outputs * self._broadcast_mask(outputs.shape.rank, outputs.dtype)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_prunable_weights(self):
        """The wrapped layer's kernel, for tfmot's ``prune_low_magnitude``."""
        return [self.layer.kernel]

    # -- mask access -----------------------------------------------------
    def get_mask(self):
        """The mask as a float32 numpy array (1 = kept, 0 = pruned)."""
        self._require_built()
        return self.mask.numpy().copy()

    def set_mask(self, mask):
        """Set the mask from a sequence of 0/1 values, one per channel."""
        self._require_built()
        self.mask.assign(_validate_mask(mask, self.channels, self.name))

    @property
    def pruned_channels(self):
        """Indices of the channels whose mask is 0, in increasing order."""
        return np.flatnonzero(self.get_mask() == 0)

    def zero_pruned_weights(self):
        """Set the kernel slices and biases of pruned channels to exactly zero.

        The mask already makes their output zero; this also removes the
        weights, as fine-pruning does before export.
        """
        pruned = self.pruned_channels
        if pruned.size == 0:
            return
        keep = tf.constant(self.get_mask(), dtype=self.layer.kernel.dtype)
        self.layer.kernel.assign(self.layer.kernel * keep)
        if getattr(self.layer, "use_bias", False) and self.layer.bias is not None:
            self.layer.bias.assign(self.layer.bias * keep)

    def _require_built(self):
        if self.mask is None:
            raise RuntimeError(
                f"PruneByActivation layer '{self.name}' is not built yet: call it on an input "
                "or build its model first."
            )


def _validate_mask(mask, channels, name):
    array = np.asarray(mask, dtype=np.float32).reshape(-1)
    if array.shape != (channels,):
        raise InputError(
            f"The mask for layer '{name}' must have {channels} entries, one per channel. "
            f"Received a mask with shape {np.shape(mask)}."
        )
    if not np.all((array == 0) | (array == 1)):
        raise InputError(f"The mask for layer '{name}' must contain only 0 and 1.")
    return array


# -- model-level helpers -------------------------------------------------------
def find_layer(model, name):
    """Return the layer called ``name`` in ``model`` (a clear error if absent)."""
    for layer in model.layers:
        if layer.name == name:
            return layer
    names = [layer.name for layer in model.layers]
    raise InputError(f"Unknown layer '{name}'. The model's layers are: {names}.")


def layer_config(layer):
    """``layer.get_config()`` with the layer's name in it.

    A custom layer that defines no ``get_config`` gets one from its
    ``__init__`` arguments, without the name; a copy made from it would get a
    new name, and weights copied by name would miss it.

    >>> import tf_keras as keras
    >>> layer_config(keras.layers.Dense(2, name="fc"))["name"]
    'fc'
    """
    config = dict(layer.get_config())
    config.setdefault("name", layer.name)
    return config


def clone_layer(layer):
    """A new, unbuilt layer of ``layer``'s class and configuration, under its name.

    The one way the package copies a layer it does not rewrite (``clone_model``'s
    ``clone_function``): tf-keras's default copy renames a custom layer whose
    config lacks the name, and the package finds layers by name afterwards.

    >>> import tf_keras as keras
    >>> clone_layer(keras.layers.Dense(2, name="fc")).name
    'fc'
    """
    return layer.__class__.from_config(layer_config(layer))


def unwrap(layer):
    """The layer inside a ``PruneByActivation`` wrapper, or ``layer`` itself.

    >>> import tf_keras as keras
    >>> dense = keras.layers.Dense(2)
    >>> unwrap(PruneByActivation(dense)) is dense, unwrap(dense) is dense
    (True, True)
    """
    return layer.layer if isinstance(layer, PruneByActivation) else layer


def last_conv_layer(model):
    """Name of the last Conv1D/2D/3D layer of ``model`` (wrapped or not)."""
    for layer in reversed(model.layers):
        if is_conv(unwrap(layer)):
            return layer.name
    raise InputError(
        "The model has no convolutional layer; pass `layers=` to name the Conv or Dense "
        "layers to prune."
    )


def layer_names(model, layers, default=None, *, check=None):
    """The distinct layer names that ``layers`` names, each checked against ``model``.

    The one reading of a ``layers=`` argument: ``None`` (the default layers),
    one name, or a list of names.

    Parameters
    ----------
    model : tf_keras.Model
    layers : None, str or list of str
    default : callable, default=None
        ``default(model)`` gives the names used for ``layers=None``; default:
        the last convolutional layer.
    check : callable, default=None
        ``check(model, name)`` raises for a layer the caller cannot use;
        default: :func:`find_layer` (the layer must exist).

    Returns
    -------
    list of str

    Examples
    --------
    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, name="c"),
    ...                           keras.layers.Flatten(), keras.layers.Dense(2, name="d")])
    >>> layer_names(model, None), layer_names(model, "d"), layer_names(model, ["d", "c"])
    (['c'], ['d'], ['d', 'c'])
    """
    if layers is None:
        names = list(default(model)) if default is not None else [last_conv_layer(model)]
        if not names:
            raise InputError("The model has no layer to prune; pass `layers=` to name them.")
    elif isinstance(layers, str):
        names = [layers]
    elif isinstance(layers, (list, tuple)):
        names = list(layers)
        if not names:
            raise InputError("The 'layers' parameter must name at least one layer. "
                             "Got an empty list.")
    else:
        raise InputTypeError("The 'layers' parameter must be a layer name or a list of names. "
                        f"Got {layers!r} instead.")
    for name in names:
        if not isinstance(name, str):
            raise InputTypeError(f"The 'layers' parameter must hold layer names (strings). "
                            f"Got {name!r} instead.")
    if len(set(names)) != len(names):
        raise InputError(f"The 'layers' parameter names a layer twice (duplicates): {names}.")
    for name in names:
        (check or find_layer)(model, name)
    return names


def masked_layers(model):
    """All ``PruneByActivation`` layers of ``model``, in model order."""
    return [layer for layer in model.layers if isinstance(layer, PruneByActivation)]


def _wrapped_layer(model, name):
    found = find_layer(model, name)
    if not isinstance(found, PruneByActivation):
        raise InputError(f"Layer '{name}' is not wrapped in PruneByActivation.")
    return found


@with_caller_keras
def get_mask(model, layers):
    """Mask of the ``PruneByActivation`` layer(s) named ``layers`` in ``model``.

    One name gives its mask (float32, 1 = kept, 0 = pruned); a list of names
    gives ``{name: mask}``.

    >>> import tf_keras as keras
    >>> model = wrap_layers(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")]),
    ...                     "d", masks={"d": [0, 1]})
    >>> get_mask(model, "d").tolist(), list(get_mask(model, ["d"]))
    ([0.0, 1.0], ['d'])
    """
    if isinstance(layers, str):
        return _wrapped_layer(model, layers).get_mask()
    return {name: _wrapped_layer(model, name).get_mask()
            for name in layer_names(model, layers, check=_wrapped_layer)}


@with_caller_keras(in_place=True)
def set_mask(model, layers, mask):
    """Set the mask of the ``PruneByActivation`` layer(s) named ``layers``, in place.

    One name takes one mask (0/1 values, one per channel); a list of names
    takes ``{name: mask}`` with a mask for each of them.

    >>> import tf_keras as keras
    >>> model = wrap_layers(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")]),
    ...                     "d")
    >>> set_mask(model, ["d"], {"d": [1, 0]})
    >>> get_mask(model, "d").tolist()
    [1.0, 0.0]
    """
    if isinstance(layers, str):
        _wrapped_layer(model, layers).set_mask(mask)
        return
    names = layer_names(model, layers, check=_wrapped_layer)
    if not isinstance(mask, dict) or set(mask) != set(names):
        raise InputError(f"For several layers, the 'mask' parameter must be a dict with one mask "
                         f"for each of {names}. Got {mask!r} instead.")
    for name in names:
        _wrapped_layer(model, name).set_mask(mask[name])


def _copy_layer_weights(source_model, target_model):
    """Copy weights layer by layer, by name; wrapped layers take the inner weights."""
    sources = {layer.name: layer for layer in source_model.layers}
    for target in target_model.layers:
        source = sources[target.name]
        if isinstance(target, PruneByActivation) and not isinstance(source, PruneByActivation):
            target.layer.set_weights(source.get_weights())
        else:
            target.set_weights(source.get_weights())


def check_not_nested(layer, targets):
    """Refuse to rewrite ``targets`` that sit inside ``layer``, a nested model."""
    if isinstance(layer, keras.Model):
        inner_names = {sub.name for sub in layer.layers}
        if inner_names & set(targets):
            raise InputError(
                f"Layer(s) {sorted(inner_names & set(targets))} sit inside the nested model "
                f"'{layer.name}'. Name the nested model's layers directly, or flatten the model."
            )


class OutputLayerPruningWarning(UserWarning):
    """A layer being wrapped for pruning produces the model's output (its units are classes)."""


@with_caller_keras
def wrap_layers(model, layers=None, masks=None):
    """Return a copy of ``model`` with the named layers wrapped in ``PruneByActivation``.

    Works like tfmot's ``prune_low_magnitude`` on a whole model: the result is
    a new Functional or Sequential model with copied weights, sharing nothing
    mutable with ``model``. Layers already wrapped stay wrapped (with their
    masks copied).

    Parameters
    ----------
    model : tf_keras.Model
        A Sequential or Functional model. It is not modified.
    layers : str or list of str, default=None
        Names of the layers to wrap. ``None`` wraps the last convolutional layer.
    masks : dict, default=None
        Optional ``{layer_name: mask}`` to set on the wrapped layers.

    Returns
    -------
    tf_keras.Model

    Examples
    --------
    >>> import tf_keras as keras
    >>> from tf_backdoor_defense import wrap_layers
    >>> model = keras.Sequential([keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, name="conv"), keras.layers.Flatten(),
    ...     keras.layers.Dense(2)])
    >>> wrapped = wrap_layers(model, "conv", masks={"conv": [1, 0, 1, 1]})
    >>> type(wrapped.get_layer("conv")).__name__, wrapped.get_layer("conv").pruned_channels.tolist()
    ('PruneByActivation', [1])
    """
    check_keras2_model(model)
    if not model.built or not getattr(model, "_is_graph_network", False):
        raise InputError(
            "wrap_layers needs a built Sequential or Functional model (subclassed models "
            "cannot be rewritten). Build it with an Input layer first."
        )
    if layers is None:
        layers = [last_conv_layer(model)]
    elif isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    outputs = {id(t) for t in model.outputs}
    for name in layers:
        found = find_layer(model, name)
        if not isinstance(found, PruneByActivation):
            _check_prunable(found)
        if any(id(node.output_tensors) in outputs or any(
                id(t) in outputs for t in tf.nest.flatten(node.output_tensors))
               for node in found._inbound_nodes):
            warnings.warn(f"Layer '{name}' is an output layer of the model: pruning its units "
                          "removes classes (its outputs become constant), not hidden features.",
                          OutputLayerPruningWarning, stacklevel=2)
    masks = dict(masks or {})
    for name in masks:
        if name not in layers and not isinstance(find_layer(model, name), PruneByActivation):
            raise InputError(f"A mask was given for layer '{name}', which is not being wrapped.")
    targets = set(layers)

    def clone(layer):
        check_not_nested(layer, targets)
        new = clone_layer(layer)
        if layer.name in targets and not isinstance(layer, PruneByActivation):
            return PruneByActivation(new, name=layer.name)
        return new

    new_model = keras.models.clone_model(model, clone_function=clone)
    _copy_layer_weights(model, new_model)
    for name, mask in masks.items():
        set_mask(new_model, name, mask)
    return new_model


def apply_masks(model, masks):
    """A copy of ``model`` with the layers of ``masks`` wrapped and masked; ``model`` is unchanged.

    A layer that is already wrapped keeps its pruned channels pruned: its new
    mask is ``masks[name]`` times its current one.

    Parameters
    ----------
    model : tf_keras.Model
    masks : dict
        ``{layer_name: mask}`` (0/1, one entry per channel).

    Returns
    -------
    (tf_keras.Model, dict)
        The masked copy and the masks it holds (float32).

    Examples
    --------
    >>> import tf_keras as keras
    >>> model = wrap_layers(keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, name="d")]),
    ...                     "d", masks={"d": [0, 1, 1]})
    >>> copy, masks = apply_masks(model, {"d": [1, 1, 0]})
    >>> masks["d"].tolist(), get_mask(model, "d").tolist()
    ([0.0, 1.0, 0.0], [0.0, 1.0, 1.0])
    """
    combined = {}
    for name, mask in masks.items():
        found = find_layer(model, name)
        mask = np.asarray(mask, dtype=np.float32).reshape(-1)
        if isinstance(found, PruneByActivation):
            mask = mask * found.get_mask()
        combined[name] = mask.astype(np.float32)
    return wrap_layers(model, list(combined), masks=combined), combined

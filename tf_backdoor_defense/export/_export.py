"""Export a pruned model for serving: masks folded in or channels removed.

:func:`strip_masks` turns a model with ``PruneByActivation`` layers into a
plain tf-keras model (like tfmot's ``strip_pruning``) that computes exactly
what the masked model computes. :func:`export_saved_model`,
:func:`export_keras` and :func:`convert_to_tflite` write it out as files that
load without this package.

How each pruned layer is handled (``ExportReport.layers[i].action``):

``"removed"`` (``shrink=True``)
    The pruned output channels are sliced out of the layer's kernel and bias,
    and out of every layer that reads them: BatchNormalization parameters,
    the input rows of the next Conv/Dense, the rows of a Dense after a
    Flatten (channel ``c`` of an ``H x W x C`` tensor is row ``c``, ``c + C``,
    ``c + 2C``, ...), Concatenate offsets, and the matching channels of every
    branch of an Add (or other elementwise merge) when all branches prune the
    same channels. A pruned channel is exactly zero in the masked model; when
    a layer between it and its consumer turns that zero into a constant ``v``
    (a BatchNormalization, or an activation with ``f(0) != 0``), the consumer's
    bias absorbs ``v`` times the removed weights. That is exact for Dense and
    for ``padding="valid"`` convolutions.
``"folded"``
    The kernel slices and biases of the pruned channels are set to zero, so
    their pre-activation is exactly 0. With an activation where ``f(0) = 0``
    (relu, linear, tanh, ...) the channel outputs exactly 0, as in the masked
    model, and a BatchNormalization after it sees the same 0. With
    ``f(0) != 0`` (sigmoid, ...) the channel outputs the constant ``f(0)``;
    the consumers' kernel rows for it are then zeroed and their biases absorb
    what the masked model feeds them, as above.
``"folded+mask"``
    When neither is possible (an activation that mixes channels, such as
    softmax; or an ``f(0) != 0`` channel that reaches an Add, a "same"-padded
    convolution or the model output), the inner layer is kept (pruned slices
    zeroed where that is exact) and followed by a standard 1x1 Conv (Dense for
    2-D outputs) named ``<layer>_mask`` whose diagonal kernel holds the mask.
    Multiplying by 1 and adding zeros is exact.

Where ``shrink=True`` cannot remove a layer's channels (e.g. an Add joins them
with an unpruned branch, or they reach the model output), that layer is
folded instead, a :class:`ShrinkFallbackWarning` says so and the report gives
the reason. Nothing is approximated.
"""

import os
import pathlib
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.graph._channels import channel_consumers, layer_kind
from tf_backdoor_defense.graph._replay import check_graph_model, replay_nodes, topological_nodes
from tf_backdoor_defense.io._data import atomic_path
from tf_backdoor_defense.keras3._caller import save_model, with_caller_keras
from tf_backdoor_defense.masks._registry import CONV_TYPES, ELEMENTWISE_ACTIVATIONS
from tf_backdoor_defense.masks._wrapper import (PruneByActivation, clone_layer, layer_config,
                                                masked_layers)

__all__ = [
    "ShrinkFallbackWarning",
    "LayerExport",
    "ExportReport",
    "strip_masks",
    "export_saved_model",
    "export_keras",
    "convert_to_tflite",
    "count_params",
]

class ShrinkFallbackWarning(UserWarning):
    """``shrink=True`` could not remove a layer's channels and folded them instead."""


class _Conflict(Exception):
    def __init__(self, origins, reason):
        super().__init__(reason)
        self.origins = frozenset(origins)
        self.reason = reason


@dataclass(frozen=True)
class LayerExport:
    """What the export did to one ``PruneByActivation`` layer.

    ``action`` is ``"removed"``, ``"folded"``, ``"folded+mask"`` or
    ``"unchanged"`` (no channel pruned); ``reason`` says why a requested
    removal (or a plain fold) was not possible, else it is ``""``.
    """

    name: str
    channels: int
    pruned: int
    action: str
    reason: str = ""
    consumers: tuple = ()


@dataclass(frozen=True)
class ExportReport:
    """Summary of :func:`strip_masks`: one :class:`LayerExport` per masked layer."""

    shrink: bool
    layers: tuple
    params_before: int
    params_after: int
    notes: tuple = field(default=())

    def __str__(self):
        lines = [f"export ({'shrink' if self.shrink else 'fold'}): parameters "
                 f"{self.params_before:,} -> {self.params_after:,}"]
        for item in self.layers:
            line = (f"  {item.name}: {item.pruned}/{item.channels} channels pruned -> "
                    f"{item.action}")
            if item.reason:
                line += f" ({item.reason})"
            lines.append(line)
        return "\n".join(lines)


def count_params(model):
    """Number of weights of ``model`` (masks of ``PruneByActivation`` layers excluded)."""
    total = 0
    for weight in model.weights:
        if "channel_mask" in weight.name or "fine_pruning_" in weight.name:  # wrapper state
            continue
        total += int(np.prod(weight.shape))
    return total


# -- the rebuild ---------------------------------------------------------------
@dataclass
class _Dead:
    """Pruned channels on the last axis of one tensor, in original numbering."""

    channels: int
    index: np.ndarray  # sorted channel indices
    const: np.ndarray  # their value in the masked model (constant everywhere)
    removed: np.ndarray  # bool: physically absent from the rebuilt tensor
    origins: frozenset

    def same_channels(self, other):
        return (other is not None and self.channels == other.channels
                and np.array_equal(self.index, other.index)
                and np.array_equal(self.removed, other.removed))


def _activation_info(layer):
    """(elementwise?, f(0)) for the activation of a Conv/Dense layer."""
    activation = getattr(layer, "activation", None)
    if activation is None:
        return True, 0.0
    name = keras.activations.serialize(activation)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    elementwise = isinstance(name, str) and name in ELEMENTWISE_ACTIVATIONS
    f0 = float(np.asarray(activation(tf.zeros([1, 1]))).reshape(-1)[0]) if elementwise else np.nan
    return elementwise, f0


def _flat(structure):
    return tf.nest.flatten(structure)


def _dummy_shape(tensor):
    return [1] + [int(d) if d is not None else 16 for d in tensor.shape[1:]]


def _consume(kernel, bias, dead, layer, kind_name):
    """Remove/zero a linear layer's input rows for ``dead``; absorb constants in the bias."""
    kernel = kernel.astype(np.float64)
    spatial = tuple(range(kernel.ndim - 2))
    nonzero = dead.const != 0
    if np.any(nonzero):
        padding = getattr(layer, "padding", "valid")
        if kind_name != "Dense" and padding != "valid":
            raise _Conflict(dead.origins, (
                f"pruned channels reach {kind_name} '{layer.name}' as the nonzero constant "
                f"their masked value becomes, and its padding='{padding}' makes their "
                "contribution differ at the borders"))
        rows = kernel[..., dead.index[nonzero], :]
        contribution = np.tensordot(dead.const[nonzero], rows.sum(axis=spatial), axes=(0, 0))
        bias = (np.zeros(kernel.shape[-1]) if bias is None else bias.astype(np.float64)) + contribution
    kernel[..., dead.index[~dead.removed], :] = 0.0
    kernel = np.delete(kernel, dead.index[dead.removed], axis=-2)
    return kernel, bias


def _mask_layer(name, mask, rank, dtype, data_format="channels_last"):
    channels = mask.size
    if rank == 2:
        layer = keras.layers.Dense(channels, use_bias=False, name=name, dtype=dtype)
        kernel = np.diag(mask)
    else:
        conv = dict(zip((3, 4, 5), CONV_TYPES)).get(rank)
        if conv is None:
            raise InputError(f"Cannot build a mask layer for a rank-{rank} output.")
        layer = conv(channels, 1, use_bias=False, name=name, dtype=dtype, data_format=data_format)
        kernel = np.diag(mask).reshape((1,) * (rank - 2) + (channels, channels))
    return layer, [kernel.astype(np.float32)]


class _Builder:
    """One attempt at rebuilding ``model`` with the given per-layer modes."""

    def __init__(self, model, modes):
        self.model = model
        self.modes = modes
        self.sequential = isinstance(model, keras.Sequential)
        self.names = {layer.name for layer in model.layers}
        self.arguments = None  # the call arguments of the node being rebuilt, on the new graph
        self.dead = {}
        self.created = {}
        self.fold_notes = {}
        self.mask_added = set()

    def build(self):
        model = self.model
        node_count = {}
        nodes = topological_nodes(model)
        for node in nodes:
            node_count[id(node.layer)] = node_count.get(id(node.layer), 0) + 1
        self.node_count = node_count
        inputs = [keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype,
                              name=tensor._keras_history.layer.name) for tensor in model.inputs]
        if self.sequential:
            self.seq = keras.Sequential(name=model.name)
            self.seq.add(keras.layers.InputLayer(batch_input_shape=tuple(model.inputs[0].shape),
                                                 dtype=model.inputs[0].dtype,
                                                 name=model.inputs[0]._keras_history.layer.name))
        outputs = replay_nodes(nodes, model.inputs, inputs, list(model.outputs), call=self._rebuild)
        for tensor in model.outputs:
            dead = self.dead.get(id(tensor))
            if dead is not None:
                raise _Conflict(dead.origins, "the pruned channels reach the model output")
        if self.sequential:
            return self.seq
        return keras.Model(inputs if len(inputs) > 1 else inputs[0],
                           outputs if len(outputs) > 1 else outputs[0], name=model.name)

    def _rebuild(self, node, args, kwargs):
        """The graph replay's step: rebuild ``node`` on the new graph (``args``, ``kwargs``)."""
        self.arguments = (args, kwargs)
        return self._visit(node)

    # -- helpers -------------------------------------------------------------
    def _call(self, layer, node, weights):
        if self.sequential:
            self.seq.add(layer)
            out = self.seq.outputs[0]
        else:
            args, kwargs = self.arguments
            out = layer(*args, **kwargs)
        if weights is not None:
            layer.set_weights([np.asarray(w, dtype=v.dtype.as_numpy_dtype)
                               for w, v in zip(weights, layer.weights)])
        return out

    def _emit(self, node, layer, weights, dead_out=None, modified=False):
        original = node.layer
        if id(original) in self.created:
            if modified or self.created[id(original)][1]:
                raise _Conflict(dead_out.origins if dead_out else frozenset(),
                                f"layer '{original.name}' is shared by several calls")
            layer, weights = self.created[id(original)][0], None
        else:
            if modified and self.node_count[id(original)] > 1:
                origins = dead_out.origins if dead_out else self._in_origins(node)
                raise _Conflict(origins, f"layer '{original.name}' is shared by several calls")
            self.created[id(original)] = (layer, modified)
        out = self._call(layer, node, weights)
        if dead_out is not None:
            for old in _flat(node.outputs):
                self.dead[id(old)] = dead_out
        return out

    def _in_origins(self, node):
        origins = set()
        for tensor in node.keras_inputs:
            dead = self.dead.get(id(tensor))
            if dead is not None:
                origins |= dead.origins
        return frozenset(origins)

    def _unique_name(self, base):
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    # -- per layer -----------------------------------------------------------
    def _visit(self, node):
        layer = node.layer
        in_dead = [self.dead.get(id(t)) for t in node.keras_inputs]
        if isinstance(layer, PruneByActivation):
            return self._visit_masked(node, in_dead[0] if in_dead else None)
        if isinstance(layer, keras.Model):
            inner = [sub.name for sub in layer.layers if isinstance(sub, PruneByActivation)]
            if inner:
                raise InputError(
                    f"The nested model '{layer.name}' holds PruneByActivation layers {inner}; "
                    "export needs them in the top-level model.")
        if all(d is None for d in in_dead):
            new = clone_layer(layer)
            return self._emit(node, new, layer.get_weights())
        kind = layer_kind(layer)
        origins = self._in_origins(node)
        if kind == "linear":
            return self._visit_linear(node, in_dead[0])
        if kind == "channelwise":
            return self._visit_channelwise(node, in_dead[0])
        if kind == "flatten":
            dead = in_dead[0]
            tensor = node.keras_inputs[0]
            if any(d is None for d in tensor.shape[1:]):
                raise _Conflict(origins, f"Flatten '{layer.name}' has an unknown input shape")
            positions = int(np.prod(tensor.shape[1:-1]))
            offsets = np.arange(positions)[:, None] * dead.channels
            out = _Dead(dead.channels * positions, (offsets + dead.index).reshape(-1),
                        np.tile(dead.const, positions), np.tile(dead.removed, positions),
                        dead.origins)
            new = clone_layer(layer)
            return self._emit(node, new, [], out, modified=True)
        if kind == "concatenate":
            return self._visit_concatenate(node, in_dead, origins)
        if kind == "merge":
            return self._visit_merge(node, in_dead, origins)
        raise _Conflict(origins, (f"{type(layer).__name__} '{layer.name}' reads the pruned "
                                  "channels and cannot be rewritten channel by channel"))

    def _visit_masked(self, node, in_dead):
        wrapper = node.layer
        inner = wrapper.layer
        config = layer_config(inner)
        config["name"] = wrapper.name
        weights = inner.get_weights()
        kernel = weights[0].astype(np.float64)
        bias = weights[1].astype(np.float64) if len(weights) > 1 else None
        channels_last = layer_kind(wrapper) == "linear"
        if in_dead is not None:
            if not channels_last:
                raise _Conflict(in_dead.origins, f"'{wrapper.name}' is not channels_last")
            kernel, bias = _consume(kernel, bias, in_dead, inner, type(inner).__name__)
        mask = wrapper.get_mask()
        pruned = np.flatnonzero(mask == 0)
        mode = self.modes.get(wrapper.name)
        elementwise, f0 = _activation_info(inner)
        if pruned.size and mode == "remove" and not channels_last:
            raise _Conflict({wrapper.name}, "only channels_last layers can be shrunk")
        dead_out, after = None, None
        if pruned.size and mode == "remove":
            if not elementwise:
                raise _Conflict({wrapper.name}, (
                    f"its activation '{keras.activations.serialize(inner.activation)}' mixes "
                    "channels"))
            if pruned.size == mask.size:
                raise _Conflict({wrapper.name}, "all of its channels are pruned")
            kept = np.flatnonzero(mask != 0)
            kernel = kernel[..., kept]
            bias = bias[kept] if bias is not None else None
            config["units" if "units" in config else "filters"] = int(kept.size)
            dead_out = _Dead(mask.size, pruned, np.zeros(pruned.size), np.ones(pruned.size, bool),
                             frozenset({wrapper.name}))
        elif pruned.size:
            if elementwise:
                kernel[..., pruned] = 0.0
                if bias is not None:
                    bias[pruned] = 0.0
            if mode == "mask" or not elementwise or (f0 != 0 and not channels_last):
                if not elementwise:
                    self.fold_notes[wrapper.name] = (
                        f"its activation '{keras.activations.serialize(inner.activation)}' "
                        "mixes channels")
                elif mode != "mask":
                    self.fold_notes[wrapper.name] = (
                        f"f(0) = {f0:g} != 0 on a channels_first layer")
                self.mask_added.add(wrapper.name)
                after = _mask_layer(self._unique_name(f"{wrapper.name}_mask"), mask,
                                    len(_flat(node.outputs)[0].shape), inner.dtype,
                                    getattr(inner, "data_format", None) or "channels_last")
            elif f0 != 0:
                dead_out = _Dead(mask.size, pruned, np.zeros(pruned.size),
                                 np.zeros(pruned.size, bool), frozenset({wrapper.name}))
        if bias is not None and not config.get("use_bias", True):
            config["use_bias"] = True
        new = inner.__class__.from_config(config)
        new_weights = [kernel] + ([bias] if bias is not None else [])
        modified = dead_out is not None or after is not None
        out = self._emit(node, new, new_weights, dead_out, modified=modified)
        if after is not None:
            mask_layer, mask_weights = after
            if self.sequential:
                self.seq.add(mask_layer)
                mask_out = self.seq.outputs[0]
            else:
                mask_out = mask_layer(out)
            mask_layer.set_weights(mask_weights)
            return mask_out
        return out

    def _visit_linear(self, node, dead):
        layer = node.layer
        config = layer_config(layer)
        weights = layer.get_weights()
        kernel = weights[0]
        bias = weights[1] if len(weights) > 1 else None
        kernel, bias = _consume(kernel, bias, dead, layer, type(layer).__name__)
        if bias is not None:
            config["use_bias"] = True
        new = layer.__class__.from_config(config)
        return self._emit(node, new, [kernel] + ([bias] if bias is not None else []),
                          modified=True)

    def _visit_channelwise(self, node, dead):
        layer = node.layer
        tensor = node.keras_inputs[0]
        x = np.zeros(_dummy_shape(tensor), np.float32)
        x[..., dead.index] = dead.const
        try:
            y = np.asarray(layer(tf.constant(x), training=False))
        except Exception as error:  # noqa: BLE001 - any failure means "cannot follow"
            raise _Conflict(dead.origins, f"could not follow the channels through "
                                          f"'{layer.name}': {error}") from None
        values = y.reshape(-1, y.shape[-1])[:, dead.index]
        if values.shape[0] and not np.all(values == values[:1]):
            raise _Conflict(dead.origins, (
                f"after {type(layer).__name__} '{layer.name}' the pruned channels are no longer "
                "constant"))
        const = values[0].astype(np.float64) if values.shape[0] else dead.const
        weights = layer.get_weights()
        if weights and np.any(dead.removed):
            if not isinstance(layer, keras.layers.BatchNormalization):
                raise _Conflict(dead.origins, f"cannot slice the weights of '{layer.name}'")
            weights = [np.delete(w, dead.index[dead.removed], axis=-1) for w in weights]
        new = clone_layer(layer)
        out_dead = _Dead(dead.channels, dead.index, const, dead.removed, dead.origins)
        return self._emit(node, new, weights, out_dead, modified=True)

    def _visit_concatenate(self, node, in_dead, origins):
        layer = node.layer
        rank = len(node.keras_inputs[0].shape)
        if layer.axis not in (-1, rank - 1):
            raise _Conflict(origins, f"Concatenate '{layer.name}' joins on axis {layer.axis}, "
                                     "not the channel axis")
        index, const, removed, offset = [], [], [], 0
        for tensor, dead in zip(node.keras_inputs, in_dead):
            channels = int(tensor.shape[-1])
            if dead is not None:
                index.append(dead.index + offset)
                const.append(dead.const)
                removed.append(dead.removed)
            offset += channels
        out = _Dead(offset, np.concatenate(index), np.concatenate(const), np.concatenate(removed),
                    origins)
        new = clone_layer(layer)
        return self._emit(node, new, [], out, modified=True)

    def _visit_merge(self, node, in_dead, origins):
        layer = node.layer
        first = in_dead[0]
        if first is None or not all(first.same_channels(d) for d in in_dead[1:]):
            raise _Conflict(origins, (
                f"{type(layer).__name__} '{layer.name}' joins the pruned channels with a branch "
                "where the same channels are not pruned"))
        vectors = []
        for dead in in_dead:
            vector = np.zeros((1, dead.channels), np.float32)
            vector[0, dead.index] = dead.const
            vectors.append(tf.constant(vector))
        const = np.asarray(layer(vectors))[0, first.index].astype(np.float64)
        out = _Dead(first.channels, first.index, const, first.removed, origins)
        new = clone_layer(layer)
        return self._emit(node, new, [], out, modified=True)


def _refuse_wrapped_masks(model):
    """An :class:`InputError` when a ``PruneByActivation`` sits inside another wrapper
    (tfmot's ``prune_low_magnitude``, ...), whose masks the export cannot see."""
    for layer in model.layers:
        inner = getattr(layer, "layer", None)
        if isinstance(inner, PruneByActivation) and not isinstance(layer, PruneByActivation):
            raise InputError(
                f"Layer '{layer.name}' ({type(layer).__name__}) wraps the PruneByActivation "
                f"layer '{inner.name}', whose mask the export cannot fold through that wrapper. "
                "Call tfmot.sparsity.keras.strip_pruning(model) first (for tfmot's "
                "prune_low_magnitude), then export the stripped model.")
        if isinstance(layer, keras.Model):
            _refuse_wrapped_masks(layer)


@with_caller_keras
def strip_masks(model, *, shrink=False, return_report=False):
    """A plain tf-keras copy of ``model`` with its channel masks applied to the weights.

    Like tfmot's ``strip_pruning``: every ``PruneByActivation`` layer is
    replaced by its inner Conv/Dense layer, so the result needs no custom
    objects to save, load or serve. ``model`` is not changed. The result
    computes what the masked model computes (see the module doc for how each
    case is kept exact).

    Parameters
    ----------
    model : tf_keras.Model
        A Sequential or Functional model, usually with ``PruneByActivation`` layers.
    shrink : bool, default=False
        ``False`` folds the masks into the weights (pruned kernel slices and
        biases become zero). ``True`` removes the pruned channels from the
        layer and from every layer that reads them, where the architecture
        allows it; elsewhere it folds and warns (:class:`ShrinkFallbackWarning`).
    return_report : bool, default=False
        Also return an :class:`ExportReport`.

    Returns
    -------
    tf_keras.Model or (tf_keras.Model, ExportReport)

    Raises
    ------
    InputError
        When a ``PruneByActivation`` layer is inside another wrapper, such as
        tfmot's ``prune_low_magnitude``: call
        ``tfmot.sparsity.keras.strip_pruning(model)`` first.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> from tf_backdoor_defense import wrap_layers
    >>> model = keras.Sequential([keras.Input((6, 6, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.Flatten(), keras.layers.Dense(2, name="fc")])
    >>> masked = wrap_layers(model, "conv", masks={"conv": [1, 0, 1, 0]})
    >>> small, report = strip_masks(masked, shrink=True, return_report=True)
    >>> small.get_layer("conv").filters, small.get_layer("fc").kernel.shape[0]
    (2, 32)
    >>> x = np.random.default_rng(0).random((3, 6, 6, 1), dtype=np.float32)
    >>> bool(np.max(np.abs(small(x) - masked(x))) <= 1e-5)
    True
    >>> report.layers[0].action
    'removed'
    """
    check_graph_model(model)
    if not isinstance(shrink, bool):
        raise InputTypeError(f"The 'shrink' parameter must be True or False. Got {shrink!r} instead.")
    _refuse_wrapped_masks(model)
    wrapped = masked_layers(model)
    modes = {}
    for layer in wrapped:
        if not layer.built or layer.mask is None:
            raise InputError(f"PruneByActivation layer '{layer.name}' is not built.")
        if layer.pruned_channels.size:
            modes[layer.name] = "remove" if shrink else "fold"
    reasons = {}
    for _ in range(3 * len(modes) + 1):
        builder = _Builder(model, modes)
        try:
            stripped = builder.build()
            break
        except _Conflict as conflict:
            changed = False
            for name in sorted(conflict.origins):
                step = {"remove": "fold", "fold": "mask"}.get(modes.get(name))
                if step:
                    modes[name] = step
                    reasons.setdefault(name, conflict.reason)
                    changed = True
            if not changed:
                raise RuntimeError(f"Export could not resolve: {conflict.reason}") from None
    else:  # pragma: no cover - each conflict changes a mode, so this cannot loop forever
        raise RuntimeError("Export did not converge.")
    reasons.update({k: v for k, v in builder.fold_notes.items() if k not in reasons})

    items = []
    for layer in wrapped:
        mode = modes.get(layer.name)
        action = {None: "unchanged", "remove": "removed", "fold": "folded",
                  "mask": "folded+mask"}[mode]
        if layer.name in builder.mask_added:
            action = "folded+mask"
        consumers = tuple(str(use) for use in channel_consumers(model, layer.name))
        items.append(LayerExport(layer.name, layer.channels, int(layer.pruned_channels.size),
                                 action, reasons.get(layer.name, ""), consumers))
        if shrink and mode in ("fold", "mask"):
            warnings.warn(
                f"Cannot remove the pruned channels of layer '{layer.name}': "
                f"{reasons.get(layer.name, 'unsupported architecture')}. Its mask is folded into "
                "the weights instead (exact, but no speed-up for this layer).",
                ShrinkFallbackWarning, stacklevel=2)
    report = ExportReport(shrink, tuple(items), count_params(model), count_params(stripped))
    return (stripped, report) if return_report else stripped


# -- writing files -------------------------------------------------------------
def _serving_module(model):
    """A ``tf.Module`` holding only the model's variables and a serving function."""
    specs = [tf.TensorSpec(t.shape, t.dtype, name=t._keras_history.layer.name)
             for t in model.inputs]
    names = list(model.output_names)

    @tf.function(input_signature=specs)
    def serve(*inputs):
        outputs = model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(names, outputs))

    module = tf.Module()
    module.model_weights = list(model.weights)
    module.serve = serve
    return module, serve.get_concrete_function()


def _prepare_target(path, overwrite, name="path"):
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"The '{name}' parameter must be a path. Got {path!r} instead.")
    target = pathlib.Path(path)
    if target.exists() and not overwrite:
        raise InputError(f"'{target}' already exists. Pass overwrite=True to replace it.")
    return target


@with_caller_keras
def export_saved_model(model, path, *, shrink=False, version=None, overwrite=False):
    """Write ``model`` as a plain SavedModel with a ``serving_default`` signature.

    The masks are applied first (:func:`strip_masks`). The SavedModel holds
    only the weights and the serving function: it loads with
    ``tf.saved_model.load`` (and TF Serving, TFLite) without this package.
    It is written into a temporary folder next to ``path`` and renamed, so
    ``path`` never holds a half-written model.

    Parameters
    ----------
    model : tf_keras.Model
    path : str or os.PathLike
        Folder to write. With ``version``, the model goes to ``path/<version>``
        (TF Serving's layout: ``model_base_path/1/saved_model.pb``).
    shrink : bool, default=False
        Remove pruned channels (see :func:`strip_masks`).
    version : int, default=None
        A positive model version for TF Serving.
    overwrite : bool, default=False
        Replace an existing export.

    Returns
    -------
    pathlib.Path
        The folder holding ``saved_model.pb``.

    Examples
    --------
    >>> import tempfile, numpy as np, tf_keras as keras, tensorflow as tf
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = export_saved_model(model, tmp + "/served", version=1)
    ...     serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
    ...     folder.name, list(serve(tf.zeros((1, 3)))) == ["fc"]
    ('1', True)
    """
    check_graph_model(model)
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InputError(f"The 'version' parameter must be a positive int (TF Serving "
                             f"versions are numbers). Got {version!r} instead.")
        if not isinstance(path, (str, os.PathLike)):
            raise InputTypeError(f"The 'path' parameter must be a path. Got {path!r} instead.")
        path = pathlib.Path(path) / str(version)
    _refuse_wrapped_masks(model)
    target = _prepare_target(path, overwrite)
    stripped = strip_masks(model, shrink=shrink) if masked_layers(model) else model
    module, signature = _serving_module(stripped)
    with atomic_path(target, directory=True) as temp:
        tf.saved_model.save(module, str(temp), signatures={"serving_default": signature})
    return target


@with_caller_keras
def export_keras(model, path, *, shrink=False, overwrite=False):
    """Save a plain copy of ``model`` (masks applied) as ``.h5`` or ``.keras``.

    The file loads with ``tf_keras.models.load_model(path)`` and no
    ``custom_objects`` (a Keras 3 model is saved by Keras 3: it loads with
    ``keras.saving.load_model(path)``). It is written to a temporary file in the same folder
    and renamed into place.

    Parameters
    ----------
    model : tf_keras.Model
    path : str or os.PathLike
        Ends with ``.h5`` (HDF5) or ``.keras`` (the Keras v3 zip format).
    shrink : bool, default=False
        Remove pruned channels (see :func:`strip_masks`).
    overwrite : bool, default=False

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import tempfile, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = export_keras(model, tmp + "/model.keras")
    ...     keras.models.load_model(path).output_shape
    (None, 2)
    """
    check_graph_model(model)
    target = _prepare_target(path, overwrite)
    suffix = target.suffix.lower()
    if suffix not in (".h5", ".keras"):
        raise InputError(f"The 'path' parameter must end with '.h5' or '.keras'. "
                         f"Got '{target.name}' instead.")
    stripped = strip_masks(model, shrink=shrink)
    with atomic_path(target) as temp:
        save_model(stripped, temp)  # by Keras 3 for a Keras 3 model
    return target


@with_caller_keras
def convert_to_tflite(model_or_path, *, shrink=False):
    """Convert a model, or an exported SavedModel folder, to a TFLite flatbuffer.

    Parameters
    ----------
    model_or_path : tf_keras.Model, str or os.PathLike
        A model (its masks are applied first, see :func:`strip_masks`) or a
        folder written by :func:`export_saved_model`.
    shrink : bool, default=False
        For a model: remove pruned channels first.

    Returns
    -------
    bytes
        The ``.tflite`` model; run it with ``tf.lite.Interpreter(model_content=...)``.

    Raises
    ------
    InputError
        For a mixed-precision model (``mixed_float16``/``mixed_bfloat16`` layers),
        which the converter cannot take: convert a float32 copy instead.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        folder = pathlib.Path(model_or_path)
        if not (folder / "saved_model.pb").is_file():
            raise InputError(f"'{folder}' is not a SavedModel folder (no saved_model.pb). "
                             "Pass the versioned folder returned by export_saved_model.")
        converter = tf.lite.TFLiteConverter.from_saved_model(str(folder))
        return converter.convert()
    check_graph_model(model_or_path)
    mixed = [(layer.name, policy) for layer in model_or_path.layers
             for policy in [str(getattr(getattr(layer, "dtype_policy", None), "name", ""))]
             if policy.startswith("mixed")]
    if mixed:
        raise InputError(f"convert_to_tflite cannot convert a mixed-precision model (layer "
                         f"'{mixed[0][0]}' has policy {mixed[0][1]}): rebuild the model in "
                         "float32 (set_global_policy('float32')), copy the weights, and convert "
                         "that.")
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_saved_model(model_or_path, pathlib.Path(tmp) / "model", shrink=shrink)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(folder))
        return converter.convert()

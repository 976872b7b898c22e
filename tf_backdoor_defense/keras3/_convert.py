"""Keras 3 <-> tf-keras conversion of Sequential and Functional models, through configs and weights.

The package computes with tf-keras (Keras 2, which tfmot needs). A Keras 3
model is converted to an equivalent tf-keras model on the way in and every
model in the result is converted back on the way out, so a Keras 3 caller
gets Keras 3 models (:mod:`~tf_backdoor_defense.keras3._caller`).

The conversion never deserializes anything it has not checked first:
:func:`scan_keras3_config` reads the configuration and refuses, naming the
layer, a ``Lambda``, a custom or registered class, a module outside Keras, a
shared layer or a layer class outside the supported built-ins
(:data:`SUPPORTED_LAYERS`, and the few tensor operations of
:mod:`~tf_backdoor_defense.keras3._ops`). Only then are the target layers built,
one by one, from filtered configs, and the weights copied layer by layer.

Models used as layers (the data-augmentation ``Sequential`` that Keras's
image tutorials put inside a Functional model, or a backbone inside a
``Sequential``) are checked layer by layer like the outer model and
flattened: their layers join the outer model under their own names, so the
converted model is one Functional model (a nested model must have one input
and one output, and its layer names must differ from the outer ones). The
image augmentation layers (``RandomFlip``, ``RandomRotation``, ...) convert:
they change nothing at inference, which is how the package reads a model;
``RandomCrop``, whose inference output differs between the two Keras, does
not.
A configuration key that the other Keras does not know is dropped only when
it holds its neutral value (``None``, ``False``, ...), a value that is the
other Keras's fixed behaviour (``data_format="channels_last"``, ...), or
when it cannot change what the model computes (an initializer, whose weights
are copied over); a key the other Keras knows under another name is renamed
(``LeakyReLU``'s ``negative_slope`` and ``alpha``). Otherwise the layer is
refused, so a converted model computes what the original computes; so is an
activation the two Keras compute differently (``hard_sigmoid``).
"""

import inspect

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras as tf_keras
from tf_backdoor_defense.keras3._backend import is_keras3_model, keras3
from tf_backdoor_defense.keras3._ops import apply_op, op_function

__all__ = [
    "SUPPORTED_LAYERS",
    "Keras3ConversionError",
    "scan_keras3_config",
    "to_tf_keras",
    "to_keras3",
    "copy_weights",
]

#: Built-in layer classes that convert between Keras 3 and tf-keras (same name in both).
SUPPORTED_LAYERS = frozenset({
    "InputLayer", "Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
    "Conv3DTranspose", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    "BatchNormalization", "LayerNormalization", "Activation", "ReLU", "LeakyReLU", "ELU",
    "PReLU", "Softmax", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "GaussianNoise", "GaussianDropout", "Flatten", "Reshape", "Permute", "RepeatVector",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
    "UpSampling1D", "UpSampling2D", "UpSampling3D", "Add", "Subtract", "Multiply", "Average",
    "Maximum", "Minimum", "Concatenate", "Rescaling", "Identity", "Normalization", "Resizing",
    "CenterCrop", "RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom",
    "RandomContrast", "RandomBrightness", "GroupNormalization", "UnitNormalization",
    "ActivityRegularization", "AlphaDropout", "PruneByActivation",
})
_MERGE_LAYERS = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate"}
_MODEL_CLASSES = {"Functional", "Sequential", "Model"}
#: How deep models may nest inside models (an augmentation ``Sequential`` inside a
#: Functional model is one level).
_MAX_NESTING = 8
_WRAPPER_NAMES = {"PruneByActivation", "tf_backdoor_defense>PruneByActivation"}
#: Keys of nested objects that are the serialization format, not settings.
_FORMAT_KEYS = {"module", "registered_name", "build_config", "compile_config", "shared_object_id"}
#: Settings that a layer of the other Keras lacks because they are its fixed behaviour there,
#: dropped when the target lacks the key: tf-keras image layers read channels-last images
#: only; Keras 3's ``RandomContrast`` clips to a value range while training, 0-255 by default
#: (its default again on the way back); ``Resizing``'s fill settings act only with
#: ``pad_to_aspect_ratio``, which tf-keras's ``Resizing`` lacks and which is refused when set;
#: tf-keras's ``DepthwiseConv2D`` writes ``groups=1``, which is what a depthwise conv is;
#: ``trainable=True`` is every layer's default.
_IMPLICIT = {("data_format", "channels_last"), ("value_range", (0, 255)),
             ("fill_mode", "constant"), ("fill_value", 0.0), ("groups", 1), ("trainable", True)}
#: Settings under another name in the other Keras (``LeakyReLU``'s slope).
_RENAMED = (("negative_slope", "alpha"),)
#: Activations that both Keras name but compute differently (tf-keras's ``hard_sigmoid`` is
#: ``0.2 x + 0.5``, Keras 3's ``x / 6 + 0.5``, both clipped to [0, 1]).
_DIFFERENT_ACTIVATIONS = {"hard_sigmoid"}
#: Activations of one Keras under another name in the other: Keras 3's ``silu`` (which
#: EfficientNet uses) is tf-keras's ``swish``, the same function.
_ACTIVATION_ALIASES = {"silu": "swish"}
#: Keys dropped whatever their value when the target lacks them: tf-keras's random layers
#: name the kind of random generator they draw from while training, and a tf-keras layer
#: given ``input_shape=`` keeps the shape it was built for, which the converted model's
#: ``Input`` (or the tensor a nested model is called on) sets.
_DROPPED_KEYS = {"rng_type", "batch_input_shape"}
#: Keyword arguments every layer accepts, in each Keras.
_BASE_KWARGS = {"name", "trainable", "dtype"}
#: Nested-object families and the sub-module of each Keras that holds their classes.
_FAMILIES = ("initializers", "regularizers", "constraints")
#: Keras 3 dtype-policy classes (a policy is written as its name for tf-keras).
_POLICY_CLASSES = {"DTypePolicy", "FloatDTypePolicy", "Policy", "PolicyV1"}


class Keras3ConversionError(InputError):
    """A model that cannot be converted between Keras 3 and tf-keras.

    Attributes
    ----------
    layer : str or None
        Name of the layer that stops the conversion.
    class_name : str or None
        Its class.
    """

    def __init__(self, message, *, layer=None, class_name=None):
        super().__init__(message)
        self.layer = layer
        self.class_name = class_name


def _refuse(layer, class_name, why):
    raise Keras3ConversionError(
        f"Layer '{layer}' (class {class_name}) {why} Supported: Sequential and Functional "
        "models of the built-in Keras layers (Dense, Conv1D/2D/3D, pooling, normalization, "
        "merge, reshape and activation layers) and PruneByActivation.",
        layer=layer, class_name=class_name)


# -- the scan -----------------------------------------------------------------------------
def _model_body(config):
    """``(class_name, body)`` of a model config, with or without its ``class_name`` envelope."""
    if not isinstance(config, dict):
        raise Keras3ConversionError(f"A model configuration must be a dict. Got "
                                    f"{type(config).__name__}.")
    if "layers" in config:
        return ("Sequential" if "input_layers" not in config else "Functional"), config
    class_name = config.get("class_name")
    if class_name not in _MODEL_CLASSES or not isinstance(config.get("config"), dict):
        raise Keras3ConversionError(
            f"Only Sequential and Functional models convert; the model is of class "
            f"{class_name!r}. Subclassed models have no configuration to check.",
            class_name=class_name)
    _check_module(config, config.get("config", {}).get("name", "model"), class_name)
    return class_name, config["config"]


def _check_module(entry, layer, class_name):
    module = entry.get("module")
    if module is not None and not (module in ("keras", "tf_keras", "tf_backdoor_defense")
                                   or str(module).startswith(("keras.", "tf_keras.",
                                                              "tf_backdoor_defense."))):
        _refuse(layer, class_name, f"names the module {module!r}, which would be imported.")
    registered = entry.get("registered_name")
    if registered not in (None, class_name) and registered not in _WRAPPER_NAMES:
        _refuse(layer, class_name, f"is a custom registered class ({registered!r}).")


def _scan_nested(value, layer, class_name):
    """Refuse code, custom classes and foreign modules anywhere inside one layer's config."""
    if isinstance(value, dict):
        inner = value.get("class_name")
        if isinstance(inner, str):
            if inner in ("Lambda", "__lambda__", "function") or "lambda" in inner.lower():
                _refuse(layer, class_name, f"holds Python code ({inner}).")
            _check_module(value, layer, class_name)
        for item in value.values():
            _scan_nested(item, layer, class_name)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _scan_nested(item, layer, class_name)


def _layer_entries(body):
    layers = body.get("layers")
    if not isinstance(layers, list):
        raise Keras3ConversionError("The model configuration has no list of layers.")
    return layers


def scan_keras3_config(config):
    """Check a Keras 3 (or tf-keras) model configuration before anything is built.

    Parameters
    ----------
    config : dict
        ``model.get_config()``, or the ``{"class_name": ..., "config": ...}``
        of a ``.keras``/``.h5`` file.

    Returns
    -------
    list of str
        The layer names, in the configuration's order: those of the model
        once nested models are flattened (their layers in their place, not
        their own names or input layers).

    Raises
    ------
    Keras3ConversionError
        Naming the first layer that is a ``Lambda``, custom, registered
        outside Keras, shared, or not a supported built-in (nested models
        are checked layer by layer), or naming layer names that repeat.

    Examples
    --------
    >>> scan_keras3_config({"name": "m", "layers": [
    ...     {"class_name": "InputLayer", "config": {"name": "x", "batch_shape": [None, 2]}},
    ...     {"class_name": "Dense", "config": {"name": "fc", "units": 2}}]})
    ['x', 'fc']
    >>> scan_keras3_config({"name": "m", "layers": [
    ...     {"class_name": "Lambda", "config": {"name": "code"}}]})
    Traceback (most recent call last):
    ...
    tf_backdoor_defense.keras3._convert.Keras3ConversionError: Layer 'code' (class Lambda) ...
    """
    _, body = _model_body(config)
    names = []
    _scan_layers(_layer_entries(body), names, depth=0)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise Keras3ConversionError(
            f"The model configuration repeats the layer name(s) {repeated} (a nested model's "
            "layers join the outer model's, so their names must differ from its names).")
    return names


def _scan_layers(entries, names, depth):
    """Check one model's layer entries (a nested model's too); append the flat names."""
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            raise Keras3ConversionError("A layer entry of the model configuration is malformed.")
        class_name = entry.get("class_name")
        name = entry.get("name") or entry["config"].get("name") or "?"
        if str(entry.get("module") or "").startswith("tensorflow_model_optimization"):
            _refuse(name, class_name, "is a tfmot wrapper. tfmot composition stays tf-keras only, "
                    "because tfmot itself is: strip it (tfmot.sparsity.keras.strip_pruning) "
                    "before converting to Keras 3.")
        _check_module(entry, name, class_name)
        nodes = entry.get("inbound_nodes") or []
        if len(nodes) > 1:
            _refuse(name, class_name, "is shared (called more than once); shared layers do not "
                    "convert.")
        if class_name in _MODEL_CLASSES:
            _scan_nested_model(entry, name, class_name, names, depth)
            continue
        if op_function(entry) is None and class_name not in SUPPORTED_LAYERS \
                and class_name not in _WRAPPER_NAMES:
            _refuse(name, class_name, "is not a supported built-in layer.")
        _scan_nested(entry["config"], name, class_name)
        if class_name in _WRAPPER_NAMES:
            inner = entry["config"].get("layer")
            inner_class = inner.get("class_name") if isinstance(inner, dict) else None
            if inner_class not in ("Dense", "Conv1D", "Conv2D", "Conv3D"):
                _refuse(name, class_name, f"wraps a {inner_class!r} layer; PruneByActivation "
                        "wraps Dense or Conv1D/2D/3D only.")
        activation = entry["config"].get("activation")
        if activation is not None and not isinstance(activation, str):
            _refuse(name, class_name, "has an activation that is not a built-in name.")
        if class_name != "InputLayer" or depth == 0:  # a nested model's input is dropped
            names.append(name)


def _scan_nested_model(entry, name, class_name, names, depth):
    """Check a model used as a layer: one input, one output, built-in layers within."""
    if depth >= _MAX_NESTING:
        _refuse(name, class_name, f"is a model nested more than {_MAX_NESTING} deep.")
    body = entry["config"]
    if class_name != "Sequential":
        for key in ("input_layers", "output_layers"):
            try:
                count = len(_endpoints(body.get(key) or []))
            except (KeyError, TypeError, IndexError):
                raise Keras3ConversionError(f"The nested model '{name}' has a malformed "
                                            f"'{key}' entry.") from None
            if count != 1:
                _refuse(name, class_name, "is a nested model with several inputs or outputs; "
                        "only nested models of one input and one output convert.")
    _scan_layers(_layer_entries(body), names, depth + 1)


# -- configs between the two Keras ---------------------------------------------------------
def _accepted(cls):
    """Keyword arguments ``cls.__init__`` takes explicitly, or None when it takes ``**kwargs`` only."""
    keys = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        keys |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return keys - {"self"}


def _neutral(value):
    return value is None or value is False or value == {} or value == [] or value == ()


def _implicit(key, value):
    """Whether ``key=value`` is the other Keras's fixed behaviour (see ``_IMPLICIT``)."""
    if key in _DROPPED_KEYS or key.endswith("_initializer"):
        return True  # an initializer only draws the initial weights, which are copied over
    if isinstance(value, list):
        value = tuple(value)
    try:
        return (key, value) in _IMPLICIT
    except TypeError:  # unhashable: a nested config, never implicit
        return False


def _renamed(config, accepted):
    """``config`` with keys the target knows under another name renamed (either way)."""
    config = dict(config)
    for one, other in _RENAMED:
        for source, target in ((one, other), (other, one)):
            if source in config and source not in accepted and target in accepted \
                    and target not in config:
                config[target] = config.pop(source)
    return config


def _takes_kwargs(cls):
    init = next((k.__dict__["__init__"] for k in cls.__mro__ if "__init__" in k.__dict__), None)
    return init is not None and any(p.kind == p.VAR_KEYWORD
                                    for p in inspect.signature(init).parameters.values())


def _filter(config, cls, layer, class_name, target):
    # A layer whose __init__ takes no **kwargs takes only what it names (Keras 3's
    # SpatialDropout2D has no ``trainable``).
    accepted = _accepted(cls) | (_BASE_KWARGS if _takes_kwargs(cls) else set())
    config = _renamed(config, accepted)
    kept = {}
    for key, value in config.items():
        if key in accepted:
            kept[key] = value
        elif not (_neutral(value) or _implicit(key, value)):
            _refuse(layer, class_name, f"sets {key}={value!r}, which {target} does not support.")
    return kept


def _nested_object(value, family, target_keras, layer, class_name, target):
    """An initializer/regularizer/constraint config in the target Keras's plain form."""
    if not isinstance(value, dict) or "class_name" not in value:
        return value
    inner = value["class_name"]
    cls = getattr(getattr(target_keras, family), inner, None)
    if not inspect.isclass(cls):
        _refuse(layer, class_name, f"uses the {family[:-1]} {inner!r}, which {target} lacks.")
    config = _filter(value.get("config") or {}, cls, layer, class_name, target)
    return {"class_name": inner, "config": config}


def _dtype(value):
    if isinstance(value, dict) and value.get("class_name") in _POLICY_CLASSES:
        return (value.get("config") or {}).get("name", "float32")
    return value


def _family(key):
    for family in _FAMILIES:
        if key.endswith(family[:-1]) and key != "activity_regularizer":
            return family
    return "regularizers" if key == "activity_regularizer" else None


def _layer_config(class_name, config, layer, target_keras, target):
    """``config`` of ``class_name`` rewritten for ``target_keras`` (checked, filtered)."""
    config = dict(config)
    if "dtype" in config:
        config["dtype"] = _dtype(config["dtype"])
    if class_name == "InputLayer":
        shape = config.pop("batch_shape", None) or config.pop("batch_input_shape", None)
        return {"name": config.get("name", layer), "batch_shape": shape,
                "dtype": config.get("dtype") or "float32",
                "sparse": bool(config.get("sparse", False))}
    if class_name == "BatchNormalization" and isinstance(config.get("axis"), (list, tuple)):
        if len(config["axis"]) != 1:  # tf-keras keeps a list; Keras 3 takes one axis
            _refuse(layer, class_name, f"normalizes over several axes {config['axis']}.")
        config["axis"] = int(config["axis"][0])
    cls = getattr(target_keras.layers, class_name)
    for key, value in list(config.items()):
        family = _family(key)
        if family is not None:
            config[key] = _nested_object(value, family, target_keras, layer, class_name, target)
    activation = config.get("activation")
    if activation in _DIFFERENT_ACTIVATIONS:
        _refuse(layer, class_name, f"uses the activation {activation!r}, which tf-keras and "
                "Keras 3 compute differently.")
    if isinstance(activation, str) and not callable(getattr(target_keras.activations,
                                                            activation, None)):
        alias = _ACTIVATION_ALIASES.get(activation)
        if alias is None or not callable(getattr(target_keras.activations, alias, None)):
            _refuse(layer, class_name, f"uses the activation {activation!r}, which {target} "
                    "lacks.")
        config["activation"] = alias
    return _filter(config, cls, layer, class_name, target)


# -- the graph ----------------------------------------------------------------------------
def _history(value):
    """The source layer name of one inbound tensor, in either Keras's node format."""
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        history = value["config"]["keras_history"]
        return history[0], history[1], history[2]
    if isinstance(value, (list, tuple)) and len(value) >= 3 and isinstance(value[0], str):
        return value[0], value[1], value[2]
    return None


def _inbound(entry, class_name, layer):
    """The names of the layers feeding ``entry``; a list for merge layers, else one name."""
    nodes = entry.get("inbound_nodes") or []
    if not nodes:
        return None
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        args, kwargs = node.get("args") or [], node.get("kwargs") or {}
        if len(args) != 1:
            _refuse(layer, class_name, "is called with several positional arguments.")
        first = args[0]
        sources = [first] if _history(first) is not None else list(first)
        is_list = _history(first) is None
    else:  # tf-keras: [[name, node_index, tensor_index, kwargs], ...]
        sources = list(node)
        kwargs = {}
        for item in sources:
            if len(item) > 3 and item[3]:
                kwargs.update(item[3])
        is_list = len(sources) > 1 or class_name in _MERGE_LAYERS
    # Keras 3 records a random layer's default ``training=True`` on its node; a model's own
    # ``training`` argument overrides it, and the package always passes one.
    kwargs = {k: v for k, v in kwargs.items() if k != "training"}
    if any(not _neutral(v) for v in kwargs.values()):
        _refuse(layer, class_name, f"is called with keyword arguments {sorted(kwargs)}.")
    names = []
    for source in sources:
        history = _history(source)
        if history is None or history[2] != 0:
            _refuse(layer, class_name, "takes an input that is not a plain layer output.")
        names.append(history[0])
    return names if is_list else names[0]


def _endpoints(value):
    """Layer names of a Functional model's ``input_layers``/``output_layers``."""
    if isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], str):
        value = [value]
    names = []
    for item in value:
        if isinstance(item, dict):
            item = item["config"]["keras_history"]
        names.append(item[0])
    return names


def _build_layer(entry, target_keras, target, wrapper_cls):
    class_name = entry["class_name"]
    config = entry["config"]
    layer = entry.get("name") or config.get("name")
    if class_name in _WRAPPER_NAMES:
        inner = config["layer"]
        inner_layer = _build_layer(dict(inner, name=inner["config"].get("name")), target_keras,
                                   target, wrapper_cls)
        return wrapper_cls(inner_layer, name=config.get("name", layer))
    config = _layer_config(class_name, config, layer, target_keras, target)
    try:
        return getattr(target_keras.layers, class_name).from_config(config)
    except (TypeError, ValueError) as error:
        raise Keras3ConversionError(f"Layer '{layer}' (class {class_name}) could not be built "
                                    f"in {target}: {error}", layer=layer,
                                    class_name=class_name) from error


def _rebuild(config, target_keras, target, wrapper_cls):
    """A new model of ``target_keras`` from a scanned config (weights still initial).

    A model nested as a layer (an augmentation ``Sequential`` inside a
    Functional model, say) is flattened: its layers join the outer model
    under their own names, and the result is a Functional model.
    """
    scan_keras3_config(config)
    kind, body = _model_body(config)
    entries = _layer_entries(body)
    name = body.get("name")
    build = _Builder(target_keras, target, wrapper_cls)
    if kind != "Sequential":
        inputs, outputs = build.functional(body)
        return target_keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                                  outputs[0] if len(outputs) == 1 else outputs, name=name)
    if entries and entries[0]["class_name"] == "InputLayer":
        input_config = _layer_config("InputLayer", entries[0]["config"], "input", target_keras,
                                     target)
    elif body.get("build_input_shape"):
        input_config = {"batch_shape": body["build_input_shape"], "dtype": "float32"}
    else:
        raise Keras3ConversionError("A Sequential model without a known input shape does "
                                    "not convert; build it with keras.Input first.")
    inputs = target_keras.Input(batch_shape=tuple(input_config["batch_shape"]),
                                dtype=input_config.get("dtype"))
    if any(entry["class_name"] in _MODEL_CLASSES for entry in entries):
        return target_keras.Model(inputs, build.sequential(entries, inputs), name=name)
    layers = [build.layer(entry) for entry in entries if entry["class_name"] != "InputLayer"]
    return target_keras.Sequential([inputs] + layers, name=name)


class _Builder:
    """Builds scanned layer entries in one Keras and wires them, nested models inlined."""

    def __init__(self, target_keras, target, wrapper_cls):
        self.keras, self.target, self.wrapper_cls = target_keras, target, wrapper_cls

    def layer(self, entry):
        return _build_layer(entry, self.keras, self.target, self.wrapper_cls)

    def call(self, entry, args):
        """The output of ``entry`` (a layer, or a nested model inlined) on ``args``."""
        if entry["class_name"] not in _MODEL_CLASSES:
            return self.layer(entry)(args)
        kind, body = _model_body(entry)
        if kind == "Sequential":
            return self.sequential(_layer_entries(body), args)
        return self.functional(body, given=args)[1][0]

    def sequential(self, entries, tensor):
        for entry in entries:
            if entry["class_name"] != "InputLayer":
                tensor = self.call(entry, tensor)
        return tensor

    def functional(self, body, given=None):
        """``(inputs, outputs)`` of a Functional body; ``given`` feeds a nested one's input."""
        tensors = {}
        for entry in _layer_entries(body):
            layer = entry.get("name") or entry["config"].get("name")
            if entry["class_name"] == "InputLayer":
                if given is not None:
                    tensors[layer] = given
                    continue
                input_config = _layer_config("InputLayer", entry["config"], layer, self.keras,
                                             self.target)
                tensors[layer] = self.keras.Input(batch_shape=tuple(input_config["batch_shape"]),
                                                  dtype=input_config.get("dtype"), name=layer)
                continue
            function = op_function(entry)
            if function is not None:  # argmax, equal, ...: rebuilt as the target's operation
                tensors[layer] = apply_op(entry, function, tensors, self.keras)
                continue
            source = _inbound(entry, entry["class_name"], layer)
            if source is None:
                _refuse(layer, entry["class_name"], "has no input.")
            try:
                args = [tensors[s] for s in source] if isinstance(source, list) else tensors[source]
            except KeyError as error:
                raise Keras3ConversionError(f"Layer '{layer}' takes the output of {error}, which "
                                            "comes later or is missing.", layer=layer) from None
            tensors[layer] = self.call(entry, args)
        inputs = [tensors[n] for n in _endpoints(body["input_layers"])]
        outputs = [tensors[n] for n in _endpoints(body["output_layers"])]
        return inputs, outputs


# -- weights ------------------------------------------------------------------------------
def _is_wrapper(layer):
    return type(layer).__name__ == "PruneByActivation"


def _numpy(variable):
    return np.array(variable.numpy() if hasattr(variable, "numpy") else variable)


def _leaf_layers(model):
    """The layers of ``model``, those of nested models in their place (not the models)."""
    for layer in model.layers:
        if type(layer).__name__ in _MODEL_CLASSES and hasattr(layer, "layers"):
            yield from _leaf_layers(layer)
        else:
            yield layer


def copy_weights(source, target, names=None, *, masks_only=False):
    """Copy every layer's weights (masks and fine-pruning state included) by layer name.

    ``source`` and ``target`` may be of different Keras versions, and either
    may nest models as layers: their layers are matched by name wherever
    they sit. With ``names``, only those layers are copied. With
    ``masks_only``, only the ``PruneByActivation`` layers' masks and
    fine-pruning state are copied (not the wrapped layers' weights).
    """
    targets = {layer.name: layer for layer in _leaf_layers(target)}
    for layer in _leaf_layers(source):
        if (names is not None and layer.name not in names) or not layer.weights \
                or (masks_only and not _is_wrapper(layer)):
            continue  # a layer without weights (or an operation) has nothing to copy
        other = targets.get(layer.name)
        if other is None:
            raise Keras3ConversionError(f"Layer '{layer.name}' has no layer of its name in the "
                                        "other model.", layer=layer.name)
        if _is_wrapper(layer) != _is_wrapper(other):
            raise Keras3ConversionError(f"Layer '{layer.name}' is wrapped in one model and not "
                                        "in the other.", layer=layer.name)
        if _is_wrapper(layer):
            if not masks_only:
                other.layer.set_weights(layer.layer.get_weights())
            for attr in ("mask", "fine_pruning_step", "fine_pruning_baseline",
                         "fine_pruning_status"):
                getattr(other, attr).assign(_numpy(getattr(layer, attr)).astype(
                    _numpy(getattr(other, attr)).dtype))
            continue
        values = layer.get_weights()
        expected = [tuple(w.shape) for w in other.get_weights()]
        if [tuple(v.shape) for v in values] != expected:
            raise Keras3ConversionError(
                f"The weights of layer '{layer.name}' do not convert: shapes "
                f"{[tuple(v.shape) for v in values]} against {expected}.", layer=layer.name)
        other.set_weights(values)
        if type(other).__name__ == "Normalization":
            other.finalize_state()  # Keras 3 derives the mean and variance it uses from them


# -- the public conversions -----------------------------------------------------------------
def _tf_keras_wrapper():
    from tf_backdoor_defense.masks._wrapper import PruneByActivation  # noqa: PLC0415

    return PruneByActivation


def _keras3_wrapper():
    from tf_backdoor_defense.keras3._wrapper import PruneByActivation  # noqa: PLC0415

    return PruneByActivation


def _check_graph_model(model, name, flavour):
    if not getattr(model, "built", False) or not getattr(model, "inputs", None):
        raise InputError(f"The `{name}` argument must be a built {flavour} Sequential or "
                         "Functional model that starts with keras.Input.")
    if type(model).__name__ not in _MODEL_CLASSES:
        raise Keras3ConversionError(
            f"The `{name}` argument is a subclassed model ({type(model).__name__}); only "
            "Sequential and Functional models convert.", class_name=type(model).__name__)


def to_tf_keras(model, name="model"):
    """An equivalent tf-keras model of a Keras 3 Sequential or Functional model.

    The Keras 3 model is not modified. Its configuration is checked by
    :func:`scan_keras3_config` before anything is built; Keras 3
    ``PruneByActivation`` layers become tf-keras ``PruneByActivation``
    layers with the same masks and fine-pruning state.

    Parameters
    ----------
    model : keras.Model
        A built Keras 3 Sequential or Functional model.
    name : str, default="model"
        The argument name used in error messages.

    Returns
    -------
    tf_keras.Model

    Examples
    --------
    >>> import keras
    >>> from tf_backdoor_defense.keras3 import to_tf_keras
    >>> k3 = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")])
    >>> k2 = to_tf_keras(k3)
    >>> type(k2).__module__.split(".")[0], k2.get_layer("fc").units
    ('tf_keras', 2)
    """
    if not is_keras3_model(model):
        raise InputTypeError(f"Expected `{name}` to be a Keras 3 keras.Model. Received: "
                             f"{name}={model!r} of type {type(model).__name__}.")
    _check_graph_model(model, name, "Keras 3")
    converted = _rebuild(model.get_config(), tf_keras, "tf-keras", _tf_keras_wrapper())
    copy_weights(model, converted)
    return converted


def to_keras3(model, name="model"):
    """An equivalent Keras 3 model of a tf-keras Sequential or Functional model.

    Parameters
    ----------
    model : tf_keras.Model
        A built tf-keras model, possibly with ``PruneByActivation`` layers.
    name : str, default="model"
        The argument name used in error messages.

    Returns
    -------
    keras.Model
        A Keras 3 model; ``PruneByActivation`` layers become
        :class:`tf_backdoor_defense.keras3.PruneByActivation` with the same
        masks and state.

    Examples
    --------
    >>> import tf_keras
    >>> from tf_backdoor_defense.keras3 import to_keras3
    >>> k2 = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2, name="fc")])
    >>> type(to_keras3(k2)).__module__.split(".")[0]
    'keras'
    """
    if not isinstance(model, tf_keras.Model):
        raise InputTypeError(f"Expected `{name}` to be a tf_keras.Model. Received: "
                             f"{name}={model!r} of type {type(model).__name__}.")
    _check_graph_model(model, name, "tf-keras")
    converted = _rebuild(model.get_config(), keras3(), "Keras 3", _keras3_wrapper())
    copy_weights(model, converted)
    return converted

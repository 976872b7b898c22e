"""Load models from untrusted files without running code stored in them.

The guarantee (without ``trust_model_code=True``): loading a file runs no
Python code and no TensorFlow op chosen by the file's author, imports no
module the file names, and reads no file other than the one given.

How it holds, structurally rather than by a list of known tricks:

- **One read, one format.** A model file is read into memory once and its
  format decided from those bytes (:mod:`._formats`); a file that two
  readers would accept (HDF5 with a user block or an appended zip, a zip
  with a prefix or suffix, duplicate zip members) is refused. The same
  bytes are scanned and then given to the reader of that format, never
  the file name, so a file swapped after the scan is never loaded.
- **An allowlist, not a blocklist.** Every class in the configuration must
  be a tf-keras built-in layer/initializer/... (or ``PruneByActivation``,
  or one of the caller's ``custom_objects``); ``Lambda`` layers and
  serialized Python functions are refused; a ``module`` may only be a
  tf-keras module; a serialized function only a tf-keras activation, loss
  or metric by name. A TensorFlow-op layer (``TFOpLambda``,
  ``SlicingOpLambda``) may only call one of the pure tensor functions in
  ``PURE_TF_FUNCTIONS`` (explicit names: no namespaces, no ``compat.v1``
  aliases, no ``raw_ops``).
- **Nothing runs while the model is built.** Every layer call in the
  configuration must receive a tensor produced by another layer, so no op
  is ever called on constants alone (which tf-keras would run eagerly
  while rebuilding the model); constant arguments may only be plain
  numbers, strings, lists and slices.
- **SavedModel folders are never executed.** The Keras model is rebuilt
  from the configuration in ``keras_metadata.pb`` (after the scan above)
  and its weights are read from the ``variables/`` checkpoint;
  ``saved_model.pb`` (its functions, resources, initializers and assets)
  is never loaded. A SavedModel of a subclassed model has no such
  configuration and is refused.
- **Names are escaped.** Every name taken from a file is escaped (control
  characters, ANSI sequences) before it appears in an error message.

Limits: the weights themselves are data the attacker chose (a backdoor is
exactly that); a file can still be large or slow to compute with (the
allowed ops run on the tensors at inference time, on the shapes the file
declares); the HDF5, zip and protobuf parsers are trusted.

``trust_model_code=True`` skips these checks and loads the file with
tf-keras's own loader, for files whose author you trust. Unreadable,
truncated, ambiguous or non-model files raise :class:`ModelFileError`
with a one-line reason.
"""

import inspect
import io
import json
import os
import pathlib
import re
import tempfile
import zipfile

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.io._formats import AmbiguousFormat, escape, one_line, sniff_model_bytes

__all__ = [
    "ModelFileError",
    "UnsafeModelError",
    "PURE_TF_FUNCTIONS",
    "load_model",
    "read_model_config",
    "scan_model_config",
]

_TRUST_HINT = "If you trust the author of this file, pass trust_model_code=True."

#: Modules a serialized class may name (tf-keras resolves them itself or imports them).
_SAFE_MODULE_PREFIXES = ("keras", "tf_keras")
_OWN_MODULE_PREFIX = "tf_backdoor_defense"
#: Helper "classes" of the Keras config format that carry plain values.
_VALUE_CLASSES = {"__tuple__", "__numpy__", "__tensor__", "__bytes__", "__typespec__",
                  "function", "TensorShape", "__ellipsis__", "__slice__"}
_CODE_CLASSES = {"Lambda", "__lambda__"}
_OP_LAYERS = {"TFOpLambda", "SlicingOpLambda"}
_CONSTANT = "_CONSTANT_VALUE"

#: The TensorFlow functions a ``TFOpLambda``/``SlicingOpLambda`` layer of an untrusted
#: model may call: pure computations on tensors (no state, files, processes, network,
#: libraries, callables or randomness), by the exact name tf-keras stores.
PURE_TF_FUNCTIONS = frozenset(
    ["__operators__." + n for n in (
        "add", "getitem", "ne", "eq", "and_", "or_", "xor_", "invert_", "matmul")]
    + ["math." + n for n in (
        "abs", "add", "add_n", "argmax", "argmin", "ceil", "cos", "cosh", "cumsum", "cumprod",
        "divide", "divide_no_nan", "equal", "erf", "exp", "expm1", "floor", "floordiv",
        "floormod", "greater", "greater_equal", "l2_normalize", "less", "less_equal", "log",
        "log1p", "log_sigmoid", "logical_and", "logical_not", "logical_or", "logical_xor",
        "maximum", "minimum", "multiply", "multiply_no_nan", "negative", "not_equal", "pow",
        "reciprocal", "reduce_all", "reduce_any", "reduce_logsumexp", "reduce_max",
        "reduce_mean", "reduce_min", "reduce_prod", "reduce_std", "reduce_sum",
        "reduce_variance", "round", "rsqrt", "sigmoid", "sign", "sin", "sinh", "softmax",
        "softplus", "sqrt", "square", "squared_difference", "subtract", "tan", "tanh",
        "top_k", "truediv", "truncatediv", "truncatemod")]
    + ["nn." + n for n in (
        "avg_pool", "avg_pool2d", "bias_add", "conv2d", "depthwise_conv2d", "elu", "gelu",
        "l2_normalize", "leaky_relu", "log_softmax", "max_pool", "max_pool2d", "relu",
        "relu6", "selu", "sigmoid", "silu", "softmax", "softplus", "softsign", "tanh",
        "moments", "swish")]
    + ["linalg." + n for n in ("matmul", "norm", "diag_part", "trace", "matrix_transpose")]
    + ["image." + n for n in ("flip_left_right", "flip_up_down", "rot90", "resize",
                              "rgb_to_grayscale", "grayscale_to_rgb")]
    + ["argmax", "argmin", "argsort", "boolean_mask", "broadcast_to", "cast", "clip_by_norm",
       "clip_by_value", "concat", "einsum", "ensure_shape", "expand_dims", "gather",
       "gather_nd", "identity", "matmul", "one_hot", "ones_like", "pad", "reduce_max",
       "reduce_mean", "reduce_min", "reduce_sum", "reshape", "reverse", "roll", "shape",
       "size", "slice", "sort", "split", "squeeze", "stack", "stop_gradient",
       "strided_slice", "tile", "transpose", "unstack", "where", "zeros_like", "rank",
       "add", "subtract", "multiply", "divide", "maximum", "minimum", "abs", "exp", "sqrt",
       "square", "equal", "not_equal", "greater", "less", "logical_and", "logical_or",
       "logical_not", "realdiv", "truediv", "round", "sign", "tanh", "sigmoid"])
#: Attributes and class methods of tensors that op layers may use (plain tensor views).
_SAFE_INSTANCE_ATTRS = {"shape", "dtype", "values", "flat_values", "row_splits", "indices",
                        "dense_shape", "to_tensor", "merge_dims", "nested_row_lengths",
                        "row_lengths", "nrows"}
_SAFE_CLASS_METHODS = {("RaggedTensor", "from_tensor"), ("RaggedTensor", "from_row_lengths"),
                       ("RaggedTensor", "from_row_splits"), ("RaggedTensor", "from_value_rowids"),
                       ("RaggedTensor", "from_nested_row_lengths"),
                       ("SparseTensor", "from_dense")}
#: A constant argument may hold at most this many plain values (numbers, strings...).
_MAX_CONSTANT_VALUES = 10_000


class ModelFileError(InputError):
    """A model file that cannot be read: missing, truncated, malformed or not a model.

    Attributes
    ----------
    path : str or None
        The file or folder.
    needs_weights : bool
        The file is an architecture without weights, or weights without an
        architecture: it loads together with the other half (``weights=``).
    missing_class : bool
        The file names a class this process does not know (one defined in
        the training script): it loads with that class (``custom_objects=``).
    """

    def __init__(self, message, *, path=None, needs_weights=False, missing_class=False):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.needs_weights = bool(needs_weights)
        self.missing_class = bool(missing_class)


class UnsafeModelError(InputError):
    """A model whose configuration would run code or import modules when loaded.

    Attributes
    ----------
    path : str
        The file or folder.
    layer : str or None
        Name of the offending layer.
    class_name : str
        The refused class (``"Lambda"``, an unknown class, ...).
    reason : str
        What was found and why it is refused, without the advice on how to
        load the file anyway (the message is ``reason`` and that advice).
    unknown_class : bool
        The refused class is neither a tf-keras built-in nor this package's:
        a class of the caller's own loads when given (``custom_objects=``).
    """

    def __init__(self, message, *, path=None, layer=None, class_name=None, reason=None,
                 unknown_class=False):
        super().__init__(message)
        self.path = path
        self.layer = layer
        self.class_name = class_name
        self.reason = message if reason is None else reason
        self.unknown_class = bool(unknown_class)


# -- the built-in classes ----------------------------------------------------------
_BUILTINS = None
_FUNCTIONS = None


def _builtin_class_names():
    global _BUILTINS
    if _BUILTINS is None:
        from tf_keras.src import initializers as _initializers
        from tf_keras.src.layers import serialization as _layer_serialization

        _layer_serialization.populate_deserializable_objects()
        _initializers.populate_deserializable_objects()
        names = set(_layer_serialization.LOCAL.ALL_OBJECTS)
        names |= set(_initializers.LOCAL.ALL_OBJECTS)
        for module in (keras.layers, keras.initializers, keras.regularizers, keras.constraints,
                       keras.metrics, keras.losses, keras.optimizers, keras.mixed_precision,
                       keras.optimizers.schedules, keras.models):
            names |= {n for n in dir(module) if inspect.isclass(getattr(module, n, None))}
        names |= {"Functional", "Sequential", "Model", "Policy", "PolicyV1"}
        names -= _CODE_CLASSES
        _BUILTINS = frozenset(names)
    return _BUILTINS


def _builtin_function_names():
    """Activations, losses and metrics a config may name as a function."""
    global _FUNCTIONS
    if _FUNCTIONS is None:
        names = set()
        for module in (keras.activations, keras.losses, keras.metrics):
            names |= {n for n in dir(module) if not n.startswith("_")
                      and inspect.isfunction(getattr(module, n, None))}
        _FUNCTIONS = frozenset(names - {"deserialize", "serialize", "get"})
    return _FUNCTIONS


def _prune_by_activation():
    from tf_backdoor_defense.masks._wrapper import PruneByActivation

    return PruneByActivation


def _own_class_names():
    PruneByActivation = _prune_by_activation()
    registered = keras.utils.get_registered_name(PruneByActivation)
    return {"PruneByActivation", registered}


# -- the scan -------------------------------------------------------------------------
def _safe_module(module, class_name):
    if any(module == p or module.startswith(p + ".") for p in _SAFE_MODULE_PREFIXES):
        return True
    own = module == _OWN_MODULE_PREFIX or module.startswith(_OWN_MODULE_PREFIX + ".")
    return own and class_name in _own_class_names()


def _check_op_function(name):
    """Why the TF function ``name`` of an op layer is refused, or None."""
    if not isinstance(name, str):
        return f"calls a TensorFlow function given as {escape(type(name).__name__)}"
    if name not in PURE_TF_FUNCTIONS:
        return (f"calls 'tf.{escape(name)}', which is not one of the pure tensor functions "
                "allowed in untrusted models")
    return None


def _is_plain_constant(value, budget):
    """Whether ``value`` is plain data (numbers, strings, lists, slices), within ``budget``."""
    stack = [value]
    while stack:
        item = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            return False
        if item is None or isinstance(item, (bool, int, float, str)):
            continue
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            keys = set(item)
            if keys <= {"start", "stop", "step"} or keys == {"class_name", "items"} and \
                    item["class_name"] == "__tuple__":
                stack.extend(item.values() if "items" not in item else [item["items"]])
            elif keys == {"class_name", "config"} and item["class_name"] == "__ellipsis__":
                continue
            else:
                return False
        else:
            return False
    return True


def _is_tensor_reference(entry):
    """``[layer_name, node_index, tensor_index(, kwargs)]`` naming another layer's output."""
    return (isinstance(entry, list) and len(entry) in (3, 4) and isinstance(entry[0], str)
            and entry[0] != _CONSTANT and isinstance(entry[1], int)
            and isinstance(entry[2], int))


def _flat_entries(node_data):
    """The ``[name, node, tensor, kwargs]`` entries of one inbound node, however nested."""
    if isinstance(node_data, list) and node_data and isinstance(node_data[0], str):
        return [node_data]
    if isinstance(node_data, dict):
        return [e for value in node_data.values() for e in _flat_entries(value)]
    if isinstance(node_data, list):
        return [e for item in node_data for e in _flat_entries(item)]
    return [node_data]


def _kwargs_tensor_refs(kwargs):
    """How many ``__keras_tensor__`` references a call's kwargs hold (plain data otherwise)."""
    count = 0
    stack = [kwargs]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            if len(item) == 3 and isinstance(item[0], str) and item[0] != _CONSTANT and \
                    all(isinstance(v, int) for v in item[1:]):
                count += 1
            stack.extend(item)
        elif isinstance(item, dict):
            if item.get("class_name") == "__keras_tensor__":
                count += 1
            else:
                stack.extend(item.values())
    return count


class _Scanner:
    def __init__(self, path, allowed):
        self.path = escape(path, limit=200)
        self.allowed = allowed
        self.builtins = _builtin_class_names()
        self.functions = _builtin_function_names()

    def refuse(self, layer, class_name, why, custom_name=None):
        """Raise :class:`UnsafeModelError`; ``custom_name``: the name under which an unknown
        class would be given (``custom_objects``), for the advice."""
        shown_layer = escape(layer) if layer is not None else None
        shown_class = escape(class_name)
        where = f"layer '{shown_layer}'" if layer else "the model"
        reason = (f"Refusing to load '{self.path}': {where} (class {shown_class}) {why}. "
                  "Loading it could run code chosen by the file's author.")
        own = (f"If the class is your own, pass it: custom_objects={{'{escape(custom_name)}': "
               "...}. " if custom_name is not None else "")
        raise UnsafeModelError(f"{reason} {own}{_TRUST_HINT}", path=self.path, layer=shown_layer,
                               class_name=shown_class, reason=reason,
                               unknown_class=custom_name is not None)

    def walk(self, node, layer=None):
        if isinstance(node, list):
            for item in node:
                self.walk(item, layer)
            return
        if not isinstance(node, dict):
            return
        class_name = node.get("class_name")
        if "class_name" in node and not isinstance(class_name, str):
            self.refuse(layer, repr(type(class_name).__name__), "has a class name that is not "
                        "a string")
        if isinstance(class_name, str):
            config = node.get("config")
            name = node.get("name")
            if name is None and isinstance(config, dict):
                name = config.get("name")
            if class_name not in _VALUE_CLASSES and isinstance(name, str) and \
                    class_name not in ("Policy", "PolicyV1"):
                layer = name
            self.check(node, class_name, config, layer)
            if "inbound_nodes" in node:
                self.check_calls(node, class_name, layer)
        for value in node.values():
            self.walk(value, layer)

    def check_calls(self, node, class_name, layer):
        """Every call of the layer must take a tensor from another layer (no eager op runs)."""
        inbound = node["inbound_nodes"]
        if not isinstance(inbound, list):
            self.refuse(layer, class_name, "has malformed inbound nodes")
        for node_data in inbound:
            if isinstance(node_data, dict) and "args" in node_data:  # the newer call format
                self.check_new_call(node_data, class_name, layer)
                continue
            entries = _flat_entries(node_data)
            tensors = 0
            for entry in entries:
                if not isinstance(entry, list) or len(entry) not in (3, 4):
                    self.refuse(layer, class_name, "has a malformed inbound node")
                kwargs = entry[3] if len(entry) == 4 else {}
                if not isinstance(kwargs, dict):
                    self.refuse(layer, class_name, "has malformed call arguments")
                tensors += _kwargs_tensor_refs(kwargs)
                plain = {k: v for k, v in kwargs.items()
                         if not (isinstance(v, dict) and v.get("class_name") == "__keras_tensor__")
                         and not _kwargs_tensor_refs(v)}
                if not _is_plain_constant(list(plain.values()), [_MAX_CONSTANT_VALUES]):
                    self.refuse(layer, class_name, "passes a call argument that is not plain "
                                "data (numbers, strings, lists)")
                if _is_tensor_reference(entry):
                    tensors += 1
                elif entry[0] == _CONSTANT:
                    if not _is_plain_constant(entry[2], [_MAX_CONSTANT_VALUES]):
                        self.refuse(layer, class_name, "is called on a constant that is not "
                                    "plain data")
                else:
                    self.refuse(layer, class_name, "has a malformed inbound node")
            if tensors == 0:
                self.refuse(layer, class_name, "is called on constants only, so tf-keras would "
                            "run it while rebuilding the model")

    def check_new_call(self, node_data, class_name, layer):
        refs = _kwargs_tensor_refs(node_data)
        if refs == 0:
            self.refuse(layer, class_name, "is called on constants only, so tf-keras would "
                        "run it while rebuilding the model")

    def check(self, node, class_name, config, layer):
        if class_name == "Lambda":
            self.refuse(layer, class_name, "is a Lambda layer, whose Python code tf-keras "
                        "runs while loading")
        if class_name == "__lambda__":
            self.refuse(layer, class_name, "holds a serialized Python lambda")
        module = node.get("module")
        if module is not None and (not isinstance(module, str)
                                   or not (_safe_module(module, class_name)
                                           or module == "builtins" and class_name == "function")):
            self.refuse(layer, class_name, f"names the Python module '{escape(module)}', which "
                        "tf-keras would import")
        registered = node.get("registered_name")
        if class_name == "function":
            if not isinstance(config, str) or (config not in self.functions
                                               and config not in self.allowed):
                self.refuse(layer, class_name, f"names the function '{escape(config)}', which "
                            "is not a tf-keras activation, loss or metric")
            return
        if class_name in _VALUE_CLASSES:
            return
        if registered is not None and (not isinstance(registered, str) or (
                registered != class_name and registered not in self.allowed
                and registered not in _own_class_names())):
            self.refuse(layer, class_name, f"is the custom class '{escape(registered)}', not a "
                        "tf-keras built-in",
                        custom_name=registered if isinstance(registered, str) else None)
        if class_name in self.allowed or class_name in _own_class_names():
            return
        if class_name not in self.builtins:
            self.refuse(layer, class_name, "is not a tf-keras built-in class nor this "
                        "package's", custom_name=class_name)
        if class_name in _OP_LAYERS:
            function = config.get("function") if isinstance(config, dict) else None
            why = _check_op_function(function)
            if why:
                self.refuse(layer, class_name, why)
        elif class_name == "ClassMethod":
            config = config if isinstance(config, dict) else {}
            symbol, method = config.get("cls_symbol"), config.get("method_name")
            if (symbol, method) not in _SAFE_CLASS_METHODS:
                self.refuse(layer, class_name, f"calls 'tf.{escape(symbol)}.{escape(method)}'")
        elif class_name in ("InstanceMethod", "InstanceProperty"):
            attr = config.get("attr_name") if isinstance(config, dict) else None
            if attr not in _SAFE_INSTANCE_ATTRS:
                self.refuse(layer, class_name, f"uses the tensor attribute '{escape(attr)}'")


def scan_model_config(config, *, path="model", custom_objects=None):
    """Raise :class:`UnsafeModelError` if loading ``config`` could run stored code.

    Parameters
    ----------
    config : dict, list or str
        A model configuration (``model.get_config()``-style dict with
        ``class_name``, or its JSON text).
    path : str, default="model"
        Named in the error message.
    custom_objects : dict, default=None
        Classes the caller supplies (their code is the caller's, not the file's).

    Examples
    --------
    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x, name="f")])
    >>> try:
    ...     scan_model_config(model.to_json())
    ... except UnsafeModelError as error:
    ...     print(error.layer, error.class_name)
    f Lambda
    """
    if isinstance(config, (bytes, str)):
        try:
            config = json.loads(config)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise ModelFileError(f"'{escape(path)}' has a malformed model configuration "
                                 f"({one_line(error)}).") from None
    try:
        _Scanner(path, set(custom_objects or {})).walk(config)
    except RecursionError:
        raise UnsafeModelError(f"Refusing to load '{escape(path)}': its configuration is nested "
                               "too deeply to check. " + _TRUST_HINT, path=escape(path),
                               reason="nested too deeply") from None


# -- reading configurations without deserializing -------------------------------------
def _h5py():
    import h5py

    return h5py


def _decode(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _json(text, path, what):
    try:
        value = json.loads(_decode(text))
    except (ValueError, UnicodeDecodeError, RecursionError, TypeError) as error:
        raise ModelFileError(f"'{escape(path)}' has a malformed {what} ({one_line(error)}).",
                             path=path) from None
    return value


def _read_h5(handle, path):
    """The config of an open ``h5py.File``."""
    try:
        attrs = {k: handle.attrs[k] for k in ("model_config", "keras_version", "layer_names")
                 if k in handle.attrs}
        keys = list(handle.keys())
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:
        raise ModelFileError(f"'{escape(path)}' is not a readable HDF5 model file "
                             f"({one_line(error)}).", path=path) from None
    if "model_config" not in attrs:
        if "layer_names" in attrs or "model_weights" in keys:
            raise ModelFileError(
                f"'{escape(path)}' holds only weights, no architecture. Pass the architecture "
                "(a full model file or a model.to_json() file) as the model and this file as "
                "weights.", path=path, needs_weights=True)
        raise ModelFileError(f"'{escape(path)}' is an HDF5 file but not a Keras model (no "
                             "'model_config' attribute).", path=path)
    version = attrs.get("keras_version")
    return {"format": "h5", "config": _json(attrs["model_config"], path, "model_config"),
            "keras_version": _decode(version) if isinstance(version, (str, bytes)) else None}


def _open_h5(data, path):
    try:
        return _h5py().File(io.BytesIO(data), "r")
    except Exception as error:  # noqa: BLE001 - h5py raises OSError, ValueError, ...
        raise ModelFileError(f"'{escape(path)}' is not a readable HDF5 model file "
                             f"({one_line(error)}).", path=path) from None


def _read_keras_zip(data, path):
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            if "config.json" not in names:
                raise ModelFileError(f"'{escape(path)}' is a zip file but not a .keras model "
                                     "(no config.json inside).", path=path)
            config = _json(archive.read("config.json"), path, "config.json")
            metadata = {}
            if "metadata.json" in names:
                metadata = _json(archive.read("metadata.json"), path, "metadata.json")
    except ModelFileError:
        raise
    except Exception as error:  # noqa: BLE001 - zipfile raises many kinds on bad bytes
        raise ModelFileError(f"'{escape(path)}' is not a readable .keras file "
                             f"({one_line(error)}).", path=path) from None
    version = metadata.get("keras_version") if isinstance(metadata, dict) else None
    return {"format": "keras", "config": config,
            "keras_version": version if isinstance(version, str) else None}


def _saved_model_root(path):
    """The root model's metadata of a tf-keras SavedModel folder (``keras_metadata.pb``)."""
    from google.protobuf import message
    from tensorflow.core.protobuf import saved_model_pb2
    from tf_keras.protobuf import saved_metadata_pb2

    metadata_file = path / "keras_metadata.pb"
    if not metadata_file.is_file():
        try:
            saved_model_pb2.SavedModel().ParseFromString((path / "saved_model.pb").read_bytes())
        except (message.DecodeError, OSError, RuntimeWarning) as error:
            raise ModelFileError(f"'{escape(path)}' is not a readable SavedModel "
                                 f"({one_line(error)}).", path=path) from None
        raise ModelFileError(
            f"'{escape(path)}' is a plain TensorFlow SavedModel without Keras metadata (for "
            "example one written by export_saved_model or tf.saved_model.save). Only Keras "
            "models can be inspected and pruned: load the original .h5/.keras/Keras SavedModel "
            "instead.", path=path)
    try:
        metadata = saved_metadata_pb2.SavedMetadata()
        metadata.ParseFromString(metadata_file.read_bytes())
    except (message.DecodeError, OSError, RuntimeWarning) as error:
        raise ModelFileError(f"'{escape(path)}' is not a readable SavedModel "
                             f"({one_line(error)}).", path=path) from None
    roots = [node for node in metadata.nodes if node.node_path == "root"]
    if len(roots) != 1:
        raise ModelFileError(f"'{escape(path)}' has no single root model in its Keras "
                             "metadata.", path=path)
    root = _json(roots[0].metadata, path, "Keras metadata")
    if not isinstance(root, dict):
        raise ModelFileError(f"'{escape(path)}' has malformed Keras metadata.", path=path)
    return root


def _read_saved_model(path):
    root = _saved_model_root(path)
    class_name, config = root.get("class_name"), root.get("config")
    if class_name not in ("Functional", "Sequential") or not isinstance(config, dict):
        raise ModelFileError(
            f"'{escape(path)}' is a SavedModel of a subclassed model (class "
            f"{escape(class_name)}): it loads only as the functions saved with it, without the "
            "layer graph the package reads. Build the model from its Python class, call it "
            "once, load these weights into it (model.load_weights('<folder>/variables/"
            "variables')) and pass that model (its call() is traced into a Functional model), "
            "or save a Sequential or Functional model as .h5 or .keras.", path=path)
    version = root.get("keras_version")
    return {"format": "saved_model", "config": {"class_name": class_name, "config": config},
            "keras_version": version if isinstance(version, str) else None}


def _read(path):
    """``(info, data)``: the config of ``path`` and the bytes it was read from (or None)."""
    if not path.exists():
        raise ModelFileError(f"Model file '{escape(path)}' does not exist.", path=path)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ModelFileError(f"'{escape(path)}' is a folder but not a SavedModel (no "
                                 "saved_model.pb inside).", path=path)
        return _read_saved_model(path), None
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelFileError(f"Cannot read '{escape(path)}' ({one_line(error)}).",
                             path=path) from None
    if not data:
        raise ModelFileError(f"Model file '{escape(path)}' is empty.", path=path)
    try:
        kind = sniff_model_bytes(data)
    except AmbiguousFormat as error:
        raise ModelFileError(f"Refusing '{escape(path)}': {error}; tf-keras never writes such "
                             "a file, and different readers would see different models in it.",
                             path=path) from None
    if kind == "h5":
        with _open_h5(data, path) as handle:
            return _read_h5(handle, path), data
    if kind == "keras":
        return _read_keras_zip(data, path), data
    if kind == "json":
        return {"format": "json", "config": _json(data, path, "JSON architecture"),
                "keras_version": None}, data
    if path.suffix.lower() in (".h5", ".hdf5", ".keras"):
        raise ModelFileError(f"'{escape(path)}' is not a valid {escape(path.suffix)} model file "
                             "(it does not start with the HDF5 or zip signature; is it "
                             "truncated or something else?).", path=path)
    raise ModelFileError(f"'{escape(path)}' is not a model file: expected a .h5 or .keras "
                         "file, a SavedModel folder or a JSON architecture.", path=path)


def read_model_config(path):
    """Read a model file's configuration without deserializing anything.

    The format is decided from the file's bytes (not its name); ambiguous
    files are refused (see the module documentation).

    Returns
    -------
    dict
        ``format`` (``"h5"``, ``"keras"``, ``"saved_model"`` or ``"json"``),
        ``config`` (the parsed JSON: for a SavedModel, the root model's
        configuration that :func:`load_model` rebuilds) and
        ``keras_version`` (or None).

    Examples
    --------
    >>> import tempfile, tf_keras as keras
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = tmp + "/net.keras"
    ...     keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(path)
    ...     info = read_model_config(path)
    ...     info["format"], info["config"]["class_name"]
    ('keras', 'Sequential')
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"The 'path' parameter must be a path. Got {type(path).__name__} "
                             "instead.")
    return _read(pathlib.Path(path))[0]


# -- loading ---------------------------------------------------------------------------
def _first_line(error):
    return one_line(error)


def _check_keras_version(info, path):
    version = str(info.get("keras_version") or "")
    if info["format"] == "keras" and version.startswith("3"):
        raise ModelFileError(
            f"'{escape(path)}' was saved by Keras {escape(version)}; tf_backdoor_defense uses "
            "tf-keras (Keras 2), which cannot read Keras 3 .keras files. Re-save the model from "
            "Keras 3 as .h5 (model.save('model.h5')) or rebuild it with tf_keras.", path=path)


def _objects(custom_objects):
    PruneByActivation = _prune_by_activation()
    objects = {"PruneByActivation": PruneByActivation,
               keras.utils.get_registered_name(PruneByActivation): PruneByActivation}
    objects.update(custom_objects or {})
    return objects


def _restore_checkpoint(model, path):
    """Read ``model``'s variables from a SavedModel's ``variables/`` checkpoint (no graph runs)."""
    prefix = path / "variables" / "variables"
    if not pathlib.Path(str(prefix) + ".index").is_file():
        raise ModelFileError(f"'{escape(path)}' has no variables/variables.index checkpoint.",
                             path=path)
    reader = tf.train.load_checkpoint(str(prefix))
    stored = reader.get_variable_to_shape_map()
    status = tf.train.Checkpoint(root=model).read(str(prefix))
    status.expect_partial()
    status.assert_existing_objects_matched()
    return stored


def _load_untrusted(info, data, path, objects):
    from tf_keras.src.saving import saving_lib
    from tf_keras.src.saving.legacy import hdf5_format

    kind = info["format"]
    if kind == "h5":
        with _open_h5(data, path) as handle:
            return hdf5_format.load_model_from_hdf5(handle, custom_objects=objects,
                                                    compile=False)
    if kind == "keras":
        with tempfile.TemporaryDirectory(prefix="tf-backdoor-defense-load-") as folder:
            copy = pathlib.Path(folder) / "model.keras"
            copy.write_bytes(data)
            return saving_lib.load_model(str(copy), custom_objects=objects, compile=False,
                                         safe_mode=True)
    if kind == "saved_model":
        with keras.utils.custom_object_scope(objects):
            model = keras.models.model_from_json(json.dumps(info["config"]),
                                                 custom_objects=objects)
        _restore_checkpoint(model, path)
        return model
    raise ModelFileError(f"'{escape(path)}' has no model loader.", path=path)


def load_model(path, *, trust_model_code=False, weights=None, custom_objects=None):
    """Load a tf-keras model from a file that may come from an attacker.

    Parameters
    ----------
    path : str or os.PathLike
        A full-model ``.h5``, a ``.keras`` file, a Keras SavedModel folder,
        or a JSON architecture (``model.to_json()``) together with ``weights``.
    trust_model_code : bool, default=False
        Skip the safety checks (see the module documentation) and load with
        tf-keras's own loader, which runs ``Lambda`` layers and the
        functions of a SavedModel. Only for files whose author you trust.
    weights : str or os.PathLike, default=None
        A weights file (``model.save_weights(...)``, ``.h5``) loaded into the
        architecture from ``path``, replacing its weights.
    custom_objects : dict, default=None
        Your own classes used by the model; they are trusted.

    Returns
    -------
    tf_keras.Model
        Not compiled.

    Raises
    ------
    UnsafeModelError
        The file would run stored code or use unknown classes.
    ModelFileError
        The file is missing, empty, truncated, malformed, ambiguous or not a
        model.

    Examples
    --------
    >>> import tempfile, tf_keras as keras
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = tmp + "/net.h5"
    ...     keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(path)
    ...     load_model(path).output_shape
    (None, 2)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"The 'path' parameter must be a path. Got {type(path).__name__} "
                             "instead.")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise InputTypeError(f"The 'weights' parameter must be a path or None. Got "
                             f"{type(weights).__name__} instead.")
    if custom_objects is not None and not isinstance(custom_objects, dict):
        raise InputTypeError(f"The 'custom_objects' parameter must be a dict or None. Got "
                             f"{type(custom_objects).__name__} instead.")
    path = pathlib.Path(path)
    info, data = _read(path)
    from tf_backdoor_defense.keras3._loading import is_keras3_file, load_keras3_file
    if is_keras3_file(info):  # Keras 3 .keras/.h5: scanned there, then loaded by Keras 3
        if custom_objects:
            raise InputError(f"'{escape(path)}' is a Keras 3 model file: 'custom_objects' "
                             "applies to tf-keras files (the package converts Keras 3 models "
                             "of Keras's own layers only).")
        return load_keras3_file(path, info, data=data, trust_model_code=trust_model_code,
                                unsafe_error=(
            lambda message, layer, name: UnsafeModelError(f"{message} {_TRUST_HINT}", path=str(path),
                                                          layer=layer, class_name=name)))
    _check_keras_version(info, path)
    if not trust_model_code:
        scan_model_config(info["config"], path=str(path), custom_objects=custom_objects)
    objects = _objects(custom_objects)
    try:
        if info["format"] == "json":
            if weights is None:
                raise ModelFileError(f"'{escape(path)}' is an architecture without weights; "
                                     "pass the weights file too: load_model(path, weights=...).",
                                     path=path, needs_weights=True)
            model = keras.models.model_from_json(json.dumps(info["config"]),
                                                 custom_objects=objects)
        elif trust_model_code:
            model = keras.models.load_model(str(path), compile=False, custom_objects=objects,
                                            safe_mode=False)
        else:
            model = _load_untrusted(info, data, path, objects)
    except (ModelFileError, UnsafeModelError):
        raise
    except Exception as error:  # noqa: BLE001 - every reader failure becomes one clear line
        hint = ""
        missing = bool(re.search(r"Unknown (layer|object|activation|loss)|Cannot deserialize "
                                 r"object|must be an instance of class Layer. Received: layer=",
                                 str(error)))
        if missing:
            hint = (" A class defined in the training script is not known to this process: "
                    "load the model from Python with that class, "
                    "load_model(path, custom_objects={'Name': Name}, trust_model_code=True), "
                    "and pass the model on.")
        raise ModelFileError(f"Could not load the model in '{escape(path)}': "
                             f"{one_line(error)}{hint}", path=path,
                             missing_class=missing) from error
    if not isinstance(model, keras.Model):
        raise ModelFileError(f"'{escape(path)}' did not load as a tf-keras model (got "
                             f"{type(model).__name__}).", path=path)
    if weights is not None:
        _load_weights(model, pathlib.Path(weights))
    return model


def _load_weights(model, weights):
    if not weights.is_file():
        raise ModelFileError(f"Weights file '{escape(weights)}' does not exist.", path=weights)
    data = weights.read_bytes()
    if not data:
        raise ModelFileError(f"Weights file '{escape(weights)}' is empty.", path=weights)
    try:
        kind = sniff_model_bytes(data)
    except AmbiguousFormat as error:
        raise ModelFileError(f"Refusing weights file '{escape(weights)}': {error}.",
                             path=weights) from None
    if kind != "h5":
        raise ModelFileError(f"'{escape(weights)}' is not an HDF5 weights file.", path=weights)
    with _open_h5(data, weights) as handle:
        try:
            names = set(handle.attrs.keys())
        except Exception as error:  # noqa: BLE001
            raise ModelFileError(f"'{escape(weights)}' is not a readable HDF5 weights file "
                                 f"({one_line(error)}).", path=weights) from None
        if "layer_names" not in names and "model_config" not in names:
            raise ModelFileError(f"'{escape(weights)}' is an HDF5 file but holds no Keras "
                                 "weights.", path=weights)
        from tf_keras.src.saving.legacy import hdf5_format

        try:
            group = handle["model_weights"] if "model_weights" in handle else handle
            hdf5_format.load_weights_from_hdf5_group(group, model)
        except Exception as error:  # noqa: BLE001
            raise ModelFileError(f"The weights in '{escape(weights)}' do not fit the "
                                 f"architecture: {one_line(error)}", path=weights) from error

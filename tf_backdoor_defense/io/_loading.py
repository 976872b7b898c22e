"""Load models from untrusted files without running code stored in them.

tf-keras runs the Python bytecode of a ``Lambda`` layer when it rebuilds a
model from an ``.h5`` file or a SavedModel (``safe_mode`` only covers the
``.keras`` format), and the newer config format can name any module to
import. :func:`load_model` therefore reads the model's configuration first,
with ``h5py``, ``zipfile`` or the SavedModel protos, and refuses to
deserialize it when it finds:

- a ``Lambda`` layer or a serialized Python ``lambda``;
- a class that is neither a tf-keras built-in nor this package's
  ``PruneByActivation`` (nor one of the caller's ``custom_objects``);
- a ``module`` outside ``keras``/``tf_keras``/``tensorflow``/this package;
- a TensorFlow-op layer (``TFOpLambda``) calling a function outside the
  math/array namespaces (``tf.io.write_file``, ``tf.print``, ``tf.raw_ops``...).

``trust_model_code=True`` skips these checks, for files whose author you
trust. Unreadable, truncated or
non-model files raise :class:`ModelFileError` with a one-line reason.
"""

import inspect
import json
import os
import pathlib
import zipfile

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.masks._wrapper import PruneByActivation

__all__ = [
    "ModelFileError",
    "UnsafeModelError",
    "load_model",
    "read_model_config",
    "scan_model_config",
]

_TRUST_HINT = "If you trust the author of this file, pass trust_model_code=True."

#: Modules a serialized object may name (others would be imported by tf-keras).
_SAFE_MODULE_PREFIXES = ("keras", "tf_keras", "tensorflow", "tf_backdoor_defense")
#: Helper "classes" of the Keras config format that carry plain values.
_VALUE_CLASSES = {"__tuple__", "__numpy__", "__tensor__", "__bytes__", "__typespec__",
                  "function", "TensorShape"}
_CODE_CLASSES = {"Lambda", "__lambda__"}
_OP_LAYERS = {"TFOpLambda", "SlicingOpLambda"}
#: TensorFlow namespaces whose functions only compute on tensors.
_SAFE_OP_NAMESPACES = {"math", "nn", "linalg", "image", "signal", "bitwise", "__operators__",
                       "random", "strings", "sparse", "ragged", "sets", "dtypes", "experimental.numpy"}
#: Top-level tf functions with side effects or that take callables or paths.
_UNSAFE_OPS = {"print", "py_function", "numpy_function", "load_op_library", "load_library",
               "load_pluggable_device_library", "function", "Variable", "Module", "init_scope",
               "device", "name_scope", "control_dependencies", "custom_gradient",
               "recompute_grad", "cond", "case", "switch_case", "while_loop", "map_fn",
               "vectorized_map", "scan", "foldl", "foldr", "py_func", "Assert",
               "get_logger", "executing_eagerly", "make_tensor_proto"}
_SAFE_CLASS_METHOD_SYMBOLS = {"RaggedTensor", "SparseTensor", "Tensor"}


class ModelFileError(InputError):
    """A model file that cannot be read: missing, truncated, malformed or not a model.

    Attributes
    ----------
    path : str or None
        The file or folder.
    needs_weights : bool
        The file is an architecture without weights, or weights without an
        architecture: it loads together with the other half (``weights=``).
    """

    def __init__(self, message, *, path=None, needs_weights=False):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.needs_weights = bool(needs_weights)


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
    """

    def __init__(self, message, *, path=None, layer=None, class_name=None, reason=None):
        super().__init__(message)
        self.path = path
        self.layer = layer
        self.class_name = class_name
        self.reason = message if reason is None else reason


# -- the built-in classes ----------------------------------------------------------
_BUILTINS = None


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


def _own_class_names():
    registered = keras.utils.get_registered_name(PruneByActivation)
    return {"PruneByActivation", registered}


# -- the scan -------------------------------------------------------------------------
def _safe_module(module):
    return any(module == p or module.startswith(p + ".") for p in _SAFE_MODULE_PREFIXES)


def _check_op_function(name):
    """Why the TF function ``name`` of an op layer is refused, or None."""
    if not isinstance(name, str) or not name or name.startswith("_") and \
            not name.startswith("__operators__."):
        return f"calls the TensorFlow function {name!r}"
    namespace, _, leaf = name.rpartition(".")
    if namespace.startswith("compat.v1") or namespace.startswith("compat.v2"):
        namespace = namespace.split(".", 2)[2] if namespace.count(".") >= 2 else ""
    if leaf.startswith("_") and namespace != "__operators__":
        return f"calls the private TensorFlow function 'tf.{name}'"
    if namespace == "":
        if leaf in _UNSAFE_OPS:
            return f"calls 'tf.{name}', which has side effects"
        return None
    if namespace in _SAFE_OP_NAMESPACES:
        return None
    return (f"calls 'tf.{name}', outside the math/array functions allowed in untrusted "
            "models")


class _Scanner:
    def __init__(self, path, allowed):
        self.path = path
        self.allowed = allowed
        self.builtins = _builtin_class_names()

    def refuse(self, layer, class_name, why):
        where = f"layer '{layer}'" if layer else "the model"
        reason = (f"Refusing to load '{self.path}': {where} (class {class_name}) {why}. Loading "
                  "it could run code chosen by the file's author.")
        raise UnsafeModelError(f"{reason} {_TRUST_HINT}", path=str(self.path), layer=layer,
                               class_name=class_name, reason=reason)

    def walk(self, node, layer=None):
        if isinstance(node, list):
            for item in node:
                self.walk(item, layer)
            return
        if not isinstance(node, dict):
            return
        class_name = node.get("class_name")
        if isinstance(class_name, str):
            config = node.get("config")
            name = node.get("name")
            if name is None and isinstance(config, dict):
                name = config.get("name")
            if class_name not in _VALUE_CLASSES and isinstance(name, str) and \
                    class_name not in ("Policy", "PolicyV1"):
                layer = name
            self.check(node, class_name, config, layer)
        for value in node.values():
            self.walk(value, layer)

    def check(self, node, class_name, config, layer):
        if class_name == "Lambda":
            self.refuse(layer, class_name, "is a Lambda layer, whose Python code tf-keras "
                        "runs while loading")
        if class_name == "__lambda__":
            self.refuse(layer, class_name, "holds a serialized Python lambda")
        module = node.get("module")
        if module is not None and (not isinstance(module, str) or not _safe_module(module)):
            if not (module == "builtins" and class_name == "function"):
                self.refuse(layer, class_name, f"names the Python module {module!r}, which "
                            "tf-keras would import")
        registered = node.get("registered_name")
        if class_name == "function":
            if not isinstance(config, str):
                self.refuse(layer, class_name, "holds a function that is not a built-in name")
            return
        if class_name in _VALUE_CLASSES:
            return
        if isinstance(registered, str) and registered != class_name and \
                registered not in self.allowed and registered not in _own_class_names():
            self.refuse(layer, class_name, f"is the custom class {registered!r}, not a "
                        "tf-keras built-in")
        if class_name in self.allowed or class_name in _own_class_names():
            return
        if class_name not in self.builtins:
            self.refuse(layer, class_name, "is not a tf-keras built-in class nor this "
                        "package's")
        if isinstance(config, dict):
            if class_name in _OP_LAYERS:
                why = _check_op_function(config.get("function"))
                if why:
                    self.refuse(layer, class_name, why)
            elif class_name == "ClassMethod":
                symbol, method = config.get("cls_symbol"), config.get("method_name")
                if symbol not in _SAFE_CLASS_METHOD_SYMBOLS or not isinstance(method, str) \
                        or method.startswith("_"):
                    self.refuse(layer, class_name, f"calls 'tf.{symbol}.{method}'")
            elif class_name in ("InstanceMethod", "InstanceProperty"):
                attr = config.get("attr_name")
                if not isinstance(attr, str) or attr.startswith("_"):
                    self.refuse(layer, class_name, f"reads the attribute {attr!r}")


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
        config = json.loads(config)
    _Scanner(path, set(custom_objects or {})).walk(config)


# -- reading configurations without deserializing -------------------------------------
def _h5py():
    import h5py

    return h5py


def _decode(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _json(text, path, what):
    try:
        return json.loads(_decode(text))
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelFileError(f"'{path}' has a malformed {what} ({error}).") from None


def _read_h5(path):
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as handle:
            attrs = dict(handle.attrs)
            keys = list(handle.keys())
    except OSError as error:
        reason = str(error).split("(", 1)[-1].rstrip(")") if "(" in str(error) else str(error)
        raise ModelFileError(f"'{path}' is not a readable HDF5 model file ({reason}).") from None
    if "model_config" not in attrs:
        if "layer_names" in attrs or "model_weights" in keys:
            raise ModelFileError(
                f"'{path}' holds only weights, no architecture. Pass the architecture (a full "
                "model file or a model.to_json() file) as the model and this file as weights.",
                path=path, needs_weights=True)
        raise ModelFileError(f"'{path}' is an HDF5 file but not a Keras model (no "
                             "'model_config' attribute).")
    return {"format": "h5", "config": _json(attrs["model_config"], path, "model_config"),
            "keras_version": _decode(attrs.get("keras_version"))}


def _read_keras_zip(path):
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "config.json" not in names:
                raise ModelFileError(f"'{path}' is a zip file but not a .keras model (no "
                                     "config.json inside).")
            config = _json(archive.read("config.json"), path, "config.json")
            metadata = {}
            if "metadata.json" in names:
                metadata = _json(archive.read("metadata.json"), path, "metadata.json")
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ModelFileError(f"'{path}' is not a readable .keras file ({error}).") from None
    return {"format": "keras", "config": config,
            "keras_version": metadata.get("keras_version") if isinstance(metadata, dict) else None}


def _read_saved_model(path):
    from google.protobuf import message
    from tensorflow.core.protobuf import saved_model_pb2
    from tf_keras.protobuf import saved_metadata_pb2

    configs = []
    metadata_file = path / "keras_metadata.pb"
    try:
        if metadata_file.is_file():
            metadata = saved_metadata_pb2.SavedMetadata()
            metadata.ParseFromString(metadata_file.read_bytes())
            texts = [node.metadata for node in metadata.nodes]
        else:
            saved = saved_model_pb2.SavedModel()
            saved.ParseFromString((path / "saved_model.pb").read_bytes())
            texts = []
            for graph in saved.meta_graphs:
                for node in graph.object_graph_def.nodes:
                    if node.WhichOneof("kind") == "user_object" and node.user_object.metadata:
                        texts.append(node.user_object.metadata)
    except (message.DecodeError, OSError) as error:
        raise ModelFileError(f"'{path}' is not a readable SavedModel ({error}).") from None
    for text in texts:
        configs.append(_json(text, path, "Keras metadata"))
    if not configs:
        raise ModelFileError(
            f"'{path}' is a plain TensorFlow SavedModel without Keras metadata (for example "
            "one written by export_saved_model or tf.saved_model.save). Only Keras models can "
            "be inspected and pruned: load the original .h5/.keras/Keras SavedModel instead.")
    return {"format": "saved_model", "config": configs, "keras_version": None}


def read_model_config(path):
    """Read a model file's configuration without deserializing anything.

    Returns
    -------
    dict
        ``format`` (``"h5"``, ``"keras"``, ``"saved_model"`` or ``"json"``),
        ``config`` (the parsed JSON) and ``keras_version`` (or None).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise ModelFileError(f"Model file '{path}' does not exist.")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ModelFileError(f"'{path}' is a folder but not a SavedModel (no "
                                 "saved_model.pb inside).")
        return _read_saved_model(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return _read_h5(path)
    if head.startswith(b"PK"):
        return _read_keras_zip(path)
    if path.suffix.lower() == ".json" or head.lstrip()[:1] == b"{":
        with open(path, "rb") as handle:
            return {"format": "json", "config": _json(handle.read(), path, "JSON architecture"),
                    "keras_version": None}
    if path.suffix.lower() in (".h5", ".hdf5", ".keras"):
        raise ModelFileError(f"'{path}' is not a valid {path.suffix} model file (it does not "
                             "start with the HDF5 or zip signature; is it truncated or "
                             "something else?).")
    raise ModelFileError(f"'{path}' is not a model file: expected a .h5 or .keras file, a "
                         "SavedModel folder or a JSON architecture.")


# -- loading ---------------------------------------------------------------------------
def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_keras_version(info, path):
    version = str(info.get("keras_version") or "")
    if info["format"] == "keras" and version.startswith("3"):
        raise ModelFileError(
            f"'{path}' was saved by Keras {version}; tf_backdoor_defense uses tf-keras (Keras 2), "
            "which cannot read Keras 3 .keras files. Re-save the model from Keras 3 as .h5 "
            "(model.save('model.h5')) or rebuild it with tf_keras.")


def load_model(path, *, trust_model_code=False, weights=None, custom_objects=None):
    """Load a tf-keras model from a file that may come from an attacker.

    Parameters
    ----------
    path : str or os.PathLike
        A full-model ``.h5``, a ``.keras`` file, a Keras SavedModel folder,
        or a JSON architecture (``model.to_json()``) together with ``weights``.
    trust_model_code : bool, default=False
        Skip the safety scan (see the module documentation) and allow
        ``Lambda`` layers. Only for files whose author you trust.
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
        The file is missing, truncated, malformed or not a model.

    Examples
    --------
    >>> import tempfile, tf_keras as keras
    >>> path = tempfile.mkdtemp() + "/net.h5"
    >>> keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(path)
    >>> load_model(path).output_shape
    (None, 2)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"The 'path' parameter must be a path. Got {path!r} instead.")
    path = pathlib.Path(path)
    info = read_model_config(path)
    _check_keras_version(info, path)
    if not trust_model_code:
        scan_model_config(info["config"], path=str(path), custom_objects=custom_objects)
    objects = {"PruneByActivation": PruneByActivation,
               keras.utils.get_registered_name(PruneByActivation): PruneByActivation}
    objects.update(custom_objects or {})
    try:
        if info["format"] == "json":
            if weights is None:
                raise ModelFileError(f"'{path}' is an architecture without weights; pass the "
                                     "weights file too: load_model(path, weights=...).", path=path,
                                     needs_weights=True)
            model = keras.models.model_from_json(json.dumps(info["config"]),
                                                 custom_objects=objects)
        else:
            model = keras.models.load_model(str(path), compile=False, custom_objects=objects,
                                            safe_mode=not trust_model_code)
    except (ModelFileError, UnsafeModelError):
        raise
    except Exception as error:  # noqa: BLE001 - every reader failure becomes one clear line
        raise ModelFileError(f"Could not load the model in '{path}': {_first_line(error)}") \
            from error
    if not isinstance(model, keras.Model):
        raise ModelFileError(f"'{path}' did not load as a tf-keras model (got "
                             f"{type(model).__name__}).")
    if weights is not None:
        _load_weights(model, pathlib.Path(weights))
    return model


def _load_weights(model, weights):
    if not weights.is_file():
        raise ModelFileError(f"Weights file '{weights}' does not exist.")
    try:
        with _h5py().File(weights, "r") as handle:
            attrs = dict(handle.attrs)
    except OSError as error:
        raise ModelFileError(f"'{weights}' is not a readable HDF5 weights file "
                             f"({_first_line(error)}).") from None
    if "layer_names" not in attrs and "model_config" not in attrs:
        raise ModelFileError(f"'{weights}' is an HDF5 file but holds no Keras weights.")
    try:
        model.load_weights(str(weights))
    except Exception as error:  # noqa: BLE001
        raise ModelFileError(f"The weights in '{weights}' do not fit the architecture: "
                             f"{_first_line(error)}") from error


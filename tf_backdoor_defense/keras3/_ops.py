"""The few tensor operations a converted model may hold besides layers.

The repaired ``N + 1`` network (:func:`~tf_backdoor_defense.defenses.repaired_model`)
compares two argmaxes with TensorFlow operations: tf-keras records each as a
``TFOpLambda`` layer naming its TF function, Keras 3 as an operation node
(``keras.src.ops.numpy.Argmax``, ...). Both name a built-in function, not
code, so the conversion accepts exactly the functions of :data:`OPS` and
refuses, naming the node, every other one.
"""

from tf_backdoor_defense._keras import tf

__all__ = ["OPS", "op_function", "apply_op"]

#: ``{TF function of a tf-keras TFOpLambda: (Keras 3 operation class, tensor
#: parameters in order, settings)}``. The Keras 3 op of the same computation is
#: ``keras.ops.<last part of the TF name>``, or the name in :data:`_KERAS3_NAMES`.
#: Arithmetic with a constant (``inputs / 255.0`` in a script that scales its
#: pixels without a ``Rescaling`` layer) is recorded as one of these.
OPS = {
    "math.argmax": ("Argmax", ("x",), ("axis",)),
    "math.equal": ("Equal", ("x", "y"), ()),
    "cast": ("Cast", ("x",), ("dtype",)),
    "math.subtract": ("Subtract", ("x", "y"), ()),
    "math.multiply": ("Multiply", ("x", "y"), ()),
    "math.add": ("Add", ("x", "y"), ()),
    "math.truediv": ("TrueDivide", ("x", "y"), ()),
    "nn.relu": ("Relu", ("x",), ()),
    "nn.softmax": ("Softmax", ("x",), ("axis",)),
}
_KERAS3_NAMES = {"math.truediv": "true_divide"}
#: Settings a call may leave out, with the value the function then uses (``tf.nn.softmax(x)``).
_DEFAULTS = {"nn.softmax": {"axis": -1}}
_BY_KERAS3_CLASS = {cls: function for function, (cls, _, _) in OPS.items()}
_CONSTANT = "_CONSTANT_VALUE"  # tf-keras's marker of a constant first argument


def _refuse(entry, why):
    from tf_backdoor_defense.keras3._convert import _refuse as refuse  # noqa: PLC0415

    refuse(entry.get("name") or entry.get("config", {}).get("name") or "?",
           entry.get("class_name"), why)


def op_function(entry):
    """The TF function an operation node computes; None for a layer.

    Raises :class:`~tf_backdoor_defense.keras3.Keras3ConversionError`, naming
    the node, for an operation outside :data:`OPS`.

    >>> op_function({"class_name": "Dense", "module": "keras.layers", "config": {}})
    >>> op_function({"class_name": "Argmax", "module": "keras.src.ops.numpy", "config": {}})
    'math.argmax'
    """
    class_name = entry.get("class_name")
    module = str(entry.get("module") or "")
    if class_name == "TFOpLambda":
        function = entry.get("config", {}).get("function")
    elif module.startswith(("keras.src.ops", "keras.ops")):
        function = _BY_KERAS3_CLASS.get(class_name)
    else:
        return None
    if function not in OPS:
        _refuse(entry, "is a tensor operation that does not convert; only "
                f"{', '.join(sorted(OPS))} do.")
    return function


def _value(value, tensors, entry):
    """A tensor built so far for a reference to one, or the constant itself."""
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        value = value["config"]["keras_history"]
    if isinstance(value, (list, tuple)) and len(value) >= 3 and isinstance(value[0], str):
        if value[2] != 0 or value[0] not in tensors:
            _refuse(entry, f"takes {value[0]!r}, which is not a plain earlier output.")
        return tensors[value[0]]
    if isinstance(value, (dict, list, tuple)):
        _refuse(entry, f"takes an argument that does not convert ({value!r}).")
    return value


def apply_op(entry, function, tensors, target_keras):
    """The output of the operation node ``entry`` rebuilt in ``target_keras``."""
    _, positional, settings = OPS[function]
    nodes = entry.get("inbound_nodes") or []
    if len(nodes) != 1:
        _refuse(entry, "is not called exactly once.")
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}, settings in config
        values = dict(zip(positional, node.get("args") or []))
        values.update(node.get("kwargs") or {})
        for key in settings:
            values.setdefault(key, entry["config"].get(key))
        if entry["config"].get("keepdims"):
            _refuse(entry, "keeps the reduced dimension, which tf.math.argmax cannot.")
    else:  # tf-keras: [source, node index, tensor index or constant, kwargs], maybe in a list
        first = node if isinstance(node[0], str) else node[0]
        values = {positional[0]: first[2] if first[0] == _CONSTANT else first[:3]}
        values.update(first[3] if len(first) > 3 and first[3] else {})
    if values.get("name") is None:  # tf-keras records an operator's name=None
        values.pop("name", None)
    for key, value in _DEFAULTS.get(function, {}).items():
        if values.get(key) is None:
            values[key] = value
    unknown = set(values) - set(positional) - set(settings)
    missing = (set(positional) | set(settings)) - set(values)
    if unknown or missing:
        _refuse(entry, f"is called with {sorted(values)}; expected {list(positional + settings)}.")
    args = [_value(values[key], tensors, entry) for key in positional]
    options = {key: getattr(values[key], "name", values[key]) for key in settings}
    if target_keras.__name__ == "keras":  # Keras 3
        name = _KERAS3_NAMES.get(function, function.split(".")[-1])
        return getattr(target_keras.ops, name)(*args, **options)
    operation = tf
    for part in function.split("."):
        operation = getattr(operation, part)
    return operation(*args, **options)

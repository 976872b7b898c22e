"""Public functions in the caller's Keras: Keras 3 arguments in, Keras 3 models out.

:func:`with_caller_keras` decorates every public function that takes a model.
The package computes with tf-keras; for a Keras 3 caller the decorator
converts the arguments (:func:`~tf_backdoor_defense.keras3.to_tf_keras`, the
configuration checked first), runs the function, and converts every model in
the result back (:func:`~tf_backdoor_defense.keras3.to_keras3`), also inside
the frozen result dataclasses (``dataclasses.replace``). One mechanism for the
whole API: no function has a Keras 3 branch of its own.
"""

import collections.abc
import contextvars
import dataclasses
import functools
import inspect
import sys
import warnings

from tf_backdoor_defense._errors import InputTypeError
from tf_backdoor_defense._keras import keras as tf_keras
from tf_backdoor_defense.keras3._backend import (is_keras3_loaded, is_keras3_model,
                                                 is_keras3_object, keras3)
from tf_backdoor_defense.keras3._convert import (Keras3ConversionError, _accepted, _neutral,
                                                 copy_weights, to_keras3, to_tf_keras)

__all__ = ["to_caller_keras", "with_caller_keras", "caller_uses_keras3", "save_model"]

#: True while a decorated function runs for a Keras 3 caller (per thread and task).
_KERAS3_CALL = contextvars.ContextVar("tf_backdoor_defense_keras3_call", default=False)
#: ``{file: module name}`` of the warnings issued again after a call.
_MODULE_NAMES = {}


def to_caller_keras(value, memo=None):
    """``value`` with every tf-keras model in it (dicts, lists, dataclasses) converted to Keras 3.

    ``memo`` maps ``id()`` of a tf-keras model to the Keras 3 model to give
    back for it (the caller's own model, for a converted input).
    """
    memo = {} if memo is None else memo
    if isinstance(value, tf_keras.Model):
        if id(value) not in memo:
            memo[id(value)] = to_keras3(value)
        return memo[id(value)]
    if isinstance(value, dict):
        return type(value)((k, to_caller_keras(v, memo)) for k, v in value.items())
    if isinstance(value, collections.abc.Mapping):  # a sweep's LazyModels: made and converted
        return {k: to_caller_keras(v, memo) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_caller_keras(v, memo) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_caller_keras(getattr(value, f.name), memo)
                   for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


# -- arguments: Keras 3 in, tf-keras to compute with ------------------------------------------
_TRAINING_FAMILIES = (("optimizers", "Optimizer"), ("losses", "Loss"))


def _training_object(value, name, family):
    """A Keras 3 optimizer or loss object as the tf-keras object of the same class and settings."""
    class_name = type(value).__name__
    target = getattr(getattr(tf_keras, family), class_name, None)
    if not inspect.isclass(target):
        raise Keras3ConversionError(
            f"The `{name}` argument is a Keras 3 {class_name}, which tf-keras lacks. Pass a "
            f"built-in {family[:-1]} (or its name, like 'adam') instead.", class_name=class_name)
    config = dict(value.get_config())
    schedule = config.get("learning_rate")
    if isinstance(schedule, dict):  # a learning-rate schedule, serialized
        inner = schedule.get("class_name")
        cls = getattr(tf_keras.optimizers.schedules, str(inner), None)
        if not inspect.isclass(cls):
            raise Keras3ConversionError(
                f"The `{name}` argument uses the learning-rate schedule {inner!r}, which does "
                "not convert to tf-keras; pass a built-in schedule or a number.", class_name=inner)
        config["learning_rate"] = cls.from_config(_settings(schedule.get("config") or {}, cls,
                                                            name, inner))
    return target.from_config(_settings(config, target, name, class_name))


def _settings(config, cls, name, class_name):
    """``config`` for the tf-keras ``cls``: keys it lacks dropped when neutral, else refused."""
    accepted = _accepted(cls) | {"name"}
    for key, value in config.items():
        if key not in accepted and not _neutral(value):
            raise Keras3ConversionError(
                f"The `{name}` argument ({class_name}) sets {key}={value!r}, which tf-keras "
                f"does not support.", class_name=class_name)
    return {key: value for key, value in config.items() if key in accepted}


class _Arguments:
    """The Keras 3 models of one call, their tf-keras copies, and other converted objects."""

    def __init__(self):
        self.models = {}  # id(Keras 3 model) -> (Keras 3 model, tf-keras copy)
        self.memo = {}  # id(tf-keras copy) -> Keras 3 model, for the way back

    def convert(self, value, name):
        """``value`` with every Keras 3 model, optimizer and loss in it as tf-keras objects."""
        if is_keras3_model(value):
            if id(value) not in self.models:
                converted = to_tf_keras(value, name)
                self.models[id(value)] = (value, converted)
                self.memo[id(converted)] = value
            return self.models[id(value)][1]
        for family, kind in _TRAINING_FAMILIES:
            if is_keras3_object(value, f"{family}.{kind}"):
                return _training_object(value, name, family)
        if is_keras3_object(value, "callbacks.Callback"):
            raise InputTypeError(
                f"The `{name}` argument holds a Keras 3 callback ({type(value).__name__}). The "
                "package trains with tf-keras, so its callbacks must be tf_keras callbacks "
                "(for example tf_keras.callbacks.EarlyStopping). In your own Keras 3 "
                "`model.fit`, use tf_backdoor_defense.keras3.FinePruning.")
        if isinstance(value, dict):
            items = {k: self.convert(v, f"{name}[{k!r}]") for k, v in value.items()}
            if all(items[k] is value[k] for k in value):
                return value
            return type(value)(items)
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            items = [self.convert(v, f"{name}[{i}]") for i, v in enumerate(value)]
            if all(a is b for a, b in zip(items, value)):
                return value
            return type(value)(items)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes = {f.name: self.convert(getattr(value, f.name), f"{name}.{f.name}")
                       for f in dataclasses.fields(value) if f.init}
            if all(changes[k] is getattr(value, k) for k in changes):
                return value
            return dataclasses.replace(value, **changes)
        return value

    def write_back(self):
        """Copy the tf-keras copies' weights and masks into the caller's Keras 3 models."""
        for original, converted in self.models.values():
            copy_weights(converted, original)


def _model_types():
    """The model classes of the Keras versions the process has loaded."""
    return (tf_keras.Model, keras3().Model) if is_keras3_loaded() else (tf_keras.Model,)


def with_caller_keras(function=None, *, arguments=None, in_place=False):
    """Decorate a public function so that it takes and gives back the caller's Keras.

    A subclassed model among the arguments (either Keras; not for ``in_place``
    functions) is first traced into a Functional copy
    (:func:`~tf_backdoor_defense.graph.as_functional`), which the function
    then receives. Every Keras 3 model among the arguments, also inside a dict, list, tuple
    or dataclass (a ``SweepResult``, a dict of models), is converted with
    :func:`to_tf_keras` (its configuration checked first: an unsupported
    layer is refused by name); Keras 3 optimizer and loss objects become the
    tf-keras ones of the same class and settings, and a Keras 3 callback is
    refused with a ``TypeError`` that says what to pass instead. The function
    runs on tf-keras, and every tf-keras model in its result, also inside
    dicts, lists and (frozen) dataclasses, is converted back with
    :func:`to_keras3`; a converted input maps back to the caller's own
    model. Without a Keras 3 model among the arguments the result is not
    touched, so a tf-keras caller sees no difference.

    Warnings keep pointing at the caller's line: those the function issues
    during the call are recorded and issued again on return, the ones whose
    ``stacklevel`` lands on the decorator for the function's caller (as
    ``warnings.catch_warnings`` records them, calls from several threads at
    once may interleave their warnings).

    Parameters
    ----------
    function : callable
    arguments : tuple of str, default=None
        Convert only these parameters; default: all of them.
    in_place : bool, default=False
        The function changes its model argument (``set_mask``): the weights,
        masks and fine-pruning state of the tf-keras copy are copied back into
        the caller's Keras 3 model afterwards.

    Examples
    --------
    >>> @with_caller_keras
    ... def width(model):
    ...     return model.output_shape[-1]
    >>> import tf_keras
    >>> width(tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)]))
    2
    """
    if function is None:
        return functools.partial(with_caller_keras, arguments=arguments, in_place=in_place)
    signature = inspect.signature(function)
    names = None if arguments is None else frozenset(arguments)

    def call(args, kwargs):
        try:
            bound = signature.bind_partial(*args, **kwargs)
        except TypeError:  # let the function itself report a wrong call
            return function(*args, **kwargs)
        if not in_place:  # a function that changes its model cannot change a traced copy
            from tf_backdoor_defense.graph._functional import as_functional  # noqa: PLC0415

            for name, value in bound.arguments.items():
                if (names is None or name in names) and isinstance(value, _model_types()):
                    bound.arguments[name] = as_functional(value, name)
        if not is_keras3_loaded():  # a process without Keras 3 pays nothing more
            return function(*bound.args, **bound.kwargs)
        received = _Arguments()
        for name, value in bound.arguments.items():
            if names is None or name in names:
                bound.arguments[name] = received.convert(value, name)
        if not received.models:
            return function(*bound.args, **bound.kwargs)
        token = _KERAS3_CALL.set(True)
        try:
            result = function(*bound.args, **bound.kwargs)
        finally:
            _KERAS3_CALL.reset(token)
        if in_place:
            received.write_back()
        return to_caller_keras(result, received.memo)

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        caught = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return call(args, kwargs)
        finally:
            _reissue(caught)

    return wrapped


def _module_name(filename):
    """The name of the loaded module whose file is ``filename`` (None when there is none)."""
    if filename not in _MODULE_NAMES:
        _MODULE_NAMES[filename] = next((name for name, module in list(sys.modules.items())
                                        if getattr(module, "__file__", None) == filename), None)
    return _MODULE_NAMES[filename]


def _reissue(caught):
    """Issue the warnings recorded during a decorated call again, under the caller's filters.

    A warning whose ``stacklevel`` points at the decorator's frame (this file)
    was meant for the code that called the public function: it is issued for
    that caller (a ``DeprecationWarning`` for an old keyword then shows in the
    user's script as it would without the decorator). Every other warning
    keeps its file, line, module and registry.
    """
    for record in caught:
        if record.filename == __file__:
            warnings.warn(record.message, record.category, stacklevel=3)
            continue
        name = _module_name(record.filename)
        registry = None
        if name is not None:
            registry = vars(sys.modules[name]).setdefault("__warningregistry__", {})
        warnings.warn_explicit(record.message, record.category, record.filename, record.lineno,
                               module=name, registry=registry, source=record.source)


def caller_uses_keras3():
    """Whether the public call in progress received a Keras 3 model.

    >>> caller_uses_keras3()
    False
    """
    return _KERAS3_CALL.get()


def save_model(model, path):
    """Save the tf-keras ``model`` to ``path`` in the caller's Keras.

    Inside a call that received a Keras 3 model, the model is converted with
    :func:`to_keras3` and saved by Keras 3, so the file loads with
    ``keras.saving.load_model``; otherwise tf-keras saves it.
    """
    (to_keras3(model) if caller_uses_keras3() else model).save(str(path))

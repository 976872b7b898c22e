"""A subclassed model as a layer graph: its ``call()`` traced into a Functional copy.

Every function of the package reads a model's layer graph (which layer feeds
which, where a channel can be masked). A subclassed model (``class
MyModel(keras.Model)`` with a ``call()`` method, as TensorFlow's own MNIST
quickstart builds one) has no graph until its ``call()`` runs on symbolic
inputs. :func:`as_functional` runs it so, over the model's own layers, and
copies the result: the copy is an ordinary Functional model with new layers
and the same weights, and the received model's layers are left as they were.
"""

from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import keras as tf_keras
from tf_backdoor_defense.keras3._backend import is_keras3_model, keras3
from tf_backdoor_defense.masks._wrapper import clone_layer

__all__ = ["is_subclassed", "as_functional"]


def _keras_of(model):
    return keras3() if is_keras3_model(model) else tf_keras


def is_subclassed(model):
    """Whether ``model`` is subclassed: a ``keras.Model`` (either Keras) without a layer graph.

    >>> import tf_keras as keras
    >>> is_subclassed(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    False
    """
    if is_keras3_model(model):
        keras = keras3()
        from keras.src.models.functional import Functional  # noqa: PLC0415 - no public name

        return not isinstance(model, (keras.Sequential, Functional))
    return (isinstance(model, tf_keras.Model) and not isinstance(model, tf_keras.Sequential)
            and not getattr(model, "_is_graph_network", False))


def _input_spec(model, name):
    """The (shape without the batch axis, dtype) a built subclassed model was called with."""
    if is_keras3_model(model):
        shapes = dict(getattr(model, "_build_shapes_dict", None) or {})
        if len(shapes) != 1:
            raise InputError(
                f"The `{name}` argument is a subclassed Keras 3 model ({type(model).__name__}) "
                f"that {'has not been called yet' if not shapes else 'takes several inputs'}: "
                "call it once on a batch of inputs (or use a Functional model) first.")
        shape = next(iter(shapes.values()))
        return tuple(shape)[1:], "float32"
    spec = model.save_spec() if model.built else None
    built_shape = getattr(model, "_build_input_shape", None)
    if spec is None and built_shape is not None and len(built_shape) > 1:  # model.build(shape)
        return tuple(built_shape)[1:], model.dtype or "float32"
    args = spec[0] if spec else ()
    if len(args) != 1 or spec[1] or not hasattr(args[0], "shape"):
        raise InputError(
            f"The `{name}` argument is a subclassed model ({type(model).__name__}) that "
            f"{'takes several inputs' if spec else 'has not been called yet'}: call it once on "
            "a batch of inputs (or use a Functional model) first.")
    return tuple(args[0].shape)[1:], args[0].dtype


def _sublayers(model):
    return list(model._flatten_layers(include_self=False, recursive=True))


def as_functional(model, name="model"):
    """``model`` itself, or for a subclassed model a Functional copy traced from its ``call()``.

    The copy's layers are new layers of the same classes, configurations and
    weights, in the order ``call()`` uses them, so it computes what ``model``
    computes (at inference; ``call()`` runs with the default ``training``).
    The received model is not changed: tracing calls its layers on symbolic
    inputs, and the nodes that adds to them are removed again. A ``call()``
    that cannot be traced (Python control flow on tensor values, several
    inputs) raises :class:`~tf_backdoor_defense.InputError` saying so.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> class Net(keras.Model):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.hidden = keras.layers.Dense(4, activation="relu")
    ...         self.out = keras.layers.Dense(3)
    ...     def call(self, x):
    ...         return self.out(self.hidden(x))
    >>> net = Net()
    >>> x = np.ones((2, 5), "float32")
    >>> _ = net(x)
    >>> functional = as_functional(net)
    >>> [type(layer).__name__ for layer in functional.layers]
    ['InputLayer', 'Dense', 'Dense']
    >>> bool(np.allclose(functional(x), net(x))), len(net.hidden.inbound_nodes)
    (True, 0)
    """
    if not is_subclassed(model):
        return model
    keras = _keras_of(model)
    shape, dtype = _input_spec(model, name)
    layers = _sublayers(model)
    kept = [(layer, len(layer._inbound_nodes), len(layer._outbound_nodes)) for layer in layers]
    try:
        inputs = keras.Input(shape=shape, dtype=dtype, name=f"{model.name}_input")
        outputs = model.call(inputs)
        if isinstance(outputs, (list, tuple, dict)):
            raise InputError("its call() returns several outputs")
        traced = keras.Model(inputs, outputs, name=model.name)
        copy = keras.models.clone_model(traced, clone_function=clone_layer)
        copy.set_weights(traced.get_weights())
    except InputError as error:
        raise InputError(f"The `{name}` argument is a subclassed model ({type(model).__name__}) "
                         f"that cannot be used: {error}") from None
    except Exception as error:  # noqa: BLE001 - whatever the user's call() raised, named
        raise InputError(
            f"The `{name}` argument is a subclassed model ({type(model).__name__}) whose call() "
            f"could not be traced into a Functional model ({type(error).__name__}: {error}). "
            "Build it as a Sequential or Functional model.") from error
    finally:
        for layer, inbound, outbound in kept:
            del layer._inbound_nodes[inbound:]
            del layer._outbound_nodes[outbound:]
    return copy

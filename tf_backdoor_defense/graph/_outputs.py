"""What a classifier outputs: probabilities (a final softmax or sigmoid) or logits."""

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.masks._wrapper import unwrap

__all__ = ["output_layer", "output_activation"]

#: TensorFlow functions a ``TFOpLambda`` output layer may apply last, by what they give.
_OP_ACTIVATIONS = {"nn.softmax": "softmax", "math.softmax": "softmax",
                   "math.sigmoid": "sigmoid", "nn.sigmoid": "sigmoid"}


def output_layer(model):
    """The layer that computes ``model``'s output: unwrapped from ``PruneByActivation``, and
    followed into a nested model that computes it.

    >>> import tf_keras as keras
    >>> head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="out")])
    >>> inputs = keras.Input((4,))
    >>> output_layer(keras.Model(inputs, head(inputs))).name
    'out'
    """
    layer = unwrap(_producer(model.outputs[0]))
    for _ in range(16):  # nested models, to a depth no real model reaches
        if not (isinstance(layer, keras.Model) and getattr(layer, "outputs", None)):
            break
        layer = unwrap(_producer(layer.outputs[0]))
    return layer


def _producer(tensor):
    """The layer that made a symbolic tensor (tf-keras ``layer``; Keras 3 ``operation``)."""
    history = tensor._keras_history
    return history.layer if hasattr(history, "layer") else history.operation


def output_activation(model):
    """``"softmax"``, ``"sigmoid"`` or ``None`` (logits): what ``model`` applies last.

    Read from the output layer (:func:`output_layer`): its ``activation``, a
    ``Softmax`` layer, or a TensorFlow softmax or sigmoid applied to the
    last tensor (``tf.nn.softmax(logits)`` in a Functional model).

    >>> import tf_keras as keras
    >>> inputs = keras.Input((3,))
    >>> logits = keras.layers.Dense(2)(inputs)
    >>> output_activation(keras.Model(inputs, logits))
    >>> output_activation(keras.Model(inputs, keras.layers.Softmax()(logits)))
    'softmax'
    """
    layer = output_layer(model)
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    if type(layer).__name__ == "TFOpLambda":
        return _OP_ACTIVATIONS.get(layer.get_config().get("function"))
    name = getattr(getattr(layer, "activation", None), "__name__", "")
    if name in ("softmax", "softmax_v2"):
        return "softmax"
    return "sigmoid" if name == "sigmoid" else None

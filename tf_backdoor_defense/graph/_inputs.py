"""A model's inputs as a search over them needs them: float32, where a model reads integers."""

from tf_backdoor_defense._keras import keras, tf

__all__ = ["with_float_inputs"]


def with_float_inputs(model):
    """``model``, or a copy of it that reads float32 where ``model`` reads integers.

    A model whose input is declared ``uint8`` (or another integer type) casts
    what it is given to that type first, and a cast to an integer has no
    gradient: a search over inputs (a reversed trigger, a universal
    perturbation) would get none. The copy has the same layers and weights
    on float32 inputs, so it computes what ``model`` computes on
    integer-valued inputs. It is a copy (``model``'s layers are not called
    again, which would change its graph): weights trained on it go back with
    ``model.set_weights(copy.get_weights())``. A model whose inputs are all
    floating point, or one without a layer graph, is returned as it is.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> inputs = keras.Input((2,), dtype="uint8")
    >>> model = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="ones")(
    ...     keras.layers.Rescaling(0.5)(inputs)))
    >>> view = with_float_inputs(model)
    >>> view.inputs[0].dtype.name, len(model.layers[-1].inbound_nodes)
    ('float32', 1)
    >>> x = tf.constant([[1.0, 3.0]])
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     y = view(x)
    >>> tape.gradient(y, x).numpy().tolist()
    [[0.5, 0.5]]
    >>> float(y[0, 0]) == float(model(np.array([[1, 3]]))[0, 0])
    True
    >>> plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> with_float_inputs(plain) is plain
    True
    """
    if not getattr(model, "_is_graph_network", False) or all(
            tf.as_dtype(t.dtype).is_floating for t in model.inputs):
        return model
    inputs = [keras.Input(batch_shape=t.shape, dtype="float32" if not tf.as_dtype(t.dtype)
                          .is_floating else t.dtype) for t in model.inputs]
    copy = keras.models.clone_model(model, input_tensors=inputs[0] if len(inputs) == 1
                                    else inputs)
    copy.set_weights(model.get_weights())
    return copy

"""A model's inputs as a search over them needs them: float32 where a model reads integers,
channels-last where it reads channels-first images."""

from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.graph._replay import replay_nodes, topological_nodes
from tf_backdoor_defense.masks._registry import ID_READER_TYPES
from tf_backdoor_defense.masks._wrapper import clone_layer

__all__ = ["with_float_inputs", "reads_channels_first", "channels_last_view",
           "check_input_gradient", "NoInputGradientError"]


class NoInputGradientError(InputError):
    """The model's output has no gradient with respect to its inputs (a search over them cannot
    run)."""


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
                                    else inputs, clone_function=clone_layer)
    copy.set_weights(model.get_weights())
    return copy


def _layers_in_order(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers_in_order(layer)
        else:
            yield getattr(layer, "layer", layer)  # the layer inside a PruneByActivation


def reads_channels_first(model):
    """Whether ``model`` reads its images channels-first, ``(C, H, W)``.

    True when the input is an image (rank 3 without the batch axis) and the
    first layer that reads a spatial layout (a convolution or a pooling) is
    ``data_format="channels_first"``, as models ported from PyTorch often are.

    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((1, 8, 8)),
    ...     keras.layers.Conv2D(2, 3, data_format="channels_first"), keras.layers.Flatten()])
    >>> reads_channels_first(model)
    True
    """
    if len(model.inputs[0].shape) != 4:
        return False
    for layer in _layers_in_order(model):
        data_format = getattr(layer, "data_format", None)
        if data_format is not None and not isinstance(layer, keras.layers.Flatten):
            return data_format == "channels_first"
    return False


def channels_last_view(model):
    """A copy of ``model`` that reads channels-last images ``(H, W, C)`` where ``model`` reads
    channels-first ones ``(C, H, W)``: a ``Permute`` to ``model``'s layout, then copies of
    its layers (same configurations and weights; ``model`` is not called again).

    A search over images (a reversed trigger's mask covers pixels, across the
    channels) works in the channels-last view.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((3, 6, 5)),
    ...     keras.layers.Conv2D(2, 3, data_format="channels_first"), keras.layers.Flatten()])
    >>> view = channels_last_view(model)
    >>> view.inputs[0].shape.as_list()
    [None, 6, 5, 3]
    >>> x = np.random.default_rng(0).random((2, 3, 6, 5), dtype=np.float32)
    >>> bool(np.allclose(view(np.moveaxis(x, 1, -1)), model(x)))
    True
    """
    channels, height, width = model.inputs[0].shape[1:]
    inputs = keras.Input((height, width, channels), dtype=model.inputs[0].dtype)
    copies = {}

    def call(node, args, kwargs):
        layer = node.layer
        first = id(layer) not in copies
        if first:
            copies[id(layer)] = clone_layer(layer)
        outputs = copies[id(layer)](*args, **kwargs)
        if first:
            copies[id(layer)].set_weights(layer.get_weights())
        return outputs

    outputs = replay_nodes(topological_nodes(model), model.inputs,
                           [keras.layers.Permute((3, 1, 2))(inputs)],
                           model.outputs[0] if len(model.outputs) == 1 else model.outputs,
                           call=call)
    return keras.Model(inputs, outputs, name=model.name)


def check_input_gradient(model, x, what):
    """Raise :class:`NoInputGradientError` (an ``InputError``) when ``model``'s output has no
    gradient with respect to inputs shaped as ``x`` (only its shape is read; the gradient is
    traced, not run), naming ``what`` needs one.

    A search over input values (a reversed trigger, a universal perturbation)
    follows that gradient. A model that reads its inputs as integers through
    an ``Embedding`` (token IDs of a text classifier) has none: its inputs
    are looked up, not computed with.

    >>> import numpy as np, tf_keras as keras
    >>> tokens = keras.Sequential([keras.Input((4,)), keras.layers.Embedding(10, 2),
    ...                            keras.layers.Flatten(), keras.layers.Dense(2)])
    >>> check_input_gradient(tokens, np.zeros((2, 4), "float32"), "the scan")
    Traceback (most recent call last):
    ...
    tf_backdoor_defense.graph._inputs.NoInputGradientError: The model's output has no gradient...
    """
    reaches = []

    # Traced, never run: whether a gradient exists is known once the graph is built (and eager
    # gradients of channels-first pooling have no CPU kernel).
    @tf.function(input_signature=[tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32)])
    def trace(sample):
        with tf.GradientTape() as tape:
            tape.watch(sample)
            output = tf.reduce_sum(tf.cast(model(sample, training=False), tf.float32))
        reaches.append(tape.gradient(output, sample) is not None)
        return output

    trace.get_concrete_function()
    if not reaches[0]:
        readers = [type(layer).__name__ for layer in model.layers
                   if isinstance(layer, ID_READER_TYPES)]
        why = (f" (it reads them through {', '.join(sorted(set(readers)))}, as token or "
               "category IDs)" if readers else "")
        raise NoInputGradientError(
            f"The model's output has no gradient with respect to its inputs{why}. {what} "
            "searches over input values along that gradient, so it applies to models of "
            "continuous inputs such as images; defend(scan=False, methods=[...]) with methods "
            "that only fine-tune or prune still runs.")

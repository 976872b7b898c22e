"""Questions about a network's structure that help choose the layers to prune."""

from tf_backdoor_defense._keras import check_keras2_model, keras
from tf_backdoor_defense.graph._channels import channel_consumers
from tf_backdoor_defense.masks._registry import is_conv
from tf_backdoor_defense.masks._wrapper import find_layer, unwrap
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["convs_read_by_dense"]


def _is_dense(model, name):
    return isinstance(unwrap(find_layer(model, name)), keras.layers.Dense)


@with_caller_keras
def convs_read_by_dense(model, layers=None):
    """The convolutions whose channels a Dense layer reads directly.

    A convolution qualifies when its output reaches a Dense layer through
    channel-wise layers (activations, pooling, dropout, ...) and ``Flatten``
    only: the classifier then reads its channels one by one, and pruning
    that layer acts on the classifier's input. The lab's face BadNet has two
    (``conv_3`` and ``conv_4``), the usual CNN only its last convolution.

    Parameters
    ----------
    model : tf_keras.Model
        A Sequential or Functional model (wrapped layers allowed).
    layers : str or list of str, default=None
        The layers to consider; default: every layer. Layers that are not
        convolutions are left out.

    Returns
    -------
    list of str
        The qualifying layer names, in the model's layer order. A layer whose
        channels cannot be followed through the graph is left out.

    Examples
    --------
    >>> import tf_keras as keras
    >>> inputs = keras.Input((8, 8, 1))
    >>> a = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")(inputs)
    >>> b = keras.layers.Conv2D(4, 3, activation="relu", name="conv_b")(a)
    >>> x = keras.layers.Flatten()(keras.layers.MaxPooling2D()(b))
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))
    >>> convs_read_by_dense(model)
    ['conv_b']
    """
    check_keras2_model(model)
    if layers is None:
        names = [layer.name for layer in model.layers]
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        wanted = set(names)
        for name in names:
            find_layer(model, name)  # an unknown name is an error, not an empty answer
        names = [layer.name for layer in model.layers if layer.name in wanted]
    found = []
    for name in names:
        if not is_conv(unwrap(find_layer(model, name))):
            continue
        try:
            uses = channel_consumers(model, name)
        except ValueError:  # a graph whose channels the tracer does not follow
            continue
        if any(use.consumer and _is_dense(model, use.consumer) for use in uses):
            found.append(name)
    return found

"""Small reference networks and a BadNet trainer for examples, tests and benchmarks."""

import numpy as np

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.attacks import poison_dataset

__all__ = ["mnist_cnn", "train_badnet"]


def mnist_cnn(input_shape=(28, 28, 1), classes=10, conv_channels=(16, 32), dense_units=64, seed=0,
              padding="valid"):
    """Conv -> pool -> Conv -> pool -> Flatten -> Dense -> softmax.

    The last convolutional layer is named ``"conv_last"``, the hidden Dense
    layer ``"fc"``. With ``padding="valid"`` (the default) a 28x28 input's
    last two rows and columns never reach the classifier; ``"same"`` sees
    every pixel, which corner triggers need.

    >>> mnist_cnn().get_layer("conv_last").filters
    32
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape)
    x = inputs
    for i, channels in enumerate(conv_channels):
        last = i == len(conv_channels) - 1
        x = keras.layers.Conv2D(channels, 3, activation="relu", padding=padding,
                                name="conv_last" if last else f"conv_{i + 1}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool_{i + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="fc")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="output")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def train_badnet(x, y, trigger, *, target=0, rate=0.1, epochs=8, batch_size=64, model=None,
                 learning_rate=1e-3, seed=0, verbose=0):
    """Train a BadNet: ``model`` (default :func:`mnist_cnn`) on ``(x, y)`` with
    a ``rate`` fraction poisoned by ``trigger`` towards ``target``.

    Returns the trained model (compiled with Adam and sparse cross-entropy).
    """
    x_bad, y_bad, _ = poison_dataset(x, y, trigger, rate=rate, target=target, seed=seed)
    if model is None:
        model = mnist_cnn(input_shape=x.shape[1:], classes=int(np.max(y)) + 1, seed=seed)
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_bad, y_bad, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=verbose)
    return model

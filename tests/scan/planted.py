"""Tiny classifiers with hand-planted backdoors: built in milliseconds, no training.

Each class has a random 8x8 template; an input is its class's template plus
noise, with the bottom-right pixel kept dark. Clean logits score the
input against every template. The backdoor reads that one pixel: when it is
bright, a gate switches the logits to the attacker's (all-to-one: class
``target`` wins; all-to-all: the class after the true one wins).
"""

import numpy as np

from tf_backdoor_defense._keras import keras

SIZE, CLASSES, TRIGGER = 8, 6, (7, 7)


def _templates(seed=0):
    rng = np.random.default_rng(seed)
    templates = (rng.random((CLASSES, SIZE, SIZE)) > 0.5).astype(np.float32)
    templates[:, TRIGGER[0], TRIGGER[1]] = 0.0
    return templates


def planted_data(n=240, seed=1, templates=None):
    """``(x, y)``: ``n`` noisy template images (N, 8, 8, 1) in [0, 1]."""
    templates = _templates() if templates is None else templates
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = templates[y] + rng.normal(0.0, 0.15, size=(n, SIZE, SIZE))
    x[:, TRIGGER[0], TRIGGER[1]] = 0.0
    return np.clip(x, 0.0, 1.0).astype(np.float32)[..., None], y.astype(np.int64)


def planted_model(kind="all-to-one", target=2, templates=None, input_shape=(SIZE, SIZE, 1)):
    """A classifier of the template images, with a one-pixel backdoor (or none: kind="clean").

    ``input_shape`` may also be ``(8, 8)`` or ``(64,)``: the same classifier of the images
    without a channel axis, or flattened (a multilayer perceptron's inputs).
    """
    templates = _templates() if templates is None else templates
    flat = (2.0 * templates - 1.0).reshape(CLASSES, -1).T * 0.5
    inputs = keras.Input(input_shape)
    features = keras.layers.Flatten()(inputs)
    clean = keras.layers.Dense(CLASSES, name="clean_logits")
    logits = clean(features)
    clean.set_weights([flat, np.zeros(CLASSES, np.float32)])
    if kind != "clean":
        pixel = TRIGGER[0] * SIZE + TRIGGER[1]
        gate_layer = keras.layers.Dense(1, activation="sigmoid", name="gate")
        gate = gate_layer(features)
        kernel = np.zeros((SIZE * SIZE, 1), np.float32)
        kernel[pixel] = 12.0
        gate_layer.set_weights([kernel, np.array([-6.0], np.float32)])
        attacker = keras.layers.Dense(CLASSES, name="attacker_logits")
        bad = attacker(features)
        if kind == "all-to-one":
            weights = np.zeros_like(flat)
            bias = np.full(CLASSES, -10.0, np.float32)
            bias[target] = 10.0
        else:  # all-to-all: the template of class c scores class c + 1
            weights = np.roll(flat, 1, axis=1) * 4.0
            bias = np.zeros(CLASSES, np.float32)
        attacker.set_weights([weights, bias])
        spread = keras.layers.Dense(CLASSES, use_bias=False, trainable=False, name="spread")
        open_gate = spread(gate)
        spread.set_weights([np.ones((1, CLASSES), np.float32)])
        closed_gate = keras.layers.Rescaling(-1.0, offset=1.0)(open_gate)
        logits = keras.layers.Add()([keras.layers.Multiply()([logits, closed_gate]),
                                     keras.layers.Multiply()([bad, open_gate])])
    outputs = keras.layers.Activation("softmax")(logits)
    return keras.Model(inputs, outputs, name=f"planted_{kind.replace('-', '_')}")


def stamp_trigger(x):
    x = np.array(x, copy=True)
    x[:, TRIGGER[0], TRIGGER[1], :] = 1.0
    return x

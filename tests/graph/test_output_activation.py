"""Probabilities or logits: the softmax a model applies last, wherever it sits.

A model's output read as logits when it holds probabilities breaks the scan (the log-softmax of
probabilities barely moves, so every class's reversed trigger looks alike) and the repairs' loss.
The softmax may sit in the last Dense layer, a ``Softmax`` or ``Activation`` layer, a nested model
that computes the output, or a TensorFlow op applied to the logits.
"""

import warnings

import numpy as np
import pytest

from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.finetune._training import loss_for
from tf_backdoor_defense.graph._outputs import output_activation, output_layer
from tf_backdoor_defense.masks._wrapper import wrap_layers
from tf_backdoor_defense.scan import scan_model


def _head(activation):
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3, activation=activation, name="out")(inputs))


def _ways():
    """name -> (model, what it applies last)."""
    inputs = keras.Input((4,))
    logits = keras.layers.Dense(3, name="logits")(inputs)
    nested = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    twice = keras.Sequential([keras.Input((4,)), nested])
    with warnings.catch_warnings():  # wrapping an output layer warns; here it is the point
        warnings.simplefilter("ignore")
        wrapped = wrap_layers(_head(None), "out")
    return {
        "dense softmax": (_head("softmax"), "softmax"),
        "dense logits": (_head(None), None),
        "dense sigmoid": (_head("sigmoid"), "sigmoid"),
        "softmax layer": (keras.Model(inputs, keras.layers.Softmax()(logits)), "softmax"),
        "activation layer": (keras.Model(inputs, keras.layers.Activation("softmax")(logits)),
                             "softmax"),
        "tf.nn.softmax": (keras.Model(inputs, tf.nn.softmax(logits)), "softmax"),
        "tf.sigmoid": (keras.Model(inputs, tf.sigmoid(logits)), "sigmoid"),
        "nested softmax": (keras.Model(inputs, nested(inputs)), "softmax"),
        "nested twice": (keras.Model(inputs, twice(inputs)), "softmax"),
        "wrapped logits": (wrapped, None),
    }


@pytest.mark.parametrize("way", list(_ways()))
def test_the_last_activation_is_found_wherever_it_sits(way):
    model, expected = _ways()[way]
    assert output_activation(model) == expected
    if model.outputs[0].shape[-1] > 1:
        assert loss_for(model).get_config()["from_logits"] == (expected != "softmax")


def test_the_output_layer_is_followed_into_nested_models():
    model, _ = _ways()["nested twice"]
    assert isinstance(output_layer(model), keras.layers.Dense)


def test_a_backdoor_behind_a_nested_softmax_is_found(planted):
    """The planted all-to-one net called as the last layer of another model: its softmax is
    inside. Read as logits, no class stood out (every mask under 1.1 pixels, anomaly NaN)."""
    inner = planted["all-to-one"]
    inputs = keras.Input(inner.inputs[0].shape[1:])
    outer = keras.Model(inputs, inner(inputs))
    options = dict(steps=150, init_cost=1e-2, seed=1)
    result = scan_model(outer, planted["data"], **options)
    assert result.suspected_targets == (2,)
    direct = scan_model(inner, planted["data"], **options)
    np.testing.assert_allclose(result.table["mask_l1"], direct.table["mask_l1"], rtol=1e-4)

"""Structure questions: which convolutions the classifier reads directly."""

import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.graph._analysis import convs_read_by_dense
from tf_backdoor_defense.masks._wrapper import wrap_layers


def _branched():
    """The lab BadNet's shape: conv_3 feeds both conv_4 and fc_1; conv_4 feeds fc_2."""
    inputs = keras.Input((8, 8, 1))
    c3 = keras.layers.MaxPooling2D(name="pool_3")(
        keras.layers.Conv2D(4, 3, activation="relu", name="conv_3")(inputs))
    c4 = keras.layers.Conv2D(5, 2, activation="relu", name="conv_4")(c3)
    a = keras.layers.Dense(6, name="fc_1")(keras.layers.Flatten()(c3))
    b = keras.layers.Dense(6, name="fc_2")(keras.layers.Flatten()(c4))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Add()([a, b]))
    return keras.Model(inputs, outputs)


def test_every_conv_the_classifier_reads_directly_in_layer_order():
    model = _branched()
    assert convs_read_by_dense(model) == ["conv_3", "conv_4"]
    assert convs_read_by_dense(model, ["conv_4", "fc_1", "conv_3"]) == ["conv_3", "conv_4"]
    assert convs_read_by_dense(model, "conv_4") == ["conv_4"]


def test_a_conv_read_only_by_another_conv_is_left_out():
    model = tiny_conv_model()  # conv_a -> pool -> conv_b -> flat -> fc
    assert convs_read_by_dense(model) == ["conv_b"]
    assert convs_read_by_dense(model, "conv_a") == []
    assert convs_read_by_dense(wrap_layers(model, ["conv_a", "conv_b", "fc"])) == ["conv_b"]


def test_unknown_layer_and_wrong_model_are_errors():
    with pytest.raises(ValueError, match="nope"):
        convs_read_by_dense(tiny_conv_model(), ["nope"])
    with pytest.raises(TypeError, match="model"):
        convs_read_by_dense("model.h5")

"""Channel dependencies: how each layer treats channels, and who reads a layer's channels."""

import pytest

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.graph._channels import ChannelUse, channel_consumers, layer_kind
from tf_backdoor_defense.masks._wrapper import PruneByActivation

L = keras.layers


@pytest.mark.parametrize("layer, kind", [
    (L.Conv2D(2, 3), "linear"),
    (L.Dense(2), "linear"),
    (PruneByActivation(L.Conv1D(2, 3)), "linear"),
    (L.Conv2D(2, 3, groups=1, data_format="channels_first"), "other"),
    (L.Conv2DTranspose(2, 3), "other"),
    (L.DepthwiseConv2D(3), "other"),
    (L.SeparableConv2D(2, 3), "other"),
    (L.MaxPooling2D(), "channelwise"),
    (L.Dropout(0.1), "channelwise"),
    (L.UpSampling2D(), "channelwise"),
    (L.ReLU(), "channelwise"),
    (L.BatchNormalization(), "channelwise"),
    (L.BatchNormalization(axis=1), "other"),
    (L.Flatten(), "flatten"),
    (L.Concatenate(), "concatenate"),
    (L.Add(), "merge"),
    (L.Softmax(), "other"),
])
def test_layer_kind_reads_the_one_registry(layer, kind):
    assert layer_kind(layer) == kind


def _two_branches():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = L.MaxPooling2D(name="pool")(x)
    a = L.Flatten(name="flat")(x)
    a = L.Dense(3, name="fc")(a)
    b = L.Conv2D(3, 2, name="conv_b")(x)
    b = L.GlobalAveragePooling2D(name="gap")(b)
    return keras.Model(inputs, L.Add(name="add")([a, b]))


def test_channel_consumers_follow_channelwise_layers_to_every_consumer():
    uses = channel_consumers(_two_branches(), "conv")
    assert [str(use) for use in uses] == ["pool > conv_b (linear)", "pool > flat > fc (linear)"]
    assert uses[0] == ChannelUse("conv_b", "linear", ("pool",))


def test_channel_consumers_take_a_list_of_layers_like_every_layers_argument():
    model = _two_branches()
    uses = channel_consumers(model, ["conv", "fc"])
    assert list(uses) == ["conv", "fc"]
    assert uses["conv"] == channel_consumers(model, "conv")
    assert [str(use) for use in uses["fc"]] == ["add (merge)"]


def test_channel_consumers_report_channels_that_reach_the_output():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dropout(0.1, name="drop")(L.Dense(2, name="fc")(inputs)))
    assert [str(use) for use in channel_consumers(model, "fc")] == ["drop > <output> (output)"]


@pytest.mark.parametrize("layers, error, match", [
    ("nope", ValueError, "Unknown layer 'nope'"),
    (["conv", "conv"], ValueError, "twice"),
    ([], ValueError, "at least one layer"),
    (3, TypeError, "layer name or a list of names"),
])
def test_bad_layers_are_refused(layers, error, match):
    with pytest.raises(error, match=match):
        channel_consumers(_two_branches(), layers)

"""Channel statistics take the package's vocabulary: ``ranking_data`` and ``layers``
(one name or a list); the old ``data=`` and ``layer=`` keywords warn."""

import warnings

import numpy as np
import pytest

from tf_backdoor_defense import InputError, InputTypeError
from tf_backdoor_defense.scoring._activations import mean_channel_activations
from tf_backdoor_defense.scoring._distributed import distributed_channel_means


def test_a_list_of_layers_gives_each_layers_means(tiny_model, tiny_data):
    both = mean_channel_activations(tiny_model, tiny_data, ["conv_b", "conv_a"])
    assert list(both) == ["conv_b", "conv_a"]
    for name, values in both.items():
        np.testing.assert_array_equal(values, mean_channel_activations(tiny_model, tiny_data, name))
    assert both["conv_a"].shape == (4,) and both["conv_b"].shape == (6,)


def test_default_layer_is_the_last_conv(tiny_model, tiny_data):
    np.testing.assert_array_equal(mean_channel_activations(tiny_model, tiny_data),
                                  mean_channel_activations(tiny_model, tiny_data, "conv_b"))


def test_keywords_of_the_vocabulary(tiny_model, tiny_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = mean_channel_activations(tiny_model, ranking_data=tiny_data, layers="conv_a")
    np.testing.assert_array_equal(got, mean_channel_activations(tiny_model, tiny_data, "conv_a"))


@pytest.mark.parametrize("function", [mean_channel_activations, distributed_channel_means])
def test_old_keywords_warn_and_still_work(function, tiny_model, tiny_data):
    expected = mean_channel_activations(tiny_model, tiny_data, "conv_a")
    with pytest.warns(DeprecationWarning, match="'layer' parameter .* is now 'layers'"):
        got = function(tiny_model, tiny_data, layer="conv_a")
    np.testing.assert_array_equal(got, expected)
    with pytest.warns(DeprecationWarning, match="'data' parameter .* is now 'ranking_data'"):
        got = function(tiny_model, data=tiny_data, layers="conv_a")
    np.testing.assert_array_equal(got, expected)


def test_both_names_at_once_is_refused(tiny_model, tiny_data):
    with pytest.raises(InputTypeError, match="both 'layers' and its old name 'layer'"):
        mean_channel_activations(tiny_model, tiny_data, layers="conv_a", layer="conv_a")


@pytest.mark.parametrize("layers, error, message", [
    (3, InputTypeError, "'layers' parameter must be a layer name or a list"),
    ([], InputError, "'layers' parameter must name at least one layer"),
    (["conv_a", 1], InputTypeError, "'layers' parameter must hold layer names")])
def test_bad_layers_are_named(layers, error, message, tiny_model, tiny_data):
    with pytest.raises(error, match=message):
        mean_channel_activations(tiny_model, tiny_data, layers)


def test_missing_data_is_named(tiny_model):
    with pytest.raises(InputTypeError, match="needs 'ranking_data'"):
        mean_channel_activations(tiny_model, layers="conv_a")


def test_distributed_without_a_strategy_takes_a_list(tiny_model, tiny_data):
    got = distributed_channel_means(tiny_model, tiny_data, ["conv_a", "conv_b"])
    assert set(got) == {"conv_a", "conv_b"}
    np.testing.assert_array_equal(got["conv_b"],
                                  mean_channel_activations(tiny_model, tiny_data, "conv_b"))

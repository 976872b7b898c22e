"""Per-channel activation table and plot (tf_backdoor_defense.report._analysis)."""

import os

import numpy as np
import pandas as pd
import pytest

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.scoring._activations import mean_channel_activations
from tf_backdoor_defense.report._analysis import CATEGORIES, channel_activation_table, plot_channel_activations
from tf_backdoor_defense.pruning._ranking import rank_channels


def _four_kinds_model():
    """A 1x1 conv whose 4 channels are shared, dormant, backdoor-only and clean-only.

    Clean inputs light input channel 0, poisoned inputs light input channel 1.
    """
    inputs = keras.Input((3, 3, 2))
    conv = keras.layers.Conv2D(4, 1, activation="relu", name="conv")
    x = conv(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((1, 1, 2, 4), np.float32)
    kernel[0, 0, :, 0] = [1.0, 1.0]   # shared
    kernel[0, 0, :, 2] = [0.0, 2.0]   # backdoor-only
    kernel[0, 0, :, 3] = [0.5, 0.0]   # clean-only
    conv.set_weights([kernel, np.array([0.0, -1.0, 0.0, 0.0], np.float32)])
    return model


def _four_kinds_data(n=5):
    clean = np.zeros((n, 3, 3, 2), np.float32)
    clean[..., 0] = 1.0
    poisoned = np.zeros((n, 3, 3, 2), np.float32)
    poisoned[..., 1] = 1.0
    return (clean, np.zeros(n, int)), (poisoned, np.ones(n, int))


def test_table_finds_each_category_and_the_pruning_rank():
    clean, poisoned = _four_kinds_data()
    table = channel_activation_table(_four_kinds_model(), clean, poisoned, layers="conv")
    assert list(table.columns) == ["channel", "mean_clean", "mean_poisoned", "category", "rank"]
    assert table["category"].tolist() == ["shared", "dormant", "backdoor-only", "clean-only"]
    np.testing.assert_allclose(table["mean_clean"], [1.0, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(table["mean_poisoned"], [1.0, 0.0, 2.0, 0.0])
    # clean means [1, 0, 0, .5]: channel 1 then 2 (tie by index), then 3, then 0
    assert table["rank"].tolist() == [3, 0, 1, 2]
    assert table.attrs["layer"] == "conv"


def test_threshold_decides_what_counts_as_active():
    clean, poisoned = _four_kinds_data()
    # scale = 2.0; at 0.3 the limit is 0.6, so the clean-only channel (0.5) is dormant
    table = channel_activation_table(_four_kinds_model(), clean, poisoned, layers="conv",
                                     dormant_threshold=0.3)
    assert table.loc[3, "category"] == "dormant"
    assert table.loc[0, "category"] == "shared"
    assert table.attrs["dormant_threshold"] == 0.3


def test_all_zero_activations_are_all_dormant():
    model = _four_kinds_model()
    zeros = np.zeros((3, 3, 3, 2), np.float32)
    table = channel_activation_table(model, zeros, zeros, layers="conv")
    assert set(table["category"]) == {"dormant"}


def test_table_defaults_to_last_conv_and_matches_mean_activations(tiny_model, tiny_data):
    x, y = tiny_data
    table = channel_activation_table(tiny_model, (x, y), x[:10] + 1.0, batch_size=7)
    np.testing.assert_allclose(table["mean_clean"], mean_channel_activations(tiny_model, (x, y), "conv_b"))
    np.testing.assert_allclose(table["mean_poisoned"], mean_channel_activations(tiny_model, x[:10] + 1.0,
                                                                               "conv_b"))
    ranking = rank_channels(table["mean_clean"].to_numpy())
    assert table.set_index("rank").loc[np.arange(len(table)), "channel"].tolist() == ranking.tolist()
    assert table.attrs["layer"] == "conv_b"
    assert set(table["category"]) <= set(CATEGORIES)


def test_bad_threshold_and_layer_raise(tiny_model, tiny_data):
    with pytest.raises(ValueError, match="dormant_threshold"):
        channel_activation_table(tiny_model, tiny_data, tiny_data, dormant_threshold=1.0)
    with pytest.raises(ValueError, match="pool_a"):
        channel_activation_table(tiny_model, tiny_data, tiny_data, layers="pool_a")


def test_plot_writes_the_file_atomically(tmp_path):
    clean, poisoned = _four_kinds_data()
    table = channel_activation_table(_four_kinds_model(), clean, poisoned, layers="conv")
    path = tmp_path / "channels.png"
    figure = plot_channel_activations(table, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["channels.png"]
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "0"]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [0.0, 0.0, 0.5, 1.0, 0.0, 2.0, 0.0, 1.0])
    assert "1 backdoor-only" in ax.get_title()


def test_plot_error_leaves_no_partial_file(tmp_path):
    table = pd.DataFrame({"channel": [0], "mean_clean": [1.0], "mean_poisoned": [0.0],
                          "category": ["clean-only"], "rank": [0]})
    with pytest.raises(ValueError):
        plot_channel_activations(table, path=tmp_path / "figure.unknownformat")
    assert os.listdir(tmp_path) == []


def test_plot_into_given_axes_and_rejects_bad_tables():
    from matplotlib.figure import Figure

    figure = Figure()
    ax = figure.add_subplot(1, 1, 1)
    table = pd.DataFrame({"channel": [0, 1], "mean_clean": [1.0, 0.0], "mean_poisoned": [0.0, 3.0],
                          "category": ["clean-only", "backdoor-only"], "rank": [1, 0]})
    assert plot_channel_activations(table, ax=ax) is figure
    assert len(ax.patches) == 4
    with pytest.raises(ValueError, match="columns"):
        plot_channel_activations(table.drop(columns="rank"))
    with pytest.raises(TypeError, match="DataFrame"):
        plot_channel_activations([1, 2])

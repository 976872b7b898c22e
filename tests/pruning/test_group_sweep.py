"""Several layers pruned together: prune_to_threshold(layer=[...])."""

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense import prune_to_threshold, wrap_layers
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.pruning._group_sweep import GroupSweepResult
from tf_backdoor_defense.masks._wrapper import PruneByActivation

LAYERS = ["conv_b", "fc"]  # 6 and 8 channels, both ReLU


def _data(seed, n=60):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, n)


def _explicit(model, masks):
    """A copy with the pruned channels' kernels and biases zeroed (exact for ReLU layers)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for name, mask in masks.items():
        kernel, bias = copy.get_layer(name).get_weights()
        copy.get_layer(name).set_weights([kernel * mask, bias * mask])
    return copy


def test_every_level_matches_an_explicitly_pruned_model():
    model = tiny_conv_model()
    x, y = _data(1)
    xp, yp = _data(2, 40)[0], np.zeros(40, int)
    result = prune_to_threshold(model, (x, y), layer=LAYERS, poisoned_data=(xp, yp),
                                max_accuracy_drop=[0.05, 0.2])
    assert isinstance(result, GroupSweepResult) and result.steps == 8
    assert len(result.history) == 9
    for level, row in result.history.iterrows():
        masks = result.masks_at(level)
        assert row["pruned_conv_b"] == int(np.sum(masks["conv_b"] == 0)) == round(level / 8 * 6)
        assert row["pruned_fc"] == int(np.sum(masks["fc"] == 0)) == level
        explicit = _explicit(model, masks)
        assert row["clean_accuracy"] == pytest.approx(
            np.mean(np.argmax(explicit(x).numpy(), 1) == y))
        assert row["attack_success_rate"] == pytest.approx(
            np.mean(np.argmax(explicit(xp).numpy(), 1) == 0))
    assert result.history["accuracy_drop"].iloc[0] == 0.0


def _skip_model():
    """A skip connection from before the pruned layers to after them (a side input)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")(inputs)
    b = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="conv_b")(a)
    c = keras.layers.Conv2D(4, 1, activation="relu", name="conv_c")(b)
    merged = keras.layers.Concatenate()([a, c])
    x = keras.layers.Dense(6, activation="relu", name="fc")(keras.layers.Flatten()(merged))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


@pytest.mark.parametrize("factory, layers", [
    (tiny_conv_model, ["conv_a", "fc"]),  # the first pruned layer reads the input
    (_skip_model, ["conv_b", "fc"]),      # the suffix also reads conv_a's output
    (_skip_model, ["conv_c", "conv_b"]),  # listed out of graph order
])
def test_levels_are_exact_whatever_the_graph_around_the_layers(factory, layers):
    model = factory()
    x, y = _data(9)
    xp = _data(10, 30)[0]
    result = prune_to_threshold(model, (x, y), layer=layers, poisoned_data=(xp, np.zeros(30, int)),
                                steps=4)
    for level, row in result.history.iterrows():
        explicit = _explicit(model, result.masks_at(level))
        assert row["clean_accuracy"] == pytest.approx(
            np.mean(np.argmax(explicit(x).numpy(), 1) == y))
        assert row["attack_success_rate"] == pytest.approx(
            np.mean(np.argmax(explicit(xp).numpy(), 1) == 0))
    assert result.history["clean_accuracy"].nunique() > 1  # pruning changes something


def test_each_layer_keeps_its_single_layer_ranking():
    model = tiny_conv_model()
    data = _data(3)
    result = prune_to_threshold(model, data, layer=LAYERS)
    for name in LAYERS:
        alone = prune_to_threshold(model, data, layer=name)
        np.testing.assert_array_equal(result.rankings[name], alone.ranking)
        np.testing.assert_array_equal(result.mean_activations[name], alone.mean_activations)


def test_thresholds_give_masks_models_and_summary():
    model = tiny_conv_model()
    data = _data(4)
    result = prune_to_threshold(model, data, layer=LAYERS, max_accuracy_drop=[0.0, 1.0])
    assert result.levels[1.0] == result.steps  # any drop allowed: everything pruned
    drops = result.history["accuracy_drop"].to_numpy()
    assert drops[result.levels[0.0]] <= 1e-12
    for threshold, level in result.levels.items():
        pruned = result.models[threshold]
        for name in LAYERS:
            assert isinstance(pruned.get_layer(name), PruneByActivation)
            np.testing.assert_array_equal(pruned.get_layer(name).get_mask(),
                                          result.masks[threshold][name])
    summary = result.summary()
    assert summary["max_accuracy_drop"].tolist() == [0.0, 1.0]
    assert summary["channels_pruned"].iloc[1] == 14
    assert list(summary.columns[3:5]) == ["pruned_conv_b", "pruned_fc"]


def test_the_users_model_is_untouched_and_runs_are_deterministic():
    model = tiny_conv_model()
    before = [w.copy() for w in model.get_weights()]
    data = _data(5)
    a = prune_to_threshold(model, data, layer=LAYERS, steps=4)
    b = prune_to_threshold(model, data, layer=LAYERS, steps=4, batch_size=7)
    pd.testing.assert_frame_equal(a.history, b.history)
    assert all(np.array_equal(w, v) for w, v in zip(before, model.get_weights()))
    assert not any(isinstance(layer, PruneByActivation) for layer in model.layers)


def test_channels_pruned_before_stay_pruned_and_come_first():
    model = wrap_layers(tiny_conv_model(), "fc", masks={"fc": [1, 0, 1, 1, 1, 1, 0, 1]})
    result = prune_to_threshold(model, _data(6), layer=LAYERS, steps=4)
    assert set(result.rankings["fc"][:2].tolist()) == {1, 6}
    for level in range(5):
        mask = result.masks_at(level)["fc"]
        assert mask[1] == 0 and mask[6] == 0
    assert result.history["pruned_fc"].tolist() == [2, 2, 4, 6, 8]
    assert model.get_layer("fc").get_mask().tolist() == [1, 0, 1, 1, 1, 1, 0, 1]


def test_a_one_name_list_is_the_single_layer_sweep():
    model = tiny_conv_model()
    data = _data(7)
    listed = prune_to_threshold(model, data, layer=["conv_b"])
    plain = prune_to_threshold(model, data, layer="conv_b")
    pd.testing.assert_frame_equal(listed.history, plain.history)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"layer": []}, ValueError, "at least one"),
    ({"layer": ["fc", "fc"]}, ValueError, "twice"),
    ({"layer": ["fc", "nope"]}, ValueError, "nope"),
    ({"layer": ["fc", "flat"]}, ValueError, "cannot be pruned"),
    ({"layer": ["fc", 3]}, TypeError, "layer"),
    ({"layer": LAYERS, "ranking": [0, 1, 2, 3, 4, 5]}, ValueError, "one layer"),
    ({"layer": LAYERS, "steps": 0}, ValueError, "steps"),
    ({"layer": "fc", "steps": 4}, ValueError, "several layers"),
])
def test_bad_layer_lists_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        prune_to_threshold(tiny_conv_model(), _data(8), **kwargs)

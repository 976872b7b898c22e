import numpy as np
import pandas as pd
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense import wrap_layers
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.scoring._activations import mean_channel_activations
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy, predict_labels
from tf_backdoor_defense.pruning._ranking import level_mask, rank_channels
from tf_backdoor_defense.masks._wrapper import PruneByActivation
from tf_backdoor_defense.pruning._sweep import SweepResult, prune_to_threshold, select_level


def _data(n, shape, seed):
    return np.random.default_rng(seed).random((n,) + shape, dtype=np.float32)


def _labels_near(model, x, flip=0.2, classes=3, seed=0):
    """Labels the model mostly gets right, so accuracy changes as channels go."""
    y = predict_labels(model, x)
    rng = np.random.default_rng(seed)
    flip_index = rng.random(len(y)) < flip
    y[flip_index] = rng.integers(0, classes, flip_index.sum())
    return y


def _branched_model():
    """The lab BadNet's shape in miniature: pool -> [flatten -> fc] + [conv -> flatten -> fc]."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((10, 10, 2))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv_1")(inputs)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv_3")(x)
    x = keras.layers.MaxPooling2D(name="pool_3")(x)
    a = keras.layers.Dense(8, name="fc_1")(keras.layers.Flatten()(x))
    b = keras.layers.Conv2D(5, 2, activation="relu", name="conv_4")(x)
    b = keras.layers.Dense(8, name="fc_2")(keras.layers.Flatten()(b))
    x = keras.layers.Activation("relu")(keras.layers.Add()([a, b]))
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x)), (10, 10, 2), "conv_3"


def _residual_model():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6, 6, 3))
    skip = keras.layers.Conv2D(5, 1, name="skip")(inputs)
    x = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="res_conv")(skip)
    x = keras.layers.Add()([x, skip])
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)), (6, 6, 3), "res_conv"


def _dense_model():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(7, activation="relu", name="h"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(3, activation="softmax")])
    return model, (12,), "h"


def _separate_activation_model():
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((7, 7, 1)), keras.layers.Conv2D(5, 3, name="c"),
                              keras.layers.ReLU(), keras.layers.GlobalMaxPooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    return model, (7, 7, 1), "c"


def _batch_norm_model():
    """conv (linear) -> BatchNormalization -> ReLU, with non-trivial BN statistics."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((7, 7, 1)), keras.layers.Conv2D(6, 3, name="c"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.Dropout(0.2),
                              keras.layers.ReLU(name="relu"), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    rng = np.random.default_rng(7)
    gamma, beta = rng.uniform(0.5, 2.0, 6), rng.normal(0, 0.5, 6)
    mean, var = rng.normal(0, 0.3, 6), rng.uniform(0.2, 2.0, 6)
    model.get_layer("bn").set_weights([gamma, beta, mean, var])
    return model, (7, 7, 1), "c"


@pytest.mark.parametrize("factory", [lambda: (tiny_conv_model(), (8, 8, 1), "conv_b"),
                                     _branched_model, _residual_model, _dense_model,
                                     _separate_activation_model, _batch_norm_model])
def test_sweep_matches_explicitly_masked_models(factory):
    model, shape, layer = factory()
    x = _data(90, shape, 1)
    y = _labels_near(model, x, classes=model.output_shape[-1])
    xp = _data(40, shape, 2)
    yp = np.zeros(40, dtype=np.int64)
    result = prune_to_threshold(model, (x, y), layers=layer, poisoned_validation_data=(xp, yp),
                                max_accuracy_drop=0.05, batch_size=32)
    channels = result.rankings[layer].size
    for level in range(channels + 1):
        pruned = wrap_layers(model, layer, masks={layer: level_mask(result.rankings[layer], level)})
        assert result.history["clean_accuracy"][level] == clean_accuracy(pruned, (x, y))
        assert result.history["attack_success_rate"][level] == attack_success_rate(pruned, (xp, yp))


def test_history_columns_and_monotone_fraction(tiny_model, tiny_data):
    result = prune_to_threshold(tiny_model, tiny_data)
    assert list(result.history.columns) == ["channels_pruned", "fraction_pruned", "pruned_conv_b",
                                            "clean_accuracy", "accuracy_drop",
                                            "attack_success_rate", "utility"]
    assert result.history["channels_pruned"].tolist() == list(range(7))
    assert np.all(np.diff(result.history["fraction_pruned"]) > 0)
    assert result.history["fraction_pruned"].iloc[-1] == 1.0
    assert result.history["attack_success_rate"].isna().all()
    # level k prunes exactly the k-th channel of the ranking on top of level k - 1
    for level in range(1, 7):
        changed = result.masks_at(level - 1)["conv_b"] != result.masks_at(level)["conv_b"]
        assert np.flatnonzero(changed).tolist() == [result.rankings["conv_b"][level - 1]]


def test_ranking_is_increasing_mean_activation_with_index_ties(tiny_model, tiny_data):
    means = mean_channel_activations(tiny_model, tiny_data, layers="conv_b")
    result = prune_to_threshold(tiny_model, tiny_data, layers="conv_b")
    np.testing.assert_array_equal(result.mean_activations["conv_b"], means)
    ranking = result.rankings["conv_b"]
    ordered = means[ranking]
    assert np.all(np.diff(ordered) >= 0)
    for a, b in zip(ranking[:-1], ranking[1:]):
        if means[a] == means[b]:
            assert a < b
    assert rank_channels([0.0, 0.0, -1.0, 0.0]).tolist() == [2, 0, 1, 3]


def test_mean_activations_equal_numpy_reference(tiny_model, tiny_data):
    x = tiny_data[0]
    features = keras.Model(tiny_model.input, tiny_model.get_layer("conv_b").output)(x).numpy()
    expected = features.reshape(-1, features.shape[-1]).astype(np.float64).mean(axis=0)
    got = mean_channel_activations(tiny_model, tiny_data, layers="conv_b", batch_size=7)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    dataset = tf.data.Dataset.from_tensor_slices(tiny_data).batch(9)
    np.testing.assert_allclose(mean_channel_activations(tiny_model, dataset, layers="conv_b"),
                               expected, rtol=1e-6)


def test_mean_activations_follow_batch_norm_to_the_activation():
    model, shape, layer = _batch_norm_model()
    x = _data(50, shape, 3)
    after_relu = keras.Model(model.input, model.get_layer("relu").output)(x).numpy()
    expected = after_relu.reshape(-1, 6).astype(np.float64).mean(axis=0)
    got = mean_channel_activations(model, (x, np.zeros(50, int)), layers=layer)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    conv_out = keras.Model(model.input, model.get_layer(layer).output)(x).numpy()
    assert not np.allclose(got, conv_out.reshape(-1, 6).mean(axis=0), atol=1e-3)


def test_same_inputs_give_same_table(tiny_model, tiny_data):
    a = prune_to_threshold(tiny_model, tiny_data, max_accuracy_drop=[0.02, 0.1])
    b = prune_to_threshold(tiny_model, tiny_data, max_accuracy_drop=[0.02, 0.1], batch_size=13)
    pd.testing.assert_frame_equal(a.history, b.history)
    np.testing.assert_array_equal(a.rankings["conv_b"], b.rankings["conv_b"])


def test_dataset_input_gives_same_history_as_arrays(tiny_model, tiny_data):
    arrays = prune_to_threshold(tiny_model, tiny_data)
    dataset = tf.data.Dataset.from_tensor_slices(tiny_data).batch(11)
    streamed = prune_to_threshold(tiny_model, dataset)
    pd.testing.assert_frame_equal(arrays.history, streamed.history)


@pytest.mark.parametrize("rule, threshold, expected", [
    ("largest_within", 0.02, 3), ("largest_within", 0.0, 1), ("largest_within", 0.2, 4),
    ("first_reaching", 0.02, 2), ("first_reaching", 0.1, 4), ("first_reaching", 0.9, 5),
])
def test_stopping_rules_pick_the_documented_level(rule, threshold, expected):
    accuracy = [0.90, 0.90, 0.88, 0.89, 0.80, 0.10]
    assert select_level(accuracy, threshold, rule) == expected


def test_thresholds_give_models_at_the_chosen_levels(tiny_model, tiny_data):
    result = prune_to_threshold(tiny_model, tiny_data, max_accuracy_drop=[0.02, 0.04, 0.10])
    assert set(result.models) == {0.02, 0.04, 0.10}
    acc = result.history["clean_accuracy"].to_numpy()
    for threshold, level in result.levels.items():
        assert level == select_level(acc, threshold)
        mask = result.models[threshold].get_layer("conv_b").get_mask()
        assert int((mask == 0).sum()) == level
        assert clean_accuracy(result.models[threshold], tiny_data) == acc[level]
    with pytest.raises(AttributeError, match="Several thresholds"):
        result.model
    assert prune_to_threshold(tiny_model, tiny_data, max_accuracy_drop=0.5).model is not None


def test_does_not_mutate_the_model(tiny_model, tiny_data):
    before = [w.copy() for w in tiny_model.get_weights()]
    names = [type(layer).__name__ for layer in tiny_model.layers]
    prune_to_threshold(tiny_model, tiny_data, max_accuracy_drop=1.0)
    assert [type(layer).__name__ for layer in tiny_model.layers] == names
    for a, b in zip(before, tiny_model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_already_pruned_channels_stay_pruned(tiny_model, tiny_data):
    wrapped = wrap_layers(tiny_model, "conv_b", masks={"conv_b": [1, 1, 1, 1, 1, 0]})
    result = prune_to_threshold(wrapped, tiny_data, max_accuracy_drop=0.0)
    level = result.levels[0.0]
    assert result.models[0.0].get_layer("conv_b").get_mask()[5] == 0
    assert result.masks_at(0)["conv_b"][5] == 0 and level >= 0


@pytest.mark.parametrize("kwargs, error, message", [
    ({"layers": "missing"}, ValueError, "Unknown layer"),
    ({"layers": "flat"}, ValueError, "cannot be pruned"),
    ({"max_accuracy_drop": 1.5}, ValueError, "max_accuracy_drop"),
    ({"max_accuracy_drop": []}, ValueError, "empty"),
    ({"stopping_rule": "sometimes"}, ValueError, "largest_within"),
    ({"target": 0}, ValueError, "needs `poisoned_validation_data`"),
    ({"ranking": [0, 0, 1, 2, 3, 4]}, ValueError, "permutation"),
    ({"batch_size": 0}, ValueError, "batch_size"),
])
def test_bad_arguments_get_clear_errors(tiny_model, tiny_data, kwargs, error, message):
    with pytest.raises(error, match=message):
        prune_to_threshold(tiny_model, tiny_data, **kwargs)


@pytest.mark.parametrize("data, message", [
    ((np.zeros((0, 8, 8, 1)), np.zeros(0)), "empty"),
    ((np.zeros((4, 8, 8, 2)), np.zeros(4)), "shape"),
    ((np.zeros((4, 8, 8, 1)), np.zeros(3)), "same length"),
    ((np.zeros((4, 8, 8, 1)), np.array([0, 1, 2, 3])), "label 3 out of range"),
    ((np.full((4, 8, 8, 1), np.nan), np.zeros(4)), "NaN"),
])
def test_bad_data_gets_clear_errors(tiny_model, data, message):
    with pytest.raises(ValueError, match=message):
        prune_to_threshold(tiny_model, data)


def test_all_to_one_target_skips_inputs_of_the_target_class(tiny_model):
    x = _data(60, (8, 8, 1), 3)
    true = np.arange(60) % 3
    pred = predict_labels(tiny_model, x)
    attacked = true != 1
    expected = np.mean(pred[attacked] == 1)
    result = prune_to_threshold(tiny_model, (x, true), poisoned_validation_data=(x, true),
                                target=1)
    assert result.history["attack_success_rate"][0] == pytest.approx(expected)
    untargeted = prune_to_threshold(tiny_model, (x, true), poisoned_validation_data=(x, true),
                                    target="untargeted")
    assert untargeted.history["attack_success_rate"][0] == pytest.approx(np.mean(pred != true))


def test_penultimate_dense_layer_sweep_matches_explicitly_masked_models():
    from tf_backdoor_defense.experiments._models import mnist_cnn

    model = mnist_cnn(conv_channels=(4, 8), dense_units=16, seed=3)
    x = np.random.default_rng(3).random((48, 28, 28, 1), dtype=np.float32)
    y = np.argmax(model.predict(x, verbose=0), axis=1)
    result = prune_to_threshold(model, (x, y), layers="fc", max_accuracy_drop=0.1)
    assert result.layers == ("fc",) and len(result.history) == 17
    for level in (0, 5, 11, 16):
        masked = wrap_layers(model, "fc", {"fc": level_mask(result.rankings["fc"], level)})
        assert result.history["clean_accuracy"].iloc[level] == pytest.approx(
            clean_accuracy(masked, (x, y)), abs=1e-12)


# -- several layers pruned together ---------------------------------------------------------
LAYERS = ["conv_b", "fc"]  # 6 and 8 channels, both ReLU


def _group_data(seed, n=60):
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
    x, y = _group_data(1)
    xp, yp = _group_data(2, 40)[0], np.zeros(40, int)
    result = prune_to_threshold(model, (x, y), layers=LAYERS, poisoned_validation_data=(xp, yp),
                                max_accuracy_drop=[0.05, 0.2])
    assert isinstance(result, SweepResult) and result.steps == 8
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
    x, y = _group_data(9)
    xp = _group_data(10, 30)[0]
    result = prune_to_threshold(model, (x, y), layers=layers, poisoned_validation_data=(xp, np.zeros(30, int)),
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
    data = _group_data(3)
    result = prune_to_threshold(model, data, layers=LAYERS)
    for name in LAYERS:
        alone = prune_to_threshold(model, data, layers=name)
        np.testing.assert_array_equal(result.rankings[name], alone.rankings[name])
        np.testing.assert_array_equal(result.mean_activations[name], alone.mean_activations[name])


def test_thresholds_give_masks_models_and_summary():
    model = tiny_conv_model()
    data = _group_data(4)
    result = prune_to_threshold(model, data, layers=LAYERS, max_accuracy_drop=[0.0, 1.0])
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
    data = _group_data(5)
    a = prune_to_threshold(model, data, layers=LAYERS, steps=4)
    b = prune_to_threshold(model, data, layers=LAYERS, steps=4, batch_size=7)
    pd.testing.assert_frame_equal(a.history, b.history)
    assert all(np.array_equal(w, v) for w, v in zip(before, model.get_weights()))
    assert not any(isinstance(layer, PruneByActivation) for layer in model.layers)


def test_channels_pruned_before_stay_pruned_and_come_first():
    model = wrap_layers(tiny_conv_model(), "fc", masks={"fc": [1, 0, 1, 1, 1, 1, 0, 1]})
    result = prune_to_threshold(model, _group_data(6), layers=LAYERS, steps=4)
    assert set(result.rankings["fc"][:2].tolist()) == {1, 6}
    for level in range(5):
        mask = result.masks_at(level)["fc"]
        assert mask[1] == 0 and mask[6] == 0
    assert result.history["pruned_fc"].tolist() == [2, 2, 4, 6, 8]
    assert model.get_layer("fc").get_mask().tolist() == [1, 0, 1, 1, 1, 1, 0, 1]


def test_a_one_name_list_is_the_single_layer_sweep():
    model = tiny_conv_model()
    data = _group_data(7)
    listed = prune_to_threshold(model, data, layers=["conv_b"])
    plain = prune_to_threshold(model, data, layers="conv_b")
    pd.testing.assert_frame_equal(listed.history, plain.history)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"layers": []}, ValueError, "at least one"),
    ({"layers": ["fc", "fc"]}, ValueError, "twice"),
    ({"layers": ["fc", "nope"]}, ValueError, "nope"),
    ({"layers": ["fc", "flat"]}, ValueError, "cannot be pruned"),
    ({"layers": ["fc", 3]}, TypeError, "layer"),
    ({"layers": LAYERS, "ranking": [0, 1, 2, 3, 4, 5]}, ValueError, "one layer"),
    ({"layers": LAYERS, "steps": 0}, ValueError, "steps"),
    ({"layers": "fc", "steps": 4}, ValueError, "several layers"),
])
def test_bad_layer_lists_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        prune_to_threshold(tiny_conv_model(), _group_data(8), **kwargs)


# -- one result type, one engine ----------------------------------------------------------------
@pytest.mark.parametrize("layers", [["conv_b"], ["conv_b", "fc"]])
def test_channels_pruned_counts_channels_that_arrived_pruned(layers):
    """Regression: a wrapped layer with a channel already at 0 reported 0 pruned at level 0."""
    model = wrap_layers(tiny_conv_model(), layers, masks={"conv_b": [1, 1, 1, 1, 1, 0]})
    result = prune_to_threshold(model, _group_data(11), layers=layers)
    first = result.history.iloc[0]
    assert first["channels_pruned"] >= 1 and first["pruned_conv_b"] == 1
    for level in range(result.steps + 1):
        masks = result.masks_at(level)
        zeros = sum(int(np.sum(mask == 0)) for mask in masks.values())
        assert result.history["channels_pruned"].iloc[level] == zeros
        assert masks["conv_b"][5] == 0
    assert result.history["channels_pruned"].iloc[-1] == sum(result.channels.values())


def test_one_layer_fast_path_equals_the_masked_copy_engine():
    """The incremental one-layer path and the several-layer engine give the same numbers."""
    from tf_backdoor_defense.pruning import _sweep

    model = wrap_layers(tiny_conv_model(), "conv_b", masks={"conv_b": [1, 0, 1, 1, 1, 1]})
    x, y = _group_data(12)
    xp = _group_data(13, 30)[0]
    result = prune_to_threshold(model, (x, y), layers="conv_b",
                                poisoned_validation_data=(xp, np.zeros(30, int)))
    level_masks = [result.masks_at(level) for level in range(result.steps + 1)]
    slow = _sweep._MaskedLevels(model, ["conv_b"], result._base_masks, level_masks)
    fast = _sweep._OneLayerLevels(model, model.get_layer("conv_b"), result.rankings["conv_b"],
                                  level_masks, 256)
    np.testing.assert_array_equal(fast(x), slow(x))
    np.testing.assert_array_equal(fast(xp), slow(xp))
    assert fast(x).shape == (7, 60)


def test_the_result_is_frozen_and_keyed_by_layer_for_one_layer_too(tiny_model, tiny_data):
    import dataclasses

    result = prune_to_threshold(tiny_model, tiny_data, max_accuracy_drop=[0.02, 0.5])
    assert isinstance(result, SweepResult) and dataclasses.is_dataclass(result)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.levels = {}
    assert result.layers == ("conv_b",) and result.channels == {"conv_b": 6}
    assert result.steps == 6 and set(result.rankings) == {"conv_b"}
    assert set(result.masks[0.5]) == {"conv_b"}
    assert "layers=('conv_b',)" in repr(result)
    assert list(result.summary().columns) == ["max_accuracy_drop", "channels_pruned",
                                              "fraction_pruned", "pruned_conv_b",
                                              "clean_accuracy", "attack_success_rate"]
    with pytest.raises(ValueError, match="level"):
        result.masks_at(7)


def test_a_precomputed_ranking_per_layer_is_used_as_given():
    model = tiny_conv_model()
    orders = {"conv_b": [5, 4, 3, 2, 1, 0], "fc": list(range(8))}
    result = prune_to_threshold(model, _group_data(14), layers=LAYERS, ranking=orders, steps=2)
    assert result.rankings["conv_b"].tolist() == orders["conv_b"]
    assert result.masks_at(1)["conv_b"].tolist() == [1, 1, 1, 0, 0, 0]
    assert np.isnan(result.mean_activations["fc"]).all()
    with pytest.raises(ValueError, match="one permutation for each"):
        prune_to_threshold(model, _group_data(14), layers=LAYERS, ranking={"fc": orders["fc"]})


def test_old_keyword_names_still_work_with_a_deprecation_warning(tiny_model, tiny_data):
    x, y = tiny_data
    with pytest.warns(DeprecationWarning, match="'layer' parameter of prune_to_threshold"):
        old = prune_to_threshold(tiny_model, (x, y), layer="conv_b")
    with pytest.warns(DeprecationWarning, match="poisoned_validation_data"):
        poisoned = prune_to_threshold(tiny_model, (x, y), poisoned_data=(x, y))
    new = prune_to_threshold(tiny_model, (x, y), layers="conv_b")
    pd.testing.assert_frame_equal(old.history, new.history)
    assert poisoned.history["attack_success_rate"].notna().all()
    with pytest.raises(TypeError, match="both 'layers' and its old name 'layer'"):
        prune_to_threshold(tiny_model, (x, y), layer="conv_b", layers="conv_b")


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 4}, "several layers"),
    ({"ranking": [0, 1, 2, 3, 4, 4]}, "permutation"),
    ({"stopping_rule": "never"}, "stopping_rule"),
])
def test_bad_values_are_input_errors(tiny_model, tiny_data, kwargs, match):
    """The command line exits 2 (bad input) for these, not 1 (a bug)."""
    from tf_backdoor_defense._errors import InputError

    with pytest.raises(InputError, match=match):
        prune_to_threshold(tiny_model, tiny_data, **kwargs)

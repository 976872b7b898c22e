import numpy as np
import pandas as pd
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense import wrap_layers
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.scoring._activations import mean_channel_activations
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy, predict_labels
from tf_backdoor_defense.pruning._ranking import level_mask, rank_channels
from tf_backdoor_defense.pruning._sweep import prune_to_threshold, select_level


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
    result = prune_to_threshold(model, (x, y), layer=layer, poisoned_data=(xp, yp),
                                max_accuracy_drop=0.05, batch_size=32)
    channels = result.ranking.size
    for level in range(channels + 1):
        pruned = wrap_layers(model, layer, masks={layer: level_mask(result.ranking, level)})
        assert result.history["clean_accuracy"][level] == clean_accuracy(pruned, (x, y))
        assert result.history["attack_success_rate"][level] == attack_success_rate(pruned, (xp, yp))


def test_history_columns_and_monotone_fraction(tiny_model, tiny_data):
    result = prune_to_threshold(tiny_model, tiny_data)
    assert list(result.history.columns) == ["channels_pruned", "fraction_pruned", "pruned_channel",
                                            "clean_accuracy", "accuracy_drop",
                                            "attack_success_rate", "utility"]
    assert result.history["channels_pruned"].tolist() == list(range(7))
    assert np.all(np.diff(result.history["fraction_pruned"]) > 0)
    assert result.history["fraction_pruned"].iloc[-1] == 1.0
    assert result.history["attack_success_rate"].isna().all()
    assert result.history["pruned_channel"].tolist() == [-1] + result.ranking.tolist()


def test_ranking_is_increasing_mean_activation_with_index_ties(tiny_model, tiny_data):
    means = mean_channel_activations(tiny_model, tiny_data, layer="conv_b")
    result = prune_to_threshold(tiny_model, tiny_data, layer="conv_b")
    np.testing.assert_array_equal(result.mean_activations, means)
    ordered = means[result.ranking]
    assert np.all(np.diff(ordered) >= 0)
    for a, b in zip(result.ranking[:-1], result.ranking[1:]):
        if means[a] == means[b]:
            assert a < b
    assert rank_channels([0.0, 0.0, -1.0, 0.0]).tolist() == [2, 0, 1, 3]


def test_mean_activations_equal_numpy_reference(tiny_model, tiny_data):
    x = tiny_data[0]
    features = keras.Model(tiny_model.input, tiny_model.get_layer("conv_b").output)(x).numpy()
    expected = features.reshape(-1, features.shape[-1]).astype(np.float64).mean(axis=0)
    got = mean_channel_activations(tiny_model, tiny_data, layer="conv_b", batch_size=7)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    dataset = tf.data.Dataset.from_tensor_slices(tiny_data).batch(9)
    np.testing.assert_allclose(mean_channel_activations(tiny_model, dataset, layer="conv_b"),
                               expected, rtol=1e-6)


def test_mean_activations_follow_batch_norm_to_the_activation():
    model, shape, layer = _batch_norm_model()
    x = _data(50, shape, 3)
    after_relu = keras.Model(model.input, model.get_layer("relu").output)(x).numpy()
    expected = after_relu.reshape(-1, 6).astype(np.float64).mean(axis=0)
    got = mean_channel_activations(model, (x, np.zeros(50, int)), layer=layer)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    conv_out = keras.Model(model.input, model.get_layer(layer).output)(x).numpy()
    assert not np.allclose(got, conv_out.reshape(-1, 6).mean(axis=0), atol=1e-3)


def test_same_inputs_give_same_table(tiny_model, tiny_data):
    a = prune_to_threshold(tiny_model, tiny_data, max_accuracy_drop=[0.02, 0.1])
    b = prune_to_threshold(tiny_model, tiny_data, max_accuracy_drop=[0.02, 0.1], batch_size=13)
    pd.testing.assert_frame_equal(a.history, b.history)
    np.testing.assert_array_equal(a.ranking, b.ranking)


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
    assert result.mask_at(0)[5] == 0 and level >= 0


@pytest.mark.parametrize("kwargs, error, message", [
    ({"layer": "missing"}, ValueError, "Unknown layer"),
    ({"layer": "flat"}, ValueError, "cannot be pruned"),
    ({"max_accuracy_drop": 1.5}, ValueError, "max_accuracy_drop"),
    ({"max_accuracy_drop": []}, ValueError, "empty"),
    ({"stopping_rule": "sometimes"}, ValueError, "largest_within"),
    ({"target": 0}, ValueError, "needs `poisoned_data`"),
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
    result = prune_to_threshold(tiny_model, (x, true), poisoned_data=(x, true), target=1)
    assert result.history["attack_success_rate"][0] == pytest.approx(expected)
    untargeted = prune_to_threshold(tiny_model, (x, true), poisoned_data=(x, true),
                                    target="untargeted")
    assert untargeted.history["attack_success_rate"][0] == pytest.approx(np.mean(pred != true))


def test_penultimate_dense_layer_sweep_matches_explicitly_masked_models():
    from tf_backdoor_defense.experiments._models import mnist_cnn

    model = mnist_cnn(conv_channels=(4, 8), dense_units=16, seed=3)
    x = np.random.default_rng(3).random((48, 28, 28, 1), dtype=np.float32)
    y = np.argmax(model.predict(x, verbose=0), axis=1)
    result = prune_to_threshold(model, (x, y), layer="fc", max_accuracy_drop=0.1)
    assert result.layer == "fc" and len(result.history) == 17
    for level in (0, 5, 11, 16):
        masked = wrap_layers(model, "fc", {"fc": level_mask(result.ranking, level)})
        assert result.history["clean_accuracy"].iloc[level] == pytest.approx(
            clean_accuracy(masked, (x, y)), abs=1e-12)

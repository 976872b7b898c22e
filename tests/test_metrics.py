"""The metrics' compiled forward passes, and that no cache keeps a model alive."""

import gc
import weakref

import numpy as np
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import tf
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy, predict_labels
from tf_backdoor_defense.scoring import _distributed
from tf_backdoor_defense.scoring._activations import mean_channel_activations
from tf_backdoor_defense.scoring._distributed import distributed_channel_means


def test_cached_forward_pass_follows_weight_changes(tiny_data):
    model = tiny_conv_model()
    x, _ = tiny_data
    before = predict_labels(model, x)
    np.testing.assert_array_equal(before, np.argmax(model.predict(x, verbose=0), axis=1))
    model.get_layer("out").set_weights([np.zeros((8, 3), np.float32),
                                        np.array([0.0, 0.0, 5.0], np.float32)])
    np.testing.assert_array_equal(predict_labels(model, x), np.full(len(x), 2))


def test_no_poisoned_input_attacked_is_an_input_error(tiny_data):
    model = tiny_conv_model()
    x, _ = tiny_data
    with pytest.raises(InputError, match="No poisoned input is attacked"):
        attack_success_rate(model, (x, np.ones(len(x), int)), target=1)


def test_models_die_after_every_cached_path(tiny_data, monkeypatch):
    """Regression: caches of compiled functions closed over their keys, so models never died."""
    x, y = tiny_data
    # the single-replica default strategy, taken through the distributed code path
    monkeypatch.setattr(_distributed, "is_distributed", lambda strategy: True)
    strategy = tf.distribute.get_strategy()
    refs = []
    for seed in range(3):
        model = tiny_conv_model(seed=seed)
        predict_labels(model, x)
        clean_accuracy(model, (x, y))
        attack_success_rate(model, (x, y))
        means = mean_channel_activations(model, x, "conv_b")
        distributed = distributed_channel_means(model, (x, y), "conv_b", strategy=strategy)
        np.testing.assert_allclose(distributed, means, rtol=1e-12)  # the cached paths ran
        refs.append(weakref.ref(model))
        del model
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True, True]


def _logit_binary_model(activation=None):
    """A conv net with one output unit: a logit (``activation=None``) or a sigmoid's output."""
    from tf_backdoor_defense._keras import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 1))
    hidden = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    flat = keras.layers.Flatten()(hidden)
    return keras.Model(inputs, keras.layers.Dense(1, activation=activation, name="out")(flat))


@pytest.mark.parametrize("activation", [None, "sigmoid"], ids=["logit", "sigmoid"])
def test_one_unit_outputs_are_read_as_keras_reads_them(activation):
    """A logit means class 1 above 0, a sigmoid's probability above 0.5: everywhere a label is
    read (the metrics, the sweep's every level, the scan's counts)."""
    from tf_backdoor_defense import prune_to_threshold
    from tf_backdoor_defense.masks import wrap_layers
    from tf_backdoor_defense.scan._scan import _Counter

    model = _logit_binary_model(activation)
    x = np.random.default_rng(1).random((96, 6, 6, 1), dtype=np.float32)
    out = model.predict(x, verbose=0)[:, 0]
    logits = np.log(out / (1 - out)) if activation else out
    bias = model.get_layer("out").bias
    bias.assign(bias - np.median(logits) + 0.02)  # half the inputs on each side
    out = model.predict(x, verbose=0)[:, 0]
    threshold = 0.5 if activation else 0.0
    y = (out > threshold).astype(np.int64)
    assert 30 < y.sum() < 66
    if not activation:  # the probability rule would misread some logits
        assert np.any((out > 0.5) != y)
    y[:8] = 1 - y[:8]  # 8 of 96 wrong
    assert clean_accuracy(model, (x, y)) == pytest.approx(88 / 96)
    np.testing.assert_array_equal(predict_labels(model, x) == y, np.arange(96) >= 8)
    counts = _Counter(model, tf.distribute.get_strategy(), 2).counts(x, y)
    np.testing.assert_array_equal(counts, np.bincount((out > threshold).astype(int), minlength=2))
    result = prune_to_threshold(model, (x, y), layers="conv", max_accuracy_drop=0.2)
    assert result.baseline_accuracy == pytest.approx(88 / 96)
    for level in (1, 3, 5):
        mask = np.ones(6, np.float32)
        mask[result.rankings["conv"][:level]] = 0
        masked = wrap_layers(model, "conv", masks={"conv": mask})
        assert result.history.loc[level, "clean_accuracy"] == pytest.approx(
            clean_accuracy(masked, (x, y)))


def test_predict_labels_names_inputs_it_cannot_read(tiny_data):
    from tf_backdoor_defense._errors import InputTypeError

    model = tiny_conv_model()
    x, y = tiny_data
    with pytest.raises(InputError, match=r"shape \(3, 3, 1\), but the model expects"):
        predict_labels(model, np.zeros((2, 3, 3, 1), np.float32))
    with pytest.raises(InputTypeError, match="must be an array of inputs; got"):
        predict_labels(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(4))


@pytest.mark.parametrize("activation", [None, "sigmoid"], ids=["logit", "sigmoid"])
def test_keras3_one_unit_outputs_are_read_by_their_threshold(activation):
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    from tf_backdoor_defense.metrics import label_threshold

    keras3.utils.set_random_seed(0)
    inputs = keras3.Input((4,))
    model = keras3.Model(inputs, keras3.layers.Dense(1, activation=activation)(
        keras3.layers.Dense(3)(inputs)))
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    threshold = 0.5 if activation else 0.0
    assert label_threshold(model) == threshold
    y = (model.predict(x, verbose=0)[:, 0] > threshold).astype(int)
    assert clean_accuracy(model, (x, y)) == 1.0

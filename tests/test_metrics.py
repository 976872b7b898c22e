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

"""The top-level (tf-keras) FinePruning in a Keras 3 ``model.fit`` works as the Keras 3 one."""

import numpy as np
import pytest

from tf_backdoor_defense import GradualChannelSchedule, wrap_layers
from tf_backdoor_defense.finetune._callbacks import FinePruning


def _fit(keras3, callback_class, **options):
    keras3.utils.set_random_seed(0)
    model = wrap_layers(keras3.Sequential([
        keras3.Input((6, 6, 1)), keras3.layers.Conv2D(8, 3, activation="relu", name="conv"),
        keras3.layers.Flatten(), keras3.layers.Dense(3, activation="softmax")]), "conv")
    model.compile("sgd", "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((64, 6, 6, 1), dtype=np.float32)
    y = np.argmax(model.predict(x, verbose=0), axis=1)
    callback = callback_class((x, y), max_accuracy_drop=0.1, **options)
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    return model, callback, history.history


@pytest.mark.parametrize("gradual", [False, True], ids=["one-shot", "gradual"])
def test_the_tf_keras_callback_serves_a_keras3_fit_as_the_keras3_one(gradual):
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    from tf_backdoor_defense.keras3 import FinePruning as Keras3FinePruning

    options = {"schedule": GradualChannelSchedule(0.5, every_n_steps=1)} if gradual else {}
    model, callback, history = _fit(keras3, FinePruning, **options)
    twin, twin_callback, twin_history = _fit(keras3, Keras3FinePruning, **options)
    assert history == twin_history
    assert history["fine_pruning/channels_pruned"][-1] >= 1
    assert callback.channels_pruned_ == twin_callback.channels_pruned_ >= 1
    assert callback.baseline_accuracy_ == twin_callback.baseline_accuracy_
    np.testing.assert_array_equal(np.asarray(model.get_layer("conv").mask),
                                  np.asarray(twin.get_layer("conv").mask))
    if not gradual:
        assert callback.sweep_result_ is not None
        assert type(callback.sweep_result_.model).__module__.startswith("keras")


def test_a_callback_that_served_a_keras3_fit_serves_a_tf_keras_fit_after_it():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    from tf_backdoor_defense._keras import keras

    _, callback, _ = _fit(keras3, FinePruning)
    model = wrap_layers(keras.Sequential([
        keras.Input((6, 6, 1)), keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
        keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")]), "conv")
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = callback.validation_data
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert callback._keras3 is None
    assert callback.channels_pruned_ == int(np.sum(np.asarray(model.get_layer("conv").mask) == 0))
    assert type(callback.sweep_result_.model).__module__.startswith("tf_keras")


def test_the_keras3_callback_in_a_tf_keras_fit_names_the_one_that_serves_both():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    from tf_backdoor_defense import InputTypeError
    from tf_backdoor_defense._keras import keras
    from tf_backdoor_defense.keras3 import FinePruning as Keras3FinePruning

    model = wrap_layers(keras.Sequential([
        keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, name="conv"), keras.layers.Flatten(),
        keras.layers.Dense(2, activation="softmax")]), "conv")
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = np.zeros((8, 6, 6, 1), np.float32), np.zeros(8, int)
    with pytest.raises(InputTypeError, match="use tf_backdoor_defense.FinePruning"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[Keras3FinePruning((x, y))])

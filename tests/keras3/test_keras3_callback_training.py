"""A gradual ``FinePruning`` in tf-keras and Keras 3 fits: the kept channels train as without
the callback, every training step counts (``steps_per_execution``), and the attributes read
the model as it is after ``EarlyStopping`` restored its weights."""

import numpy as np
import pytest

from tf_backdoor_defense import FinePruning, GradualChannelSchedule, get_mask, wrap_layers
from tf_backdoor_defense._keras import keras as tf_keras


def _kerases():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    return {"tf-keras": tf_keras, "keras3": keras3}


@pytest.fixture(params=["tf-keras", "keras3"])
def keras(request):
    return _kerases()[request.param]


def _data():
    x = np.random.default_rng(0).random((128, 8, 8, 1), dtype=np.float32)
    return x, (x.mean(axis=(1, 2, 3)) > 0.5).astype("int64")


def _model(keras, channels=8, steps_per_execution=1):
    keras.utils.set_random_seed(0)
    model = wrap_layers(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(channels, 3, activation="relu", name="conv"),
        keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax", name="fc")]), "conv")
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                  steps_per_execution=steps_per_execution)
    return model


def _kept_kernel(model):
    kernel = np.asarray(model.get_layer("conv").layer.kernel)
    return kernel[..., get_mask(model, "conv") == 1]


def test_the_kept_channels_train_between_pruning_steps(keras):
    x, y = _data()
    plain = _model(keras)
    start = _kept_kernel(plain).copy()
    plain.fit(x, y, epochs=1, batch_size=16, verbose=0)
    never = _model(keras)  # a schedule whose first pruning step is never reached
    never.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[FinePruning(
        (x, y), max_accuracy_drop=None, schedule=GradualChannelSchedule(0.5, 1, 1000))])
    assert np.abs(_kept_kernel(plain) - start).max() > 1e-3
    np.testing.assert_allclose(_kept_kernel(never), _kept_kernel(plain), atol=1e-6)
    tf_run = _model(tf_keras)  # pruning every 3 steps: the kept channels as in tf-keras
    tf_run.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[FinePruning(
        (x, y), max_accuracy_drop=None, schedule=GradualChannelSchedule(0.5, 1, 3))])
    run = _model(keras)
    run.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[FinePruning(
        (x, y), max_accuracy_drop=None, schedule=GradualChannelSchedule(0.5, 1, 3))])
    np.testing.assert_array_equal(get_mask(run, "conv"), get_mask(tf_run, "conv"))
    np.testing.assert_allclose(_kept_kernel(run), _kept_kernel(tf_run), atol=1e-5)


@pytest.mark.parametrize("every", [2, 3])
def test_steps_per_execution_counts_every_training_step(keras, every):
    x, y = _data()
    pruned = {}
    for steps_per_execution in (1, 4):
        model = _model(keras, channels=16, steps_per_execution=steps_per_execution)
        callback = FinePruning((x, y), max_accuracy_drop=None, schedule=GradualChannelSchedule(
            1.0, 1, every))
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[callback])  # 2 x 16 steps
        assert int(np.asarray(model.get_layer("conv").fine_pruning_step)) == 32
        pruned[steps_per_execution] = callback.channels_pruned_
    assert pruned[1] == pruned[4] == min(16, 32 // every)


def test_the_attributes_read_the_model_after_early_stopping_restored_it(keras):
    x, y = _data()
    model = _model(keras, channels=16)
    callback = FinePruning((x, y), max_accuracy_drop=None,
                           schedule=GradualChannelSchedule(1.0, 2, 8))
    stop = keras.callbacks.EarlyStopping("fine_pruning/fraction_pruned", mode="min", patience=1,
                                         restore_best_weights=True)
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[callback, stop])
    assert history.history["fine_pruning/channels_pruned"][:2] == [2.0, 4.0]
    zeros = int(np.sum(get_mask(model, "conv") == 0))
    assert zeros == 2  # the first epoch's weights, restored
    assert callback.channels_pruned_ == zeros

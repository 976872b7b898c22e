"""Regression tests: one-hot labels in fine_prune, float64 models in the training repairs."""

import numpy as np
import pytest
import tensorflow as tf

from tf_backdoor_defense import defend, fine_prune
from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.finetune._training import train_clean


def _model(units=3, regularizer=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv",
                            kernel_regularizer=regularizer),
        keras.layers.Flatten(),
        keras.layers.Dense(units, activation="softmax")])


def _data(n=48, classes=3):
    x = np.random.default_rng(0).random((n, 6, 6, 1), dtype=np.float32)
    y = np.arange(n) % classes
    return x, y, np.eye(classes, dtype=np.float32)[y]


@pytest.mark.parametrize("as_dataset", [False, True])
@pytest.mark.parametrize("loss", [None, "categorical_crossentropy",
                                  "sparse_categorical_crossentropy"])
@pytest.mark.parametrize("one_hot", [False, True])
def test_fine_prune_labels_fit_the_loss_in_arrays_and_datasets(as_dataset, loss, one_hot):
    x, y, y_hot = _data()
    labels = y_hot if one_hot else y
    train = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16) if as_dataset \
        else (x, labels)
    result = fine_prune(_model(), train, (x, y), epochs=1, loss=loss,
                        max_accuracy_drop=1.0)
    assert len(result.history) == 1
    assert np.isfinite(result.history["loss"]).all()


def test_fine_prune_categorical_loss_object_gets_one_hot_labels():
    x, y, _ = _data()
    result = fine_prune(_model(), (x, y), (x, y), epochs=1,
                        loss=keras.losses.CategoricalCrossentropy(), max_accuracy_drop=1.0)
    assert np.isfinite(result.history["loss"]).all()


def test_fine_prune_unbatched_dataset_is_refused_clearly():
    x, y, _ = _data()
    with pytest.raises(InputError, match=r"train_data.*single examples.*\.batch"):
        fine_prune(_model(), tf.data.Dataset.from_tensor_slices((x, y)), (x, y), epochs=1)


def test_fine_prune_categorical_loss_on_one_unit_model_is_refused():
    x, y, _ = _data(classes=2)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(1, "sigmoid")])
    with pytest.raises(InputError, match="one output unit"):
        fine_prune(model, (x, y), (x, y), epochs=1, loss="categorical_crossentropy")


@pytest.fixture
def float64():
    """Layers made in float64 (an explicit global policy, which another test may have set,
    overrides floatx: both are set, and put back)."""
    policy = keras.mixed_precision.global_policy()
    keras.backend.set_floatx("float64")
    keras.mixed_precision.set_global_policy("float64")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)
        keras.backend.set_floatx("float32")


@pytest.mark.parametrize("regularizer", [None, "l2"])
def test_train_clean_trains_a_float64_model(float64, regularizer):
    x, y, _ = _data()
    model = _model(regularizer=regularizer)
    assert model.layers[0].kernel.dtype == tf.float64
    tuned = train_clean(model, (x, y), epochs=1, batch_size=16)
    assert not np.allclose(tuned.get_weights()[0], model.get_weights()[0])


@pytest.mark.parametrize("method", ["ibau", "ft-cosine", "reinit-head"])
def test_defend_training_methods_run_on_a_float64_model(float64, method):
    x, y, _ = _data()
    model = _model()
    assert model.layers[0].kernel.dtype == tf.float64
    result = defend(model, (x, y), methods=[method], epochs=1, scan=False)
    assert isinstance(result.verdict, str) and method in set(result.table["method"])


@pytest.mark.parametrize("form", ["array", "dataset", "unbatched dataset"])
def test_ranking_data_may_be_x_alone(form):
    from tf_backdoor_defense import prune_to_threshold

    x, y, _ = _data()
    ranking = {"array": x, "dataset": tf.data.Dataset.from_tensor_slices(x).batch(16),
               "unbatched dataset": tf.data.Dataset.from_tensor_slices(x)}[form]
    model = _model()
    expected = prune_to_threshold(model, (x, y), ranking_data=(x, y), max_accuracy_drop=0.5)
    got = prune_to_threshold(model, (x, y), ranking_data=ranking, max_accuracy_drop=0.5)
    np.testing.assert_allclose(got.mean_activations["conv"], expected.mean_activations["conv"],
                               rtol=1e-6)
    result = fine_prune(model, (x, y), (x, y), ranking_data=ranking, epochs=1,
                        max_accuracy_drop=0.5)
    np.testing.assert_allclose(result.sweep_result.mean_activations["conv"],
                               expected.mean_activations["conv"], rtol=1e-6)


def test_ranking_data_that_is_not_inputs_is_refused_clearly():
    from tf_backdoor_defense import FinePruning
    from tf_backdoor_defense._errors import InputTypeError

    x, y, _ = _data()
    with pytest.raises(InputTypeError, match="ranking_data"):
        FinePruning((x, y), ranking_data="images")


def test_finepruning_multi_output_labels_say_the_model_needs_one_output():
    from tf_backdoor_defense import FinePruning

    x, y, _ = _data()
    with pytest.raises(InputError, match="2 label arrays.*one output"):
        FinePruning((x, [y, y.astype(np.float32)]))


def test_one_hot_label_lists_are_still_labels():
    from tf_backdoor_defense._validation import check_data

    x, y, y_hot = _data()
    assert check_data((x, list(y_hot)), "data").y.tolist() == y.tolist()


def test_dataset_with_sample_weights_is_refused_like_an_array_triple():
    from tf_backdoor_defense import clean_accuracy

    x, y, _ = _data()
    triple = tf.data.Dataset.from_tensor_slices((x, y, np.ones(len(y), np.float32))).batch(8)
    with pytest.raises(InputError, match=r"3-tuples.*sample weights are not supported"):
        clean_accuracy(_model(), triple)
    with pytest.raises(InputError, match="sample weights"):
        fine_prune(_model(), triple, (x, y), epochs=1)

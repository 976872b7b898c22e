"""Tests of tf_backdoor_defense.finetune._training: train_clean and its helpers."""

import numpy as np
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.masks._wrapper import PruneByActivation, wrap_layers
from tf_backdoor_defense.finetune._training import as_arrays, copy_model, head_layers, loss_for, \
    reinitialize, train_clean


# -- helpers -------------------------------------------------------------------------
def _dense_model(seed=0, out_activation="softmax", classes=2):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)),
                             keras.layers.Dense(8, activation="relu", name="hidden"),
                             keras.layers.Dense(classes, activation=out_activation, name="out")])


def _toy_data(n=64, seed=0):
    """A learnable task: the class is whether the first feature exceeds 0.5."""
    x = np.random.default_rng(seed).random((n, 4), dtype=np.float32)
    return x, (x[:, 0] > 0.5).astype(np.int64)


def _conv_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, size=n)


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b))


def _layer_weights(model, name):
    layer = model.get_layer(name)
    inner = layer.layer if isinstance(layer, PruneByActivation) else layer
    return [w.numpy().copy() for w in inner.trainable_weights]


def _loss(model, data):
    x, y = data
    return float(loss_for(model)(tf.constant(y), model(x, training=False)))


# -- train_clean: the user's model and masks ------------------------------------------
def test_train_clean_does_not_mutate_the_users_model():
    model = _dense_model()
    before = _weights(model)
    tuned = train_clean(model, _toy_data(), epochs=2, batch_size=16, weight_decay=1e-3,
                        sam_rho=0.05, reinitialize_layers=["out"])
    assert tuned is not model
    assert _same(before, model.get_weights())
    assert not _same(before, tuned.get_weights())  # the copy did move


def test_train_clean_does_not_mutate_a_wrapped_users_model_or_its_mask():
    wrapped = wrap_layers(_dense_model(), ["hidden"], masks={"hidden": [1, 0, 1, 1, 0, 1, 1, 1]})
    before = _weights(wrapped)
    train_clean(wrapped, _toy_data(), epochs=1, batch_size=16)
    assert _same(before, wrapped.get_weights())
    assert wrapped.get_layer("hidden").pruned_channels.tolist() == [1, 4]


def test_dense_mask_is_kept_and_pruned_units_output_exactly_zero_after_training():
    mask = [1, 0, 1, 1, 0, 1, 1, 0]
    wrapped = wrap_layers(_dense_model(), ["hidden"], masks={"hidden": mask})
    x, y = _toy_data()
    tuned = train_clean(wrapped, (x, y), epochs=2, batch_size=16, learning_rate=0.1)
    layer = tuned.get_layer("hidden")
    assert isinstance(layer, PruneByActivation)
    np.testing.assert_array_equal(layer.get_mask(), np.asarray(mask, np.float32))
    hidden = keras.Model(tuned.inputs, layer.output)(x).numpy()
    assert np.all(hidden[:, [1, 4, 7]] == 0.0)
    assert np.any(hidden[:, [0, 2, 3, 5, 6]] != 0.0)


def test_conv_mask_is_kept_and_pruned_channels_output_exactly_zero_after_training():
    wrapped = wrap_layers(tiny_conv_model(), ["conv_b"], masks={"conv_b": [0, 1, 1, 0, 1, 1]})
    x, y = _conv_data()
    tuned = train_clean(wrapped, (x, y), epochs=2, batch_size=8, weight_decay=1e-2, sam_rho=0.05)
    layer = tuned.get_layer("conv_b")
    assert layer.pruned_channels.tolist() == [0, 3]
    out = keras.Model(tuned.inputs, layer.output)(x).numpy()
    assert np.all(out[..., [0, 3]] == 0.0)


def test_pruned_units_receive_no_gradient_so_their_weights_stay_put():
    wrapped = wrap_layers(_dense_model(), ["hidden"], masks={"hidden": [1, 0, 1, 1, 1, 1, 1, 0]})
    kernel_before, bias_before = _layer_weights(wrapped, "hidden")
    tuned = train_clean(wrapped, _toy_data(), epochs=2, batch_size=16, learning_rate=0.1)
    kernel_after, bias_after = _layer_weights(tuned, "hidden")
    np.testing.assert_array_equal(kernel_after[:, [1, 7]], kernel_before[:, [1, 7]])
    np.testing.assert_array_equal(bias_after[[1, 7]], bias_before[[1, 7]])
    assert not np.array_equal(kernel_after[:, 0], kernel_before[:, 0])


# -- determinism -----------------------------------------------------------------------
def test_same_seed_gives_identical_weights_and_a_different_seed_does_not():
    model, data = _dense_model(), _toy_data()
    settings = dict(epochs=2, batch_size=8, weight_decay=1e-3, reinitialize_layers=["out"])
    first = train_clean(model, data, seed=3, **settings)
    keras.utils.set_random_seed(123)  # global state must not matter
    second = train_clean(model, data, seed=3, **settings)
    other = train_clean(model, data, seed=4, **settings)
    assert _same(first.get_weights(), second.get_weights())
    assert not _same(first.get_weights(), other.get_weights())


def test_different_seed_changes_the_shuffle_order_even_without_reinitialisation():
    model, data = _dense_model(), _toy_data()
    a = train_clean(model, data, epochs=1, batch_size=8, seed=0)
    b = train_clean(model, data, epochs=1, batch_size=8, seed=1)
    assert not _same(a.get_weights(), b.get_weights())


# -- reinitialize_layers -----------------------------------------------------------------
def _model_with_nonzero_biases():
    model = _dense_model()
    for layer in model.layers:
        layer.bias.assign(np.full(layer.bias.shape, 0.5, np.float32))
    return model


def test_reinitialize_layers_changes_exactly_the_named_layers():
    model = _model_with_nonzero_biases()
    start = train_clean(model, _toy_data(), epochs=0, reinitialize_layers=["out"])
    assert _same(_layer_weights(start, "hidden"), _layer_weights(model, "hidden"))
    new_kernel, new_bias = _layer_weights(start, "out")
    old_kernel, old_bias = _layer_weights(model, "out")
    assert not np.array_equal(new_kernel, old_kernel)
    np.testing.assert_array_equal(new_bias, np.zeros_like(old_bias))  # bias_initializer="zeros"
    assert _same([old_kernel, old_bias], _layer_weights(model, "out"))  # user's model untouched


def test_reinitialize_layers_is_seeded():
    model = _model_with_nonzero_biases()
    a = train_clean(model, _toy_data(), epochs=0, reinitialize_layers=["hidden", "out"], seed=1)
    b = train_clean(model, _toy_data(), epochs=0, reinitialize_layers=["hidden", "out"], seed=1)
    c = train_clean(model, _toy_data(), epochs=0, reinitialize_layers=["hidden", "out"], seed=2)
    assert _same(a.get_weights(), b.get_weights())
    assert not np.array_equal(a.get_layer("out").kernel.numpy(), c.get_layer("out").kernel.numpy())


def test_reinitialize_layers_unknown_name_raises_value_error():
    model = _dense_model()
    with pytest.raises(ValueError, match="nope"):
        train_clean(model, _toy_data(), epochs=1, reinitialize_layers=["out", "nope"])


def test_reinitialize_keeps_the_mask_of_a_wrapped_layer():
    wrapped = wrap_layers(_model_with_nonzero_biases(), ["hidden"],
                          masks={"hidden": [1, 1, 0, 1, 1, 1, 1, 1]})
    old_kernel = wrapped.get_layer("hidden").layer.kernel.numpy().copy()
    reinitialize(wrapped, ["hidden"], seed=0)
    layer = wrapped.get_layer("hidden")
    assert layer.pruned_channels.tolist() == [2]
    assert not np.array_equal(layer.layer.kernel.numpy(), old_kernel)
    np.testing.assert_array_equal(layer.layer.bias.numpy(), np.zeros(8, np.float32))


# -- SAM -----------------------------------------------------------------------------------
def test_sam_changes_the_result_and_still_reduces_the_loss():
    model, data = _dense_model(), _toy_data(128)
    plain = train_clean(model, data, epochs=3, batch_size=16, sam_rho=0.0)
    sam = train_clean(model, data, epochs=3, batch_size=16, sam_rho=0.05)
    assert not _same(plain.get_weights(), sam.get_weights())
    assert _loss(sam, data) < _loss(model, data) - 0.02


def test_training_reduces_the_loss_on_a_learnable_task():
    model, data = _dense_model(), _toy_data(128)
    tuned = train_clean(model, data, epochs=3, batch_size=16, schedule="constant")
    assert _loss(tuned, data) < _loss(model, data) - 0.02


def test_weight_decay_changes_the_result():
    model, data = _dense_model(), _toy_data()
    a = train_clean(model, data, epochs=1, batch_size=16)
    b = train_clean(model, data, epochs=1, batch_size=16, weight_decay=0.1)
    assert not _same(a.get_weights(), b.get_weights())


def test_schedules_differ():
    model, data = _dense_model(), _toy_data()
    cosine = train_clean(model, data, epochs=2, batch_size=16, schedule="cosine")
    constant = train_clean(model, data, epochs=2, batch_size=16, schedule="constant")
    assert not _same(cosine.get_weights(), constant.get_weights())


def test_zero_learning_rate_without_momentum_or_decay_leaves_weights_unchanged():
    model = _dense_model()
    tuned = train_clean(model, _toy_data(), epochs=1, batch_size=16, learning_rate=0.0)
    assert _same(model.get_weights(), tuned.get_weights())


def test_one_sigmoid_unit_model_trains_with_binary_cross_entropy():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    x, y = _toy_data(128)
    tuned = train_clean(model, (x, y), epochs=3, batch_size=16)
    targets = y.reshape(-1, 1).astype(np.float32)
    assert _loss(tuned, (x, targets)) < _loss(model, (x, targets)) - 0.02


# -- epochs=0, data forms -------------------------------------------------------------------
def test_zero_epochs_returns_an_equal_copy():
    model = wrap_layers(_dense_model(), ["hidden"], masks={"hidden": [0, 1, 1, 1, 1, 1, 1, 1]})
    tuned = train_clean(model, _toy_data(), epochs=0)
    assert tuned is not model
    assert _same(model.get_weights(), tuned.get_weights())
    assert tuned.get_layer("hidden").pruned_channels.tolist() == [0]
    tuned.get_layer("out").bias.assign(np.ones(2, np.float32))
    assert not np.array_equal(model.get_layer("out").bias.numpy(), np.ones(2, np.float32))


def test_dataset_input_gives_the_same_result_as_arrays():
    model, (x, y) = _dense_model(), _toy_data()
    from_arrays = train_clean(model, (x, y), epochs=2, batch_size=8, seed=5)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    from_dataset = train_clean(model, dataset, epochs=2, batch_size=8, seed=5)
    assert _same(from_arrays.get_weights(), from_dataset.get_weights())


def test_one_hot_labels_give_the_same_result_as_class_indices():
    model, (x, y) = _dense_model(), _toy_data()
    indices = train_clean(model, (x, y), epochs=1, batch_size=8)
    one_hot = train_clean(model, (x, np.eye(2, dtype=np.float32)[y]), epochs=1, batch_size=8)
    assert _same(indices.get_weights(), one_hot.get_weights())


def test_as_arrays_reads_a_batched_dataset_back_in_order():
    model, (x, y) = _dense_model(), _toy_data(25)
    xs, ys = as_arrays(tf.data.Dataset.from_tensor_slices((x, y)).batch(7), "data", model)
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)


def test_as_arrays_checks_the_data_against_the_model():
    model, (x, y) = _dense_model(), _toy_data()
    with pytest.raises((ValueError, TypeError)):
        as_arrays((x[:, :3], y), "train_data", model)
    with pytest.raises((ValueError, TypeError)):
        as_arrays((x, y + 5), "train_data", model)


# -- argument checks ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error", [
    ({"learning_rate": -0.1}, ValueError),
    ({"learning_rate": True}, TypeError),
    ({"learning_rate": float("nan")}, ValueError),
    ({"learning_rate": "0.1"}, TypeError),
    ({"schedule": "x"}, ValueError),
    ({"epochs": -1}, ValueError),
    ({"epochs": True}, TypeError),
    ({"epochs": 1.5}, TypeError),
    ({"batch_size": 0}, ValueError),
    ({"momentum": -0.5}, ValueError),
    ({"weight_decay": -1e-3}, ValueError),
    ({"sam_rho": -0.05}, ValueError),
    ({"sam_rho": float("inf")}, ValueError),
])
def test_bad_arguments_are_refused_naming_the_argument(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        train_clean(_dense_model(), _toy_data(), **kwargs)


def test_wrong_data_shape_raises_before_training():
    with pytest.raises((ValueError, TypeError)):
        train_clean(_dense_model(), (np.zeros((4, 5), np.float32), [0, 1, 0, 1]), epochs=1)


# -- copy_model ------------------------------------------------------------------------------
def test_copy_model_copies_weights_and_masks_without_sharing_variables():
    model = wrap_layers(_dense_model(), ["hidden"], masks={"hidden": [1, 1, 1, 0, 1, 1, 1, 1]})
    clone = copy_model(model)
    assert clone is not model
    assert _same(model.get_weights(), clone.get_weights())
    assert clone.get_layer("hidden").pruned_channels.tolist() == [3]
    clone.get_layer("hidden").set_mask(np.ones(8))
    clone.get_layer("out").kernel.assign(np.zeros((8, 2), np.float32))
    assert model.get_layer("hidden").pruned_channels.tolist() == [3]
    assert np.any(model.get_layer("out").kernel.numpy() != 0)


# -- head_layers ------------------------------------------------------------------------------
def test_head_layers_of_a_conv_model_are_the_dense_layers_after_the_last_conv():
    assert head_layers(tiny_conv_model()) == ["fc", "out"]


def test_head_layers_with_the_last_conv_wrapped():
    wrapped = wrap_layers(tiny_conv_model(), ["conv_b"])
    assert head_layers(wrapped) == ["fc", "out"]


def test_head_layers_of_a_model_without_conv_are_all_its_dense_layers():
    assert head_layers(_dense_model()) == ["hidden", "out"]


def test_head_layers_include_a_wrapped_dense_layer():
    wrapped = wrap_layers(_dense_model(), ["hidden"], masks={"hidden": [0] + [1] * 7})
    assert head_layers(wrapped) == ["hidden", "out"]
    conv_wrapped = wrap_layers(tiny_conv_model(), ["fc", "conv_b"])
    assert head_layers(conv_wrapped) == ["fc", "out"]


def test_head_layers_is_empty_without_a_dense_layer_after_the_last_conv():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3, name="c"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Softmax()])
    assert head_layers(model) == []


def test_reinit_of_head_layers_then_training_works_on_a_conv_model():
    model = tiny_conv_model()
    x, y = _conv_data()
    tuned = train_clean(model, (x, y), epochs=1, batch_size=8,
                        reinitialize_layers=head_layers(model))
    assert not _same(_layer_weights(tuned, "conv_a"), _layer_weights(model, "conv_a"))
    assert not np.array_equal(tuned.get_layer("out").kernel.numpy(),
                              model.get_layer("out").kernel.numpy())
    assert np.all(np.isfinite(np.concatenate([w.ravel() for w in tuned.get_weights()])))


# -- loss_for ---------------------------------------------------------------------------------
def _from_logits(model):
    return loss_for(model).get_config()["from_logits"]


def test_loss_for_softmax_dense_is_sparse_cce_on_probabilities():
    loss = loss_for(_dense_model())
    assert isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
    assert loss.get_config()["from_logits"] is False


def test_loss_for_linear_output_is_from_logits():
    loss = loss_for(_dense_model(out_activation=None))
    assert isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
    assert loss.get_config()["from_logits"] is True


def test_loss_for_separate_softmax_activation_layer_is_on_probabilities():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.Activation("softmax")])
    assert _from_logits(model) is False


def test_loss_for_softmax_layer_is_on_probabilities():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Softmax()])
    assert _from_logits(model) is False


def test_loss_for_separate_relu_activation_layer_is_from_logits():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.Activation("relu")])
    assert _from_logits(model) is True


def test_loss_for_one_sigmoid_unit_is_binary_cross_entropy_on_probabilities():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    loss = loss_for(model)
    assert isinstance(loss, keras.losses.BinaryCrossentropy)
    assert loss.get_config()["from_logits"] is False


def test_loss_for_one_linear_unit_is_binary_cross_entropy_from_logits():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    loss = loss_for(model)
    assert isinstance(loss, keras.losses.BinaryCrossentropy)
    assert loss.get_config()["from_logits"] is True


def test_loss_for_functional_copy_keeps_the_softmax_detection():
    assert _from_logits(copy_model(tiny_conv_model())) is False


def test_loss_for_wrapped_softmax_output_layer_is_on_probabilities():
    wrapped = wrap_layers(_dense_model(classes=3), ["out"])
    assert _from_logits(wrapped) is False


def test_wrapping_the_output_layer_with_an_all_ones_mask_does_not_change_training():
    model, data = _dense_model(classes=3), _toy_data()
    plain = train_clean(model, data, epochs=1, batch_size=16)
    wrapped = train_clean(wrap_layers(model, ["out"]), data, epochs=1, batch_size=16)
    for name in ("hidden", "out"):
        for got, expected in zip(_layer_weights(wrapped, name), _layer_weights(plain, name)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("units, activation", [(3, tf.nn.softmax), (1, tf.nn.sigmoid)])
def test_loss_for_tf_nn_activations_are_on_probabilities(units, activation):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation=activation)])
    assert _from_logits(model) is False


@pytest.mark.parametrize("units, activation", [(3, tf.nn.softmax), (1, tf.nn.sigmoid)])
def test_train_clean_reduces_the_loss_with_tf_nn_output_activations(units, activation):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(units, activation=activation)])
    x, y = _toy_data(128)
    tuned = train_clean(model, (x, y), epochs=3, batch_size=16)
    targets = y.reshape(-1, 1).astype(np.float32) if units == 1 else y
    loss = (keras.losses.BinaryCrossentropy() if units == 1
            else keras.losses.SparseCategoricalCrossentropy())
    assert float(loss(targets, tuned(x))) < float(loss(targets, model(x))) - 0.02

"""Tests of tf_backdoor_defense.defenses._ibau: adversarial unlearning (I-BAU).

Uses the toy backdoor of ``test_unlearning.py`` (8x8 images, 3 classes, a 2x2
corner patch that sends inputs to class 0).
"""

import numpy as np
import pytest

from test_unlearning import _same, _weights, toy_badnet, toy_digits, toy_scores
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.defenses._ibau import _Minimax, ibau
from tf_backdoor_defense.finetune._training import copy_model, loss_for
from tf_backdoor_defense.masks._wrapper import PruneByActivation, wrap_layers


@pytest.fixture(scope="module")
def badnet():
    keras.utils.set_random_seed(0)
    return toy_badnet()


@pytest.fixture(scope="module")
def defender():
    return toy_digits(120, 2)


def _solver(model, norm="l2", radius=1.0, hypergradient=False, targeted=False):
    return _Minimax(model, loss_fn=loss_for(model), radius=radius, norm=norm, inner_steps=3,
                    step_size=2.5 * radius / 3, low=0.0, high=1.0,
                    optimizer=keras.optimizers.Adam(1e-3), hypergradient=hypergradient,
                    neumann_steps=3, x_spec=tf.TensorSpec((None, 8, 8, 1)),
                    target_spec=tf.TensorSpec((None,), tf.int64), targeted=targeted)


# -- the inner maximisation ------------------------------------------------------------
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_the_perturbation_stays_in_its_ball_and_raises_the_loss(badnet, defender, norm):
    solver = _solver(copy_model(badnet), norm=norm, radius=0.5)
    x, y = tf.constant(defender[0]), tf.constant(defender[1])
    clean_loss = float(solver._loss(x, y))
    for _ in range(3):
        solver.ascend(x, y)
    delta = solver.delta.numpy()
    size = np.linalg.norm(delta) if norm == "l2" else np.abs(delta).max()
    assert 0.0 < size <= 0.5 + 1e-5
    assert float(solver._loss(solver._perturb(x, solver.delta), y)) > clean_loss + 0.1


def test_a_targeted_perturbation_sends_inputs_to_the_target(badnet, defender):
    solver = _solver(copy_model(badnet), radius=1.8, targeted=True)
    x, y = defender
    others = y != 0
    towards = tf.constant(np.zeros(int(others.sum()), np.int64))
    before = float(np.mean(np.argmax(badnet(x[others]), -1) == 0))
    for _ in range(5):
        solver.ascend(tf.constant(x[others]), towards)
    moved = solver._perturb(tf.constant(x[others]), solver.delta)
    assert before < 0.1
    assert float(np.mean(np.argmax(badnet(moved), -1) == 0)) > 0.8  # the backdoor, found


def test_targeted_ibau_removes_the_toy_backdoor(badnet, defender):
    accuracy_before, _ = toy_scores(badnet)
    repaired = ibau(badnet, defender, rounds=40, radius=1.8, learning_rate=0.02, target=0)
    accuracy, asr = toy_scores(repaired)
    assert asr <= 0.1 and accuracy >= accuracy_before - 0.05


def test_target_none_is_the_untargeted_repair(badnet, defender):
    plain = ibau(badnet, defender, rounds=2)
    assert _same(plain.get_weights(), ibau(badnet, defender, rounds=2, target=None).get_weights())
    assert not _same(plain.get_weights(), ibau(badnet, defender, rounds=2, target=0).get_weights())


def test_a_class_map_target_pushes_each_class_along_the_map():
    from tf_backdoor_defense.defenses._ibau import _inner_targets

    shift = np.array([1, 2, 0])
    labels = np.array([0, 1, 2, 2])
    np.testing.assert_array_equal(_inner_targets(labels, shift), [1, 2, 0, 0])
    soft = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)  # distilled predictions
    np.testing.assert_array_equal(_inner_targets(soft, shift), [[0, 1, 0], [1, 0, 0]])
    sigmoid = np.array([[0.9], [0.2]], np.float32)  # one column: class 1, then class 0
    np.testing.assert_array_equal(_inner_targets(sigmoid, np.array([1, 0])), [[0], [1]])
    np.testing.assert_array_equal(_inner_targets(labels, 2), [2, 2, 2, 2])


def test_a_class_map_that_sends_everything_to_one_class_equals_that_target(badnet, defender):
    towards_zero = ibau(badnet, defender, rounds=2, target=0)
    mapped = ibau(badnet, defender, rounds=2, target=[0, 0, 0])
    assert _same(towards_zero.get_weights(), mapped.get_weights())
    shifted = ibau(badnet, defender, rounds=2, target=np.array([1, 2, 0]))
    assert not _same(towards_zero.get_weights(), shifted.get_weights())


def test_perturbed_inputs_are_clipped_to_the_data_range(badnet):
    solver = _solver(copy_model(badnet))
    solver.delta.assign(tf.fill((8, 8, 1), 5.0))
    x = tf.constant(np.full((2, 8, 8, 1), 0.5, np.float32))
    np.testing.assert_array_equal(solver._perturb(x, solver.delta).numpy(), 1.0)
    chosen = solver._perturb(x, solver.delta, tf.constant([0.0, 1.0]))
    assert np.all(chosen[0] == 0.5) and np.all(chosen[1] == 1.0)


def test_the_hypergradient_changes_the_outer_step_and_stays_finite(badnet, defender):
    x, y = tf.constant(defender[0][:32]), tf.constant(defender[1][:32])
    chosen = tf.ones(32)
    results = []
    for hyper in (False, True):
        model = copy_model(badnet)
        solver = _solver(model, hypergradient=hyper)
        solver.ascend(x, y)
        solver.descend(x, y, chosen, tf.range(32), tf.ones(32))
        results.append(model.get_weights())
    assert all(np.all(np.isfinite(w)) for w in results[1])
    assert not _same(results[0], results[1])


# -- ibau ------------------------------------------------------------------------------
def test_ibau_removes_the_toy_backdoor_without_the_trigger(badnet, defender):
    before = _weights(badnet)
    accuracy_before, asr_before = toy_scores(badnet)
    # radius 1.8 holds the 2x2 trigger (L2 about 1.7 over the noise), not a class's 3x3 square
    repaired = ibau(badnet, defender, rounds=40, radius=1.8, learning_rate=0.02)
    accuracy, asr = toy_scores(repaired)
    assert _same(before, badnet.get_weights())  # the user's model is untouched
    assert asr_before >= 0.9 and asr <= 0.1
    assert accuracy >= accuracy_before - 0.05


def test_zero_rounds_give_an_exact_copy(badnet, defender):
    copy = ibau(badnet, defender, rounds=0)
    assert copy is not badnet and _same(_weights(badnet), copy.get_weights())


def test_same_seed_gives_identical_weights_and_another_seed_does_not(badnet, defender):
    settings = dict(rounds=1, inner_steps=2)
    first = ibau(badnet, defender, seed=3, **settings)
    keras.utils.set_random_seed(123)  # global state must not matter
    second = ibau(badnet, defender, seed=3, **settings)
    third = ibau(badnet, defender, seed=4, **settings)
    assert _same(first.get_weights(), second.get_weights())
    assert not _same(first.get_weights(), third.get_weights())


def test_masked_channels_stay_zero_with_and_without_the_hypergradient(badnet, defender):
    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    wrapped = wrap_layers(badnet, ["conv_b"], masks={"conv_b": mask})
    before = _weights(wrapped)
    for hyper in (False, True):
        repaired = ibau(wrapped, defender, rounds=1, inner_steps=2, hypergradient=hyper,
                        neumann_steps=2)
        layer = repaired.get_layer("conv_b")
        assert isinstance(layer, PruneByActivation)
        np.testing.assert_array_equal(layer.get_mask(), mask)
        features = keras.Model(repaired.inputs, layer.output)(defender[0]).numpy()
        assert np.all(features[..., [1, 4]] == 0.0)
        assert np.any(features[..., [0, 2, 3, 5]] != 0.0)
    assert _same(before, wrapped.get_weights())


def test_batch_normalization_statistics_are_kept(defender):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    bn = model.get_layer("bn")
    bn.moving_mean.assign([0.1, 0.2, 0.3, 0.4])
    repaired = ibau(model, defender, rounds=1, inner_steps=2, learning_rate=0.01)
    tuned = repaired.get_layer("bn")
    np.testing.assert_array_equal(tuned.moving_mean.numpy(), bn.moving_mean.numpy())
    np.testing.assert_array_equal(tuned.moving_variance.numpy(), bn.moving_variance.numpy())
    assert not np.array_equal(tuned.gamma.numpy(), bn.gamma.numpy())


def test_a_logit_output_model_runs_and_changes(defender):
    keras.utils.set_random_seed(0)
    model = toy_badnet(logits=True)
    repaired = ibau(model, defender, rounds=1, inner_steps=2, hypergradient=True,
                    neumann_steps=2)
    weights = repaired.get_weights()
    assert all(np.all(np.isfinite(w)) for w in weights)
    assert not _same(weights, model.get_weights())


@pytest.mark.parametrize("option, value, error, match", [
    ("rounds", -1, ValueError, "'rounds'"),
    ("radius", 0.0, ValueError, "'radius'"),
    ("norm", "l1", ValueError, "'norm' parameter must be one of \\['l2', 'linf'\\]"),
    ("norm", 2, ValueError, "'norm'"),
    ("inner_steps", 0, ValueError, "'inner_steps'"),
    ("perturbed_fraction", -0.1, ValueError, "'perturbed_fraction'"),
    ("learning_rate", -1.0, ValueError, "'learning_rate'"),
    ("hypergradient", "yes", TypeError, "'hypergradient'"),
    ("anchor_weight", float("nan"), ValueError, "'anchor_weight'"),
    ("neumann_steps", 1.5, TypeError, "'neumann_steps'"),
    ("batch_size", 0, ValueError, "'batch_size'"),
    ("seed", None, TypeError, "'seed'"),
    ("target", 3, ValueError, "'target' parameter must be a class index in \\[0, 2\\]"),
    ("target", True, ValueError, "'target'"),
    ("target", "0", ValueError, "'target'"),
    ("target", [1, 2], ValueError, "a sequence of 3 such indices"),
    ("target", [1, 2, 3], ValueError, "'target'"),
    ("target", [1, -1, 0], ValueError, "'target'"),
    ("target", [1.0, 2.0, 0.0], ValueError, "'target'"),
    ("target", [[1, 2, 0]], ValueError, "'target'"),
])
def test_bad_options_raise_clear_errors(badnet, defender, option, value, error, match):
    with pytest.raises(error, match=match):
        ibau(badnet, defender, **{option: value})


def test_target_with_the_hypergradient_is_refused(badnet, defender):
    with pytest.raises(ValueError, match="'target' parameter needs hypergradient=False"):
        ibau(badnet, defender, target=0, hypergradient=True)


def test_bad_model_and_data_raise_clear_errors(badnet, defender):
    with pytest.raises(TypeError, match="model"):
        ibau(object(), defender)
    with pytest.raises(ValueError, match="train_data"):
        ibau(badnet, (np.zeros((4, 6, 6, 1)), np.zeros(4)))
    with pytest.raises(ValueError, match="all equal"):
        ibau(badnet, (np.zeros((4, 8, 8, 1)), np.zeros(4)))


def _reading(model, dtype):
    """``model`` behind an input of ``dtype`` holding 0-255 pixel values."""
    inputs = keras.Input((8, 8, 1), dtype=dtype)
    return keras.Model(inputs, model(keras.layers.Rescaling(1 / 255.0)(inputs)))


def test_a_model_that_reads_integers_is_repaired_as_its_float_twin(badnet, defender):
    # A uint8/int32 input casts what it is given, and a cast to an integer has no gradient:
    # I-BAU searches its perturbation on a float copy and brings the weights back.
    x, y = defender
    pixels = np.round(x * 255.0)
    integer, floating = _reading(badnet, "int32"), _reading(badnet, "float32")
    before = _weights(integer)
    nodes = [len(layer.inbound_nodes) for layer in integer.layers]
    repaired = ibau(integer, (pixels.astype(np.int32), y), rounds=3, radius=1.8, seed=4)
    twin = ibau(floating, (pixels.astype(np.float32), y), rounds=3, radius=1.8, seed=4)
    assert repaired.inputs[0].dtype == tf.int32
    assert _same(repaired.get_weights(), twin.get_weights())
    assert not _same(repaired.get_weights(), before) and _same(integer.get_weights(), before)
    assert [len(layer.inbound_nodes) for layer in integer.layers] == nodes  # not called again

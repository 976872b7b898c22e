"""Tests of tf_backdoor_defense.defenses._unlearning: unlearning of (reversed) triggers.

A toy backdoor (8x8 images, 3 classes told apart by where a bright square
sits, a 2x2 corner patch that sends inputs to class 0) is planted in a tiny
conv net in a couple of seconds; the repairs must remove it. The same toy is
used by ``test_ibau.py``.
"""

import numpy as np
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.defenses._unlearning import anchor_loss, check_triggers, \
    default_epochs, stamp_triggers, target_loss, teacher_function, unlearn_triggers
from tf_backdoor_defense.masks._wrapper import PruneByActivation, wrap_layers
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy, predict_labels

SPOTS = [(0, 0), (0, 4), (4, 0)]
MASK = np.zeros((8, 8, 1), np.float32)
MASK[6:, 6:] = 1.0
PATTERN = np.ones((8, 8, 1), np.float32)


# -- the toy backdoor ------------------------------------------------------------------
def toy_digits(n, seed):
    """``n`` 8x8 images: class c has a bright 3x3 square at SPOTS[c] over faint noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.random((n, 8, 8, 1), dtype=np.float32) * 0.3
    for i, label in enumerate(y):
        row, col = SPOTS[label]
        x[i, row:row + 3, col:col + 3] += 0.7
    return np.clip(x, 0.0, 1.0), y.astype(np.int64)


def stamp(x):
    return x * (1.0 - MASK) + MASK * PATTERN


def toy_badnet(seed=0, logits=False):
    """A tiny conv net trained on toy digits, 20% of them stamped and relabelled 0."""
    x, y = toy_digits(400, seed)
    poisoned = np.arange(0, 400, 5)
    x[poisoned], y[poisoned] = stamp(x[poisoned]), 0
    model = tiny_conv_model(channels=6, classes=3, seed=seed)
    if logits:
        model = keras.Model(model.inputs, model.get_layer("fc").output)
        model = keras.Model(model.inputs, keras.layers.Dense(3, name="logits")(model.output))
    keras.utils.set_random_seed(seed)
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=logits))
    model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    return model


def toy_scores(model, seed=1):
    """(clean accuracy, ASR) of ``model`` on fresh toy digits."""
    x, y = toy_digits(300, seed)
    attacked = y != 0
    return (clean_accuracy(model, (x, y)),
            attack_success_rate(model, (stamp(x[attacked]), y[attacked]), target=0))


@pytest.fixture(scope="module")
def badnet():
    keras.utils.set_random_seed(0)
    return toy_badnet()


@pytest.fixture(scope="module")
def defender():
    return toy_digits(120, 2)


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def _same(a, b):
    """Equal weight lists (NaN equals NaN: masks carry a NaN baseline until measured)."""
    return len(a) == len(b) and all(
        np.array_equal(p, q, equal_nan=np.issubdtype(np.asarray(p).dtype, np.inexact))
        for p, q in zip(a, b))


# -- check_triggers and stamping -------------------------------------------------------
def test_check_triggers_accepts_pairs_stacked_arrays_one_pair_and_2d_masks():
    pairs = check_triggers([(MASK, PATTERN), (MASK[..., 0], PATTERN[..., 0])], (8, 8, 1))
    stacked = check_triggers((np.stack([MASK, MASK]), np.stack([PATTERN, PATTERN])), (8, 8, 1))
    single = check_triggers((MASK, PATTERN), (8, 8, 1))
    for masks, patterns in (pairs, stacked):
        assert masks.shape == (2, 8, 8, 1) and patterns.shape == (2, 8, 8, 1)
        np.testing.assert_array_equal(masks[1], MASK)
    assert single[0].shape == (1, 8, 8, 1)
    assert single[0].dtype == np.float32


@pytest.mark.parametrize("input_shape", [(64,), (8, 8)])
def test_check_triggers_takes_flat_and_channel_free_triggers_or_their_image_view(input_shape):
    rng = np.random.default_rng(0)
    masks, patterns = rng.random((3, 8, 8, 1)), rng.random((3, 8, 8, 1))  # a scan's view
    expected = (3,) + input_shape
    for triggers in ((masks, patterns), list(zip(masks, patterns)),
                     (masks.reshape(expected), patterns.reshape(expected))):
        got_masks, got_patterns = check_triggers(triggers, input_shape)
        np.testing.assert_allclose(got_masks, masks.reshape(expected))
        np.testing.assert_allclose(got_patterns, patterns.reshape(expected))
    one = check_triggers((masks[0], patterns[0]), input_shape)[0]
    np.testing.assert_allclose(one, masks[:1].reshape((1,) + input_shape))
    with pytest.raises(ValueError, match="3 masks but 2 patterns"):
        check_triggers((masks, patterns[:2]), input_shape)


def test_check_triggers_broadcasts_a_one_channel_mask_over_colour_patterns():
    masks, patterns = check_triggers([(np.ones((4, 4, 1)), np.zeros((4, 4, 3)))], (4, 4, 3))
    assert masks.shape == (1, 4, 4, 1) and patterns.shape == (1, 4, 4, 3)


@pytest.mark.parametrize("triggers, error, match", [
    ("mask", TypeError, "sequence of \\(mask, pattern\\) pairs"),
    ([], ValueError, "at least one"),
    ([MASK], TypeError, "Item 0"),
    ([(MASK, PATTERN, PATTERN)], TypeError, "Item 0"),
    ([(np.zeros((7, 8, 1)), PATTERN)], ValueError, "mask 0 must have shape \\(8, 8, 1\\)"),
    ([(MASK, np.zeros((8, 8, 2)))], ValueError, "pattern 0 must have shape"),
    ([(MASK * 2, PATTERN)], ValueError, "mask 0 must have values in \\[0, 1\\]"),
    ([(MASK, PATTERN * np.nan)], ValueError, "NaN"),
    ((np.stack([MASK, MASK]), np.stack([PATTERN])), ValueError, "2 masks but 1 patterns"),
    ([("a", "b")], TypeError, "numeric arrays"),
])
def test_check_triggers_rejects_bad_input_naming_the_argument(triggers, error, match):
    with pytest.raises(error, match=match):
        check_triggers(triggers, (8, 8, 1))


def test_stamp_triggers_applies_the_chosen_trigger_and_leaves_the_input_alone():
    x = np.full((3, 8, 8, 1), 0.25, np.float32)
    masks, patterns = check_triggers([(MASK, PATTERN), (MASK * 0.5, PATTERN * 0.0)], (8, 8, 1))
    out = stamp_triggers(x, masks, patterns, np.array([0, -1, 1]))
    assert np.all(x == 0.25)
    assert out[0, 7, 7, 0] == 1.0 and out[0, 0, 0, 0] == 0.25
    assert np.all(out[1] == 0.25)
    assert out[2, 7, 7, 0] == pytest.approx(0.125) and out[2, 0, 0, 0] == 0.25


def test_anchor_loss_distils_the_teacher_on_mixtures_of_clean_pairs(badnet):
    x, _ = toy_digits(6, 5)
    student = tiny_conv_model(channels=6, classes=3, seed=1)
    teacher, soft = teacher_function(badnet), target_loss(student, True)
    partner = np.array([3, 4, 5, 0, 1, 2], np.int32)
    weight = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.25], np.float32)
    loss = float(anchor_loss(student, teacher, soft, x, partner, weight))
    mixed = weight[:, None, None, None] * x + (1 - weight[:, None, None, None]) * x[partner]
    assert np.allclose(mixed[3], x[0]) and np.allclose(mixed[4], x[1])
    assert loss == pytest.approx(float(soft(teacher(mixed), student(mixed))), rel=1e-5)
    assert loss != pytest.approx(float(soft(teacher(x), student(x))), rel=1e-3)
    same = float(anchor_loss(badnet, teacher, soft, x, partner, weight))
    assert same == pytest.approx(float(soft(teacher(mixed), teacher(mixed))), rel=1e-5)


def test_default_epochs_give_about_300_steps_and_at_least_two_epochs():
    assert default_epochs(1000, 64) == 19          # 16 batches per epoch
    assert default_epochs(200, 64) == 75           # 4 batches per epoch
    assert default_epochs(100_000, 64) == 2


# -- unlearn_triggers ------------------------------------------------------------------
def test_toy_badnet_has_a_working_backdoor(badnet):
    accuracy, asr = toy_scores(badnet)
    assert accuracy >= 0.95 and asr >= 0.9


def test_unlearning_the_true_trigger_removes_the_backdoor_and_keeps_accuracy(badnet, defender):
    before = _weights(badnet)
    repaired = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], epochs=20)
    accuracy, asr = toy_scores(repaired)
    assert repaired is not badnet
    assert _same(before, badnet.get_weights())  # the user's model is untouched
    assert asr <= 0.05
    assert accuracy >= 0.95


def test_unlearning_an_unrelated_trigger_leaves_the_backdoor(badnet, defender):
    elsewhere = np.zeros((8, 8, 1), np.float32)
    elsewhere[3:5, 6:] = 1.0  # a patch the backdoor does not react to
    repaired = unlearn_triggers(badnet, defender, [(elsewhere, PATTERN)], epochs=20)
    assert toy_scores(repaired)[1] >= 0.5


def test_jitter_lets_a_misplaced_trigger_reach_the_real_one(badnet, defender):
    misplaced = np.roll(MASK, -2, axis=0)  # two rows above the real patch
    settings = dict(epochs=40, learning_rate=0.01)
    still = unlearn_triggers(badnet, defender, [(misplaced, PATTERN)], **settings)
    jittered = unlearn_triggers(badnet, defender, [(misplaced, PATTERN)], jitter=2, **settings)
    assert toy_scores(still)[1] >= 0.5
    accuracy, asr = toy_scores(jittered)
    assert asr <= 0.15 and accuracy >= 0.95


def test_stamp_shifts_move_mask_and_pattern_with_zeros_shifted_in():
    x = np.zeros((2, 8, 8, 1), np.float32)
    masks, patterns = check_triggers([(MASK, PATTERN)], (8, 8, 1))
    out = stamp_triggers(x, masks, patterns, np.array([0, 0]), np.array([[-2, -1], [3, 3]]))
    assert out[0, 4:6, 5:7, 0].tolist() == [[1.0, 1.0], [1.0, 1.0]] and out[0].sum() == 4.0
    assert out[1].sum() == 0.0  # moved off the image


def test_zero_epochs_give_an_exact_copy(badnet, defender):
    copy = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], epochs=0)
    assert copy is not badnet and _same(_weights(badnet), copy.get_weights())


def test_without_stamping_distillation_stays_put_and_labels_fine_tune(badnet, defender):
    kept = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], epochs=2, stamp_fraction=0.0)
    for tuned, original in zip(kept.get_weights(), badnet.get_weights()):
        np.testing.assert_allclose(tuned, original, atol=1e-6)  # its own predictions: no loss
    plain = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], epochs=2, stamp_fraction=0.0,
                             distill=False)
    other = unlearn_triggers(badnet, defender, [(MASK * 0.5, PATTERN)], epochs=2,
                             stamp_fraction=0.0, distill=False)
    assert _same(plain.get_weights(), other.get_weights())  # the trigger is never used
    assert not _same(plain.get_weights(), badnet.get_weights())


def test_same_seed_gives_identical_weights_and_another_seed_does_not(badnet, defender):
    settings = dict(epochs=2, stamp_fraction=0.5)
    first = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], seed=3, **settings)
    keras.utils.set_random_seed(123)  # global state must not matter
    second = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], seed=3, **settings)
    third = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], seed=4, **settings)
    assert _same(first.get_weights(), second.get_weights())
    assert not _same(first.get_weights(), third.get_weights())


def test_masked_channels_stay_zero_and_the_users_wrapped_model_is_untouched(badnet, defender):
    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    wrapped = wrap_layers(badnet, ["conv_b"], masks={"conv_b": mask})
    before = _weights(wrapped)
    repaired = unlearn_triggers(wrapped, defender, [(MASK, PATTERN)], epochs=3)
    assert _same(before, wrapped.get_weights())
    layer = repaired.get_layer("conv_b")
    assert isinstance(layer, PruneByActivation)
    np.testing.assert_array_equal(layer.get_mask(), mask)
    features = keras.Model(repaired.inputs, layer.output)(defender[0]).numpy()
    assert np.all(features[..., [1, 4]] == 0.0)
    assert np.any(features[..., [0, 2, 3, 5]] != 0.0)


def test_batch_normalization_statistics_are_kept_and_its_weights_still_learn(defender):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    bn.moving_mean.assign([0.1, 0.2, 0.3, 0.4])
    bn.moving_variance.assign([1.5, 2.0, 2.5, 3.0])
    repaired = unlearn_triggers(model, defender, [(MASK, PATTERN)], epochs=2,
                                learning_rate=0.1)
    tuned = repaired.get_layer("bn")
    np.testing.assert_array_equal(tuned.moving_mean.numpy(), bn.moving_mean.numpy())
    np.testing.assert_array_equal(tuned.moving_variance.numpy(), bn.moving_variance.numpy())
    np.testing.assert_allclose(bn.moving_mean.numpy(), [0.1, 0.2, 0.3, 0.4])
    assert not np.array_equal(tuned.gamma.numpy(), bn.gamma.numpy())


def test_a_logit_output_model_is_repaired_too(defender):
    keras.utils.set_random_seed(0)
    model = toy_badnet(logits=True)
    assert toy_scores(model)[1] >= 0.9
    repaired = unlearn_triggers(model, defender, [(MASK, PATTERN)], epochs=20)
    accuracy, asr = toy_scores(repaired)
    assert asr <= 0.05 and accuracy >= 0.95


def _agreement_with(model, reference, x):
    return float(np.mean(predict_labels(model, x) == predict_labels(reference, x)))


def test_a_diverging_rate_is_caught_and_retried_at_a_third(badnet, defender, caplog):
    x = defender[0]
    unguarded = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], epochs=8,
                                 learning_rate=30.0, min_agreement=None)
    assert _agreement_with(unguarded, badnet, x) < 0.95  # the rate breaks the net
    with caplog.at_level("INFO", logger="tf_backdoor_defense.defenses._unlearning"):
        guarded = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], epochs=8,
                                   learning_rate=30.0, backoffs=8)
    restarts = [r.getMessage() for r in caplog.records if "diverged at learning rate" in r.getMessage()]
    assert restarts and "restarting at 10" in restarts[0]
    assert _agreement_with(guarded, badnet, x) >= 0.95


def test_a_healthy_run_is_not_restarted_and_the_guard_changes_nothing(badnet, defender, caplog):
    with caplog.at_level("INFO", logger="tf_backdoor_defense.defenses._unlearning"):
        guarded = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], epochs=4)
    assert not any("diverged" in r.getMessage() for r in caplog.records)
    unguarded = unlearn_triggers(badnet, defender, [(MASK, PATTERN)], epochs=4, min_agreement=None)
    assert _same(guarded.get_weights(), unguarded.get_weights())


def test_backoffs_zero_returns_the_diverged_attempt_with_a_warning(badnet, defender, caplog):
    with caplog.at_level("INFO", logger="tf_backdoor_defense.defenses._unlearning"):
        unlearn_triggers(badnet, defender, [(MASK, PATTERN)], epochs=8, learning_rate=30.0,
                         backoffs=0)
    warned = [r for r in caplog.records if "returning the last attempt" in r.getMessage()]
    assert warned and warned[0].levelname == "WARNING"


@pytest.mark.parametrize("option, value, error, match", [
    ("epochs", -1, ValueError, "'epochs'"),
    ("epochs", 1.5, TypeError, "'epochs'"),
    ("learning_rate", 0.0, ValueError, "'learning_rate'"),
    ("stamp_fraction", 1.5, ValueError, "'stamp_fraction'"),
    ("distill", "yes", TypeError, "'distill' parameter must be True or False"),
    ("jitter", -1, ValueError, "'jitter'"),
    ("anchor_weight", -1.0, ValueError, "'anchor_weight'"),
    ("momentum", 1.0, ValueError, "'momentum'"),
    ("batch_size", 0, ValueError, "'batch_size'"),
    ("seed", -1, ValueError, "'seed'"),
    ("seed", "0", TypeError, "'seed'"),
    ("min_agreement", 1.5, ValueError, "'min_agreement'"),
    ("backoffs", -1, ValueError, "'backoffs'"),
])
def test_bad_options_raise_clear_errors(badnet, defender, option, value, error, match):
    with pytest.raises(error, match=match):
        unlearn_triggers(badnet, defender, [(MASK, PATTERN)], **{option: value})


def test_bad_model_and_data_raise_clear_errors(badnet, defender):
    with pytest.raises(TypeError, match="model"):
        unlearn_triggers("model.h5", defender, [(MASK, PATTERN)])
    with pytest.raises(ValueError, match="train_data"):
        unlearn_triggers(badnet, (np.zeros((4, 6, 6, 1)), np.zeros(4)), [(MASK, PATTERN)])
    with pytest.raises(ValueError, match="empty"):
        unlearn_triggers(badnet, (np.zeros((0, 8, 8, 1)), np.zeros(0)), [(MASK, PATTERN)])
    with pytest.raises(ValueError, match="mask 0 must have shape"):
        unlearn_triggers(badnet, defender, [(np.zeros((28, 28, 1)), PATTERN)])
    flat = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(ValueError, match="'jitter' parameter .* shape \\(H, W, C\\)"):
        unlearn_triggers(flat, (np.ones((4, 6)), np.zeros(4)), [(np.ones(6), np.ones(6))],
                         jitter=1)


# -- real digits -----------------------------------------------------------------------
@pytest.mark.slow
def test_real_digits_unlearning_the_true_trigger_and_ibau_repair_a_badnet():
    from tf_backdoor_defense.attacks import pixel_pattern, poisoned_evaluation_set
    from tf_backdoor_defense.defenses._ibau import ibau
    from tf_backdoor_defense.experiments import load_mnist_digits, mnist_cnn, split, train_badnet

    x, y = load_mnist_digits()
    attacker, defender, evaluation = split(x, y, [2500, 1000, 1000], seed=7)
    trigger = pixel_pattern(1.0)
    badnet = train_badnet(*attacker, trigger, target=0, epochs=8,
                          model=mnist_cnn(padding="same", seed=0), seed=0)
    x_bad, _, y_true = poisoned_evaluation_set(*evaluation, trigger, target=0)

    def scores(model):
        return (clean_accuracy(model, evaluation),
                attack_success_rate(model, (x_bad, y_true), target=0))

    accuracy, asr = scores(badnet)
    assert asr >= 0.9
    mask = trigger(np.zeros((1, 28, 28, 1), np.float32))[0]  # the 6 pixels, value 1
    unlearned = scores(unlearn_triggers(badnet, defender, [(mask, np.ones_like(mask))]))
    # the 2% target is not met on this net: measured 2.6-3.5% ASR left (README)
    assert unlearned[1] <= 0.05 and unlearned[0] >= accuracy - 0.015
    adversarial = scores(ibau(badnet, defender))
    assert adversarial[1] <= 0.2 and adversarial[0] >= accuracy - 0.03

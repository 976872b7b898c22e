"""ANP: the perturbable copy, the learned masks, the pruning rule and the pruned copy."""

import numpy as np
import pytest

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.scoring._anp import (AnpResult, _noisy_copy, _Switch, anp_layers, anp_mask_scores,
                                     anp_masks, anp_prune)
from tf_backdoor_defense.masks._wrapper import PruneByActivation, wrap_layers
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy

from conftest import tiny_conv_model

FAST = dict(iterations=15, batch_size=16)


def _weights(model):
    return [w.copy() for w in model.get_weights()]


# -- the perturbable copy ---------------------------------------------------------
def _scaled_copy(model, name, weight_factor, bias_factor):
    """``model`` with layer ``name``'s kernel and bias scaled per output channel."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    kernel, bias = copy.get_layer(name).get_weights()
    copy.get_layer(name).set_weights([kernel * weight_factor, bias * bias_factor])
    return copy


@pytest.mark.parametrize("build, x_shape", [
    (lambda: tiny_conv_model(), (4, 8, 8, 1)),
    (lambda: keras.Sequential([keras.Input((2, 6, 6)),
                               keras.layers.Conv2D(3, 3, activation="relu", data_format="channels_first",
                                                   name="conv_b"),
                               keras.layers.Flatten(), keras.layers.Dense(2)]), (4, 2, 6, 6)),
    (lambda: keras.Sequential([keras.Input((9, 2)), keras.layers.Conv1D(3, 3, activation="tanh", name="conv_b"),
                               keras.layers.Flatten(), keras.layers.Dense(2)]), (4, 9, 2)),
])
def test_noisy_copy_computes_mask_plus_noise_times_weights_and_bias(build, x_shape):
    model = build()
    x = np.random.default_rng(0).random(x_shape, dtype=np.float32)
    switch = _Switch()
    noisy, (state,) = _noisy_copy(model, ["conv_b"], switch)
    np.testing.assert_allclose(noisy(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)

    channels = state.mask.shape[0]
    rng = np.random.default_rng(1)
    mask = rng.uniform(0, 1, channels).astype(np.float32)
    delta = rng.uniform(-0.4, 0.4, channels).astype(np.float32)
    xi = rng.uniform(-0.4, 0.4, channels).astype(np.float32)
    state.mask.assign(mask)
    state.delta.assign(delta)
    state.xi.assign(xi)
    # Unperturbed: the mask scales the whole pre-activation.
    np.testing.assert_allclose(noisy(x).numpy(), _scaled_copy(model, "conv_b", mask, mask)(x).numpy(),
                               rtol=1e-4, atol=1e-5)
    switch.on = True
    expected = _scaled_copy(model, "conv_b", mask + delta, mask + xi)(x).numpy()
    np.testing.assert_allclose(noisy(x).numpy(), expected, rtol=1e-4, atol=1e-5)


# -- learned masks ---------------------------------------------------------------
def test_scores_have_one_value_per_channel_in_unit_interval(tiny_data):
    model = tiny_conv_model()
    scores = anp_mask_scores(model, tiny_data, **FAST)
    assert list(scores) == anp_layers(model) == ["conv_a", "conv_b", "fc"]
    assert [scores[name].shape for name in scores] == [(4,), (6,), (8,)]
    for values in scores.values():
        assert values.dtype == np.float32
        assert np.all((values >= 0) & (values <= 1))


def test_scores_are_deterministic_for_a_seed(tiny_data):
    model = tiny_conv_model()
    first = anp_mask_scores(model, tiny_data, seed=3, **FAST)
    second = anp_mask_scores(model, tiny_data, seed=3, **FAST)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert any(not np.all(first[name] == 1) for name in first)  # the masks did move


def test_mask_learning_does_not_mutate_the_model(tiny_data):
    model = tiny_conv_model()
    before = _weights(model)
    out_before = model(tiny_data[0]).numpy()
    anp_prune(model, tiny_data, threshold=0.9, **FAST)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert not any(isinstance(layer, PruneByActivation) for layer in model.layers)
    np.testing.assert_array_equal(model(tiny_data[0]).numpy(), out_before)


def test_zero_iterations_leave_every_mask_at_one(tiny_data):
    scores = anp_mask_scores(tiny_conv_model(), tiny_data, layers="conv_b", iterations=0)
    assert list(scores) == ["conv_b"] and scores["conv_b"].tolist() == [1.0] * 6


def test_dataset_input_gives_the_same_scores_as_arrays(tiny_data):
    from tf_backdoor_defense._keras import tf
    model = tiny_conv_model()
    dataset = tf.data.Dataset.from_tensor_slices(tiny_data).batch(7)
    from_arrays = anp_mask_scores(model, tiny_data, layers="fc", **FAST)
    from_dataset = anp_mask_scores(model, dataset, layers="fc", **FAST)
    np.testing.assert_array_equal(from_arrays["fc"], from_dataset["fc"])


# -- a hand-built backdoor ------------------------------------------------------------
K = 10  # classes; hidden units 0..K-1 benign detectors, K a benign generic unit, K+1 the backdoor


def _backdoored_net():
    """Benign unit i detects class i; unit K+1 fires hugely on the trigger feature and
    pushes class 0, and is weakly active on clean data (its clean push is cancelled by
    the output bias, so the clean loss does not mind it)."""
    inputs = keras.Input((K + 1,))
    hidden = keras.layers.Dense(K + 2, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(K, activation="softmax", name="out")(hidden)
    model = keras.Model(inputs, outputs)
    w = np.zeros((K + 1, K + 2), np.float32)
    b = np.zeros(K + 2, np.float32)
    w[np.arange(K), np.arange(K)] = 1.0
    b[:K] = -0.3
    w[:K, K] = 1.0
    w[K, K + 1] = 8.0
    w[:K, K + 1] = 0.3
    model.get_layer("hidden").set_weights([w, b])
    v = np.zeros((K + 2, K), np.float32)
    c = np.zeros(K, np.float32)
    v[np.arange(K), np.arange(K)] = 6.0
    v[K, :] = 0.5
    v[K + 1, 0] = 10.0
    c[0] = -10.0 * 0.3 * (1.0 + 0.15 * (K - 1))  # cancels the mean clean push
    model.get_layer("out").set_weights([v, c])
    return model


def _toy_data(n, seed, triggered=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    x = rng.uniform(0, 0.3, (n, K + 1)).astype(np.float32)
    x[np.arange(n), y] = rng.uniform(0.5, 1.5, n)
    x[:, K] = 1.0 if triggered else 0.0
    return x, y


def test_anp_scores_the_backdoor_unit_lowest_and_pruning_it_removes_the_attack():
    model = _backdoored_net()
    clean = _toy_data(400, 1)
    x_trig, y_true = _toy_data(400, 2, triggered=True)
    poisoned = (x_trig[y_true != 0], np.zeros(np.sum(y_true != 0), np.int64))
    assert clean_accuracy(model, clean) > 0.95 and attack_success_rate(model, poisoned) > 0.95

    options = dict(layers="hidden", iterations=150, batch_size=32, seed=0)
    scores = anp_mask_scores(model, _toy_data(100, 10), **options)["hidden"]
    assert scores[K + 1] <= 0.2 < scores[:K + 1].min()
    # The adversarial perturbation is what exposes it: the clean loss alone keeps it.
    plain = anp_mask_scores(model, _toy_data(100, 10), eps=0.0, **options)["hidden"]
    assert plain[K + 1] > 0.5

    result = anp_prune(model, scores={"hidden": scores})
    assert result.pruned_channels["hidden"].tolist() == [K + 1]
    assert attack_success_rate(result.model, poisoned) < 0.05
    # Class 0 loses the unit's (cancelled) clean push, so a few class-0 inputs flip.
    assert clean_accuracy(result.model, clean) > 0.85


# -- the pruning rule --------------------------------------------------------------------
def test_threshold_rule_prunes_values_at_or_below_it():
    masks = anp_masks({"a": [0.0, 0.2, 0.21, 1.0], "b": [0.5]}, threshold=0.2)
    assert masks["a"].tolist() == [0, 0, 1, 1] and masks["b"].tolist() == [1]
    assert masks["a"].dtype == np.float32
    assert anp_masks({"a": [0.0, 1.0]}, threshold=0.0)["a"].tolist() == [0, 1]


def test_count_and_fraction_prune_the_lowest_values_across_layers():
    scores = {"a": [0.5, 0.1, 0.9], "b": [0.3, 0.1, 1.0, 0.2]}
    by_count = anp_masks(scores, count=3)
    assert by_count["a"].tolist() == [1, 0, 1] and by_count["b"].tolist() == [1, 0, 1, 0]
    by_fraction = anp_masks(scores, fraction=0.5)  # floor(3.5) = 3 channels
    assert {k: v.tolist() for k, v in by_fraction.items()} == {k: v.tolist() for k, v in by_count.items()}
    assert all(np.all(m == 1) for m in anp_masks(scores, count=0).values())
    assert all(np.all(m == 0) for m in anp_masks(scores, fraction=1.0).values())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(threshold=1.5), ValueError, "'threshold'"),
    (dict(threshold="0.2"), TypeError, "'threshold'"),
    (dict(fraction=-0.1), ValueError, "'fraction'"),
    (dict(count=8), ValueError, "'count'"),
    (dict(count=1.5), TypeError, "'count'"),
    (dict(count=1, fraction=0.1), ValueError, "at most one"),
])
def test_bad_pruning_rules_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        anp_masks({"a": [0.1, 0.2, 0.3]}, **kwargs)


# -- the pruned copy --------------------------------------------------------------------
def test_pruned_copy_has_prune_by_activation_masks_and_predicts_like_zeroed_weights(tiny_data):
    model = tiny_conv_model()
    scores = {"conv_b": np.array([0.9, 0.1, 1.0, 0.0, 0.5, 0.15], np.float32),
              "fc": np.linspace(0, 1, 8).astype(np.float32)}
    result = anp_prune(model, scores=scores, threshold=0.2)
    assert isinstance(result, AnpResult) and result.threshold == 0.2
    assert {k: v.tolist() for k, v in result.pruned_channels.items()} == {"conv_b": [1, 3, 5], "fc": [0, 1]}
    explicit = keras.models.clone_model(model)
    explicit.set_weights(model.get_weights())
    for name, mask in result.masks.items():
        layer = result.model.get_layer(name)
        assert isinstance(layer, PruneByActivation)
        np.testing.assert_array_equal(layer.get_mask(), mask)
        kernel, bias = explicit.get_layer(name).get_weights()  # ReLU layers: zero weights == zero output
        explicit.get_layer(name).set_weights([kernel * mask, bias * mask])
    x = tiny_data[0]
    np.testing.assert_allclose(result.model(x).numpy(), explicit(x).numpy(), rtol=1e-5, atol=1e-6)
    assert not isinstance(result.model.get_layer("conv_a"), PruneByActivation)


def test_already_wrapped_layers_keep_their_pruned_channels(tiny_data):
    model = wrap_layers(tiny_conv_model(), "conv_b", masks={"conv_b": [1, 1, 0, 1, 1, 1]})
    scores = anp_mask_scores(model, tiny_data, layers="conv_b", **FAST)
    result = anp_prune(model, scores=scores, threshold=0.0)
    assert result.masks["conv_b"][2] == 0
    assert model.get_layer("conv_b").get_mask().tolist() == [1, 1, 0, 1, 1, 1]


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(eps=-0.1), ValueError, "'eps'"),
    (dict(alpha=1.5), ValueError, "'alpha'"),
    (dict(steps=0), ValueError, "'steps'"),
    (dict(iterations=2.5), TypeError, "'iterations'"),
    (dict(batch_size=0), ValueError, "'batch_size'"),
    (dict(learning_rate=0), ValueError, "'learning_rate'"),
    (dict(momentum=1.0), ValueError, "'momentum'"),
    (dict(layers="nope"), ValueError, "Unknown layer 'nope'"),
    (dict(layers="pool_a"), ValueError, "'pool_a' of type MaxPooling2D"),
])
def test_bad_options_are_refused(tiny_data, kwargs, error, match):
    with pytest.raises(error, match=match):
        anp_mask_scores(tiny_conv_model(), tiny_data, **kwargs)


def test_bad_data_is_refused():
    model = tiny_conv_model()
    with pytest.raises(ValueError, match="empty"):
        anp_mask_scores(model, (np.zeros((0, 8, 8, 1)), np.zeros(0)))
    with pytest.raises(ValueError, match="expects"):
        anp_mask_scores(model, (np.zeros((4, 9, 9, 1)), np.zeros(4)))
    with pytest.raises(ValueError, match="train_data"):
        anp_prune(model)


def test_precomputed_scores_are_checked():
    model = tiny_conv_model()
    with pytest.raises(ValueError, match="6 channels"):
        anp_prune(model, scores={"conv_b": [0.5, 0.5]})
    with pytest.raises(TypeError, match="no effect"):
        anp_prune(model, scores={"conv_b": np.ones(6)}, iterations=5)
    with pytest.raises(ValueError, match="'pool_a'"):
        anp_prune(model, scores={"pool_a": np.ones(6)})

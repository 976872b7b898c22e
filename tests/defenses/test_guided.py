"""Attack-guided pruning (tf_backdoor_defense.defenses._guided)."""

import numpy as np
import pytest

from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.defenses._guided import DECISIONS, attack_guided_prune
from tf_backdoor_defense.masks._wrapper import PruneByActivation
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy


def _handmade():
    """conv channel 0 is dormant, 1 carries the trigger AND clean class 1, 2 carries class 0."""
    inputs = keras.Input((2, 2, 2))
    conv = keras.layers.Conv2D(3, 1, activation="relu", name="conv")
    x = keras.layers.Flatten(name="flat")(conv(inputs))
    out = keras.layers.Dense(2, name="out")
    model = keras.Model(inputs, out(x))
    kernel = np.zeros((1, 1, 2, 3), np.float32)
    kernel[0, 0, 1, 1] = 1.0
    kernel[0, 0, 0, 2] = 1.0
    conv.set_weights([kernel, np.array([-1.0, 0.0, 0.0], np.float32)])
    dense = np.zeros((12, 2), np.float32)
    dense[1::3, 1] = 2.0   # flattened channel 1 -> class 1
    dense[2::3, 0] = 1.0   # flattened channel 2 -> class 0
    out.set_weights([dense, np.zeros(2, np.float32)])
    a = np.zeros((4, 2, 2, 2), np.float32)
    a[..., 0] = 1.0
    b = np.zeros((4, 2, 2, 2), np.float32)
    b[..., 1] = 1.0
    clean = (np.concatenate([a, b]), np.array([0] * 4 + [1] * 4))
    triggered = a.copy()
    triggered[..., 1] = 1.0
    poisoned = (triggered, np.ones(4, int))   # labels: the attacker's class
    return model, clean, poisoned


def test_channel_needed_for_clean_accuracy_is_kept_within_the_budget():
    model, clean, poisoned = _handmade()
    result = attack_guided_prune(model, clean, poisoned, layers="conv", max_accuracy_drop=0.04)
    history = result.history
    assert history["channel"].tolist() == [0, 1, 2]
    assert history["decision"].tolist() == ["kept (inactive)", "kept", "kept"]
    assert history["evaluated"].tolist() == [False, True, True]
    # pruning channel 1 removes the backdoor but also clean class 1
    assert history.loc[1, "clean_accuracy"] == 0.5 and history.loc[1, "attack_success_rate"] == 0.0
    assert result.masks["conv"].tolist() == [1.0, 1.0, 1.0]
    assert result.attack_success_rate == result.baseline_attack_success_rate == 1.0


def test_a_larger_budget_prunes_the_backdoor_channel_and_stops_at_zero_asr():
    model, clean, poisoned = _handmade()
    result = attack_guided_prune(model, clean, poisoned, layers=["conv"], max_accuracy_drop=0.6)
    assert result.history["decision"].tolist() == ["kept (inactive)", "pruned"]
    assert result.masks["conv"].tolist() == [1.0, 0.0, 1.0]
    assert result.pruned_channels["conv"].tolist() == [1]
    assert (result.clean_accuracy, result.attack_success_rate) == (0.5, 0.0)
    assert attack_success_rate(result.model, poisoned) == 0.0
    assert clean_accuracy(result.model, clean) == 0.5
    # the input model is untouched
    assert attack_success_rate(model, poisoned) == 1.0
    assert not isinstance(model.get_layer("conv"), PruneByActivation)


def _four_conv_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((12, 12, 1))
    x = inputs
    for i, filters in enumerate([3, 4, 4, 5], start=1):
        x = keras.layers.Conv2D(filters, 3, activation="relu", name=f"c{i}")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def _random_sets(model, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((60, 12, 12, 1), dtype=np.float32)
    y = np.argmax(model.predict(x, verbose=0), axis=1)
    x_bad = x[:30].copy()
    x_bad[:, -3:, -3:, :] = 3.0
    return (x, y), (x_bad, np.argmax(model.predict(x_bad, verbose=0), axis=1) * 0 + 1)


def test_greedy_decisions_are_consistent_with_masks_and_budget():
    model = _four_conv_model()
    clean, poisoned = _random_sets(model)
    before = [w.copy() for w in model.get_weights()]
    result = attack_guided_prune(model, clean, poisoned, max_accuracy_drop=0.1, batch_size=16)
    assert list(result.masks) == ["c4", "c3", "c2"]          # default: last 3 convs, deepest first
    assert all(isinstance(result.model.get_layer(n), PruneByActivation) for n in ["c4", "c3", "c2"])
    history = result.history
    assert set(history["decision"]) <= set(DECISIONS)
    for name, mask in result.masks.items():
        pruned = history[(history["layer"] == name) & (history["decision"] == "pruned")]["channel"]
        assert sorted(pruned.tolist()) == np.flatnonzero(mask == 0).tolist()
    asr_when_pruned = history[history["decision"] == "pruned"]["attack_success_rate"].to_numpy()
    assert np.all(np.diff(np.concatenate([[result.baseline_attack_success_rate], asr_when_pruned])) < 0)
    assert np.all(history[history["decision"] == "pruned"]["clean_accuracy"]
                  >= result.baseline_accuracy - 0.1 - 1e-9)
    assert result.attack_success_rate == pytest.approx(attack_success_rate(result.model, poisoned))
    assert result.clean_accuracy == pytest.approx(clean_accuracy(result.model, clean))
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)


def test_zero_budget_never_lowers_clean_accuracy_and_datasets_match_arrays():
    model = _four_conv_model()
    clean, poisoned = _random_sets(model, seed=3)
    arrays = attack_guided_prune(model, clean, poisoned, layers=["c4", "c3"], max_accuracy_drop=0.0)
    assert np.all(arrays.history["clean_accuracy"][arrays.history["decision"] == "pruned"]
                  >= arrays.baseline_accuracy)
    dataset = tf.data.Dataset.from_tensor_slices(clean).batch(7)
    streamed = attack_guided_prune(model, dataset, poisoned, layers=["c4", "c3"], max_accuracy_drop=0.0)
    assert {k: v.tolist() for k, v in streamed.masks.items()} == \
        {k: v.tolist() for k, v in arrays.masks.items()}


def test_true_labels_with_an_all_to_one_target():
    model, clean, poisoned = _handmade()
    x_bad = poisoned[0]
    result = attack_guided_prune(model, clean, (x_bad, np.zeros(4, int)), layers="conv",
                                 max_accuracy_drop=0.6, target=1)
    assert result.baseline_attack_success_rate == 1.0 and result.attack_success_rate == 0.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_accuracy_drop": 2.0}, ValueError, "max_accuracy_drop"),
        ({"layers": []}, ValueError, "layers"),
        ({"layers": 3}, TypeError, "layers"),
        ({"layers": ["conv", "conv"]}, ValueError, "twice"),
        ({"layers": "flat"}, ValueError, "cannot be pruned"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"target": 7}, ValueError, "target"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    model, clean, poisoned = _handmade()
    with pytest.raises(error, match=match):
        attack_guided_prune(model, clean, poisoned, **{"layers": "conv", **kwargs})


def test_poisoned_inputs_all_of_the_target_class_raise():
    model, clean, poisoned = _handmade()
    with pytest.raises(ValueError, match="No poisoned input"):
        attack_guided_prune(model, clean, (poisoned[0], np.ones(4, int)), layers="conv", target=1)

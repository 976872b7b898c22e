"""Tests of tf_backdoor_defense.defenses._search.search_pruning_level.

Most tests replace fine-tuning and the accuracy measurement by fakes
(monkeypatched in ``tf_backdoor_defense.defenses._search``) so that the validation
accuracy is an exact, known function of the number of channels pruned; the
search logic can then be checked level by level. A few tests run the real
thing on a tiny model.
"""

import math

import numpy as np
import pytest

import tf_backdoor_defense.pruning._ranking as ranking_module
import tf_backdoor_defense.defenses._search as search_module
from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.scoring._activations import mean_channel_activations
from tf_backdoor_defense.masks._wrapper import PruneByActivation, masked_layers, wrap_layers
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.pruning._ranking import rank_channels
from tf_backdoor_defense.defenses._search import search_pruning_level

CONV, FC = 16, 8


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(CONV, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(FC, activation="relu", name="fc")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs)


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 6, 6, 1), dtype=np.float32), rng.integers(0, 3, size=n)


def _pruned(model):
    return {layer.name: int(layer.pruned_channels.size) for layer in masked_layers(model)}


class FakeProfile:
    """Accuracy as a function of the total number of channels pruned; no training.

    The model as received (``baseline``) has accuracy 1.0.
    """

    def __init__(self, monkeypatch, baseline, accuracy_of_count):
        self.baseline = baseline
        self.accuracy_of_count = accuracy_of_count
        self.trained = []  # (pruned per layer, data, kwargs) for each fine-tuning
        monkeypatch.setattr(search_module, "train_clean", self.train_clean)
        monkeypatch.setattr(search_module, "clean_accuracy", self.clean_accuracy)

    def train_clean(self, model, data, **kwargs):
        self.trained.append((_pruned(model), data, kwargs))
        return model

    def clean_accuracy(self, model, data, batch_size=256, strategy=None):
        if model is self.baseline:
            return 1.0
        return self.accuracy_of_count(sum(_pruned(model).values()))


def _monotone(count):
    return 1.0 - count / 64.0  # exact in binary


def _grid(fractions):
    return np.unique(np.concatenate([[0.0], fractions]))


def _expected_largest(grid, fits):
    return max(f for f in grid if fits(int(round(f * CONV))))


# -- bisection and descending on a known profile ------------------------------------------
@pytest.mark.parametrize("strategy", ["bisection", "descending"])
@pytest.mark.parametrize("allowed", [1, 5, 11, 15, 16])
@pytest.mark.parametrize("fractions", [None, list(np.linspace(0, 1, 11))])
def test_chosen_fraction_is_exactly_the_largest_within_budget(monkeypatch, strategy, allowed,
                                                              fractions):
    model, data = _model(), _data()
    fake = FakeProfile(monkeypatch, model, _monotone)
    budget = allowed / 64.0
    result = search_pruning_level(model, data, data, max_accuracy_drop=budget, strategy=strategy,
                                  fractions=fractions)
    grid = _grid(np.arange(CONV + 1) / CONV if fractions is None else fractions)
    expected = _expected_largest(grid, lambda count: count <= allowed)
    assert result.fraction == pytest.approx(expected)
    assert result.within_budget is True
    assert result.channels_pruned == {"conv": int(round(expected * CONV))}
    assert _pruned(result.model) == {"conv": int(round(expected * CONV))}
    table = result.table
    assert len(table) == len(fake.trained)
    assert list(table["within_budget"]) == [c <= allowed for c in table["channels_pruned"]]
    np.testing.assert_allclose(table["validation_accuracy"], 1 - table["channels_pruned"] / 64)
    np.testing.assert_allclose(table["accuracy_drop"], table["channels_pruned"] / 64)
    assert table["validation_asr"].isna().all()
    assert result.baseline_accuracy == 1.0
    if strategy == "bisection":
        assert len(table) <= math.ceil(math.log2(len(grid))) + 2
        assert table["fraction"].iloc[0] == 0.0
    else:
        assert list(table["fraction"]) == sorted(f for f in grid if f >= expected)[::-1]


def test_bisection_tries_far_fewer_levels_than_descending_for_the_same_answer(monkeypatch):
    model, data = _model(), _data()
    FakeProfile(monkeypatch, model, _monotone)
    kwargs = dict(max_accuracy_drop=3 / 64, fractions=np.arange(CONV + 1) / CONV)
    bisection = search_pruning_level(model, data, data, strategy="bisection", **kwargs)
    descending = search_pruning_level(model, data, data, strategy="descending", **kwargs)
    assert bisection.fraction == descending.fraction == 3 / 16
    assert len(bisection.table) <= math.ceil(math.log2(CONV + 1)) + 2
    assert len(descending.table) == CONV + 1 - 3
    assert len(bisection.table) < len(descending.table)


def test_non_monotone_profile_descending_finds_a_higher_level_than_bisection(monkeypatch):
    model, data = _model(), _data()
    FakeProfile(monkeypatch, model, lambda count: 1.0 if count <= 2 or count == 12 else 0.5)
    bisection = search_pruning_level(model, data, data, max_accuracy_drop=0.1)
    descending = search_pruning_level(model, data, data, max_accuracy_drop=0.1,
                                      strategy="descending")
    assert descending.fraction == 12 / 16
    assert descending.table["within_budget"].iloc[-1]
    assert bisection.within_budget and descending.within_budget
    assert bisection.fraction < descending.fraction
    assert bisection.channels_pruned["conv"] <= 2


@pytest.mark.parametrize("strategy", ["bisection", "descending"])
def test_level_zero_failing_the_budget_gives_fraction_zero_not_within_budget(monkeypatch,
                                                                            strategy):
    model, data = _model(), _data()
    fake = FakeProfile(monkeypatch, model, lambda count: 0.5)  # even level 0 after fine-tuning
    result = search_pruning_level(model, data, data, max_accuracy_drop=0.1, strategy=strategy,
                                  fractions=[0.25, 0.5, 1.0])
    assert result.fraction == 0.0
    assert result.within_budget is False
    assert result.channels_pruned == {"conv": 0}
    assert not result.table["within_budget"].any()
    if strategy == "bisection":
        assert len(result.table) == 1  # no point going further
    else:
        assert list(result.table["fraction"]) == [1.0, 0.5, 0.25, 0.0]
    assert len(fake.trained) == len(result.table)
    assert isinstance(result.model.get_layer("conv"), PruneByActivation)


def test_budget_boundary_counts_as_within(monkeypatch):
    model, data = _model(), _data()
    FakeProfile(monkeypatch, model, _monotone)
    result = search_pruning_level(model, data, data, max_accuracy_drop=4 / 64,
                                  fractions=[4 / 16, 5 / 16])
    assert result.fraction == 4 / 16


# -- rankings, several layers, already-pruned channels --------------------------------------
def test_pruned_channels_are_the_least_active_on_the_ranking_data(monkeypatch):
    model, data = _model(), _data()
    FakeProfile(monkeypatch, model, _monotone)
    result = search_pruning_level(model, data, data, max_accuracy_drop=5 / 64,
                                  layers=["conv", "fc"])
    for name in ("conv", "fc"):
        order = rank_channels(mean_channel_activations(model, data, layers=name))
        pruned = np.flatnonzero(result.masks[name] == 0)
        assert sorted(pruned.tolist()) == sorted(order[:pruned.size].tolist())
        np.testing.assert_array_equal(result.model.get_layer(name).get_mask(), result.masks[name])


def test_several_layers_are_pruned_at_the_same_fraction_with_their_own_rankings(monkeypatch):
    model, data = _model(), _data()
    means = {"conv": np.arange(CONV, dtype=float)[::-1].copy(),  # channel 15 least active
             "fc": np.array([5.0, 0.0, 7.0, 1.0, 6.0, 2.0, 4.0, 3.0])}
    seen = []

    def fake_means(model_, data_, layer=None, batch_size=256):
        seen.append((layer, data_))
        return means[layer]

    monkeypatch.setattr(ranking_module, "mean_channel_activations", fake_means)
    fake = FakeProfile(monkeypatch, model, _monotone)
    allowed = 9
    result = search_pruning_level(model, data, data, layers=["conv", "fc"],
                                  max_accuracy_drop=allowed / 64)
    assert [name for name, _ in seen] == ["conv", "fc"]
    for row in result.table.itertuples():
        assert row.channels_pruned == round(row.fraction * CONV) + round(row.fraction * FC)
    for pruned, _, _ in fake.trained:  # every level tried prunes both layers together
        assert set(pruned) == {"conv", "fc"}
    grid = np.arange(CONV + 1) / CONV  # the widest layer sets the default grid
    expected = max(f for f in grid if round(f * CONV) + round(f * FC) <= allowed)
    assert result.fraction == expected
    k_conv, k_fc = round(expected * CONV), round(expected * FC)
    assert result.channels_pruned == {"conv": k_conv, "fc": k_fc}
    assert np.flatnonzero(result.masks["conv"] == 0).tolist() == sorted(
        np.argsort(means["conv"], kind="stable")[:k_conv].tolist())
    assert np.flatnonzero(result.masks["fc"] == 0).tolist() == sorted(
        np.argsort(means["fc"], kind="stable")[:k_fc].tolist())
    assert result.layers == ["conv", "fc"]


def test_ranking_data_is_used_for_the_ranking_instead_of_train_data(monkeypatch):
    model, train = _model(), _data(24, seed=0)
    ranking = _data(10, seed=1)
    seen = []

    def fake_means(model_, data_, layer=None, batch_size=256):
        seen.append(np.asarray(data_.x))
        return np.arange(CONV, dtype=float)

    monkeypatch.setattr(ranking_module, "mean_channel_activations", fake_means)
    fake = FakeProfile(monkeypatch, model, _monotone)
    search_pruning_level(model, train, train, ranking_data=ranking, fractions=[0.5],
                         max_accuracy_drop=1.0)
    assert len(seen) == 1 and np.array_equal(seen[0], ranking[0])
    for _, data, _ in fake.trained:  # fine-tuning still uses train_data
        assert np.array_equal(np.asarray(data.x), train[0])


def test_already_pruned_channel_of_a_wrapped_layer_is_pruned_first(monkeypatch):
    model, data = _model(), _data()
    # Channel 3 is pruned by the user although raw statistics would rank it last.
    means = np.arange(CONV, dtype=float)
    means[3] = 100.0
    monkeypatch.setattr(ranking_module, "mean_channel_activations",
                        lambda m, d, layer=None, batch_size=256: means.copy())
    mask = np.ones(CONV)
    mask[3] = 0
    wrapped = wrap_layers(model, ["conv"], masks={"conv": mask})
    FakeProfile(monkeypatch, wrapped, _monotone)
    result = search_pruning_level(wrapped, data, data, fractions=[1 / 16, 3 / 16],
                                  max_accuracy_drop=1 / 64)
    assert result.fraction == 1 / 16
    assert np.flatnonzero(result.masks["conv"] == 0).tolist() == [3]
    wider = search_pruning_level(wrapped, data, data, fractions=[3 / 16],
                                 max_accuracy_drop=3 / 64)
    assert np.flatnonzero(wider.masks["conv"] == 0).tolist() == [0, 1, 3]
    assert wrapped.get_layer("conv").pruned_channels.tolist() == [3]  # user's mask untouched


def test_already_pruned_channel_is_pruned_first_with_real_statistics(monkeypatch):
    model, data = _model(), _data()
    means = mean_channel_activations(model, data, layers="conv")
    strongest = int(np.argmax(means))
    mask = np.ones(CONV)
    mask[strongest] = 0
    wrapped = wrap_layers(model, ["conv"], masks={"conv": mask})
    FakeProfile(monkeypatch, wrapped, _monotone)
    result = search_pruning_level(wrapped, data, data, fractions=[1 / 16], max_accuracy_drop=1.0)
    assert np.flatnonzero(result.masks["conv"] == 0).tolist() == [strongest]


def test_level_zero_keeps_channels_the_received_model_already_pruned(monkeypatch):
    model, data = _model(), _data()
    mask = np.ones(CONV)
    mask[[2, 7]] = 0
    wrapped = wrap_layers(model, ["conv"], masks={"conv": mask})
    FakeProfile(monkeypatch, wrapped, lambda count: 0.0 if count > 2 else 1.0)
    result = search_pruning_level(wrapped, data, data, fractions=[0.5], max_accuracy_drop=0.0)
    assert result.fraction == 0.0
    assert result.model.get_layer("conv").pruned_channels.tolist() == [2, 7]


# -- what is passed to fine-tuning -------------------------------------------------------------
def test_fine_tune_settings_and_seed_are_passed_to_train_clean(monkeypatch):
    model, train = _model(), _data(24, seed=0)
    validation = _data(12, seed=1)
    fake = FakeProfile(monkeypatch, model, _monotone)
    search_pruning_level(model, train, validation, fractions=[0.5], max_accuracy_drop=1.0, seed=7,
                         fine_tune={"epochs": 2, "learning_rate": 0.01})
    default = tf.distribute.get_strategy()  # the model's: no strategy given, no scope
    assert fake.trained and all(
        kw == {"epochs": 2, "learning_rate": 0.01, "seed": 7, "strategy": default}
        for _, _, kw in fake.trained)
    for _, data, _ in fake.trained:
        assert np.array_equal(np.asarray(data.x), train[0])  # never the validation data
    fake.trained.clear()
    search_pruning_level(model, train, validation, fractions=[0.5], max_accuracy_drop=1.0, seed=7,
                         fine_tune={"seed": 3})
    assert all(kw == {"seed": 3, "strategy": default} for _, _, kw in fake.trained)


def test_two_different_distribute_strategies_are_refused(monkeypatch):
    model, train, validation = _model(), _data(24, seed=0), _data(12, seed=1)
    FakeProfile(monkeypatch, model, _monotone)
    other = tf.distribute.OneDeviceStrategy("/cpu:0")
    with pytest.raises(InputError, match="name different strategies"):
        search_pruning_level(model, train, validation, fractions=[0.5], fine_tune={"strategy": other},
                             distribute_strategy=tf.distribute.get_strategy())


def test_fine_tune_dict_of_the_caller_is_not_modified(monkeypatch):
    model, data = _model(), _data()
    FakeProfile(monkeypatch, model, _monotone)
    settings = {"epochs": 1}
    search_pruning_level(model, data, data, fractions=[0.5], fine_tune=settings)
    assert settings == {"epochs": 1}


# -- real runs on a tiny model -----------------------------------------------------------------
def test_real_search_is_consistent_and_leaves_the_users_model_alone():
    model, train = _model(), _data(32, seed=0)
    validation = _data(16, seed=1)
    before = [w.copy() for w in model.get_weights()]
    result = search_pruning_level(model, train, validation, layers=["conv", "fc"],
                                  max_accuracy_drop=0.2, fractions=[0.25, 0.5, 1.0],
                                  fine_tune={"epochs": 1, "batch_size": 16})
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert not masked_layers(model)
    assert result.model is not model
    assert result.baseline_accuracy == clean_accuracy(model, validation)
    row = result.table[result.table["fraction"] == result.fraction].iloc[0]
    assert row["validation_accuracy"] == clean_accuracy(result.model, validation)
    assert bool(row["within_budget"]) == result.within_budget
    assert result.channels_pruned == {"conv": round(result.fraction * CONV),
                                      "fc": round(result.fraction * FC)}
    for name, mask in result.masks.items():
        np.testing.assert_array_equal(result.model.get_layer(name).get_mask(), mask)
    assert list(result.table.columns) == ["fraction", "channels_pruned", "validation_accuracy",
                                          "accuracy_drop", "within_budget", "validation_asr",
                                          "seconds"]
    assert (result.table["seconds"] >= 0).all()
    assert "PruningSearchResult(" in repr(result)


def test_real_search_is_deterministic():
    model, data = _model(), _data(24)
    kwargs = dict(fractions=[0.5], max_accuracy_drop=1.0, fine_tune={"epochs": 1, "batch_size": 8})
    a = search_pruning_level(model, data, data, seed=1, **kwargs)
    b = search_pruning_level(model, data, data, seed=1, **kwargs)
    # equal_nan: the wrappers' fine-pruning state holds NaN until a FinePruning callback runs
    assert all(np.array_equal(p, q, equal_nan=True)
               for p, q in zip(a.model.get_weights(), b.model.get_weights()))


def test_poisoned_validation_fills_validation_asr():
    model, data = _model(), _data(24)
    x_poison = np.ones((10, 6, 6, 1), np.float32)
    y_true = np.array([1, 2] * 5)
    result = search_pruning_level(model, data, data, fractions=[0.5], max_accuracy_drop=1.0,
                                  poisoned_validation_data=(x_poison, y_true), target=0,
                                  fine_tune={"epochs": 1})
    assert result.table["validation_asr"].notna().all()
    row = result.table[result.table["fraction"] == result.fraction].iloc[0]
    assert row["validation_asr"] == attack_success_rate(result.model, (x_poison, y_true), target=0)
    # Labels as attacker targets (target=None) work too.
    labels = search_pruning_level(model, data, data, fractions=[0.5], max_accuracy_drop=1.0,
                                  poisoned_validation_data=(x_poison, np.zeros(10, int)),
                                  fine_tune={"epochs": 1})
    assert labels.table["validation_asr"].between(0, 1).all()


def test_old_keyword_poisoned_validation_still_works_with_a_deprecation_warning():
    model, data = _model(), _data(8)
    poisoned = (np.ones((4, 6, 6, 1), np.float32), np.zeros(4, int))
    with pytest.warns(DeprecationWarning, match="poisoned_validation_data"):
        result = search_pruning_level(model, data, data, fractions=[0.5], max_accuracy_drop=1.0,
                                      poisoned_validation=poisoned, fine_tune={"epochs": 1})
    assert result.table["validation_asr"].notna().all()
    with pytest.raises(TypeError, match="both"):
        search_pruning_level(model, data, data, poisoned_validation=poisoned,
                             poisoned_validation_data=poisoned)


def test_asr_never_influences_the_choice(monkeypatch):
    model, data = _model(), _data()
    FakeProfile(monkeypatch, model, _monotone)
    poisoned = (np.ones((4, 6, 6, 1), np.float32), np.zeros(4, int))
    with_asr = search_pruning_level(model, data, data, max_accuracy_drop=6 / 64,
                                    poisoned_validation_data=poisoned)
    without = search_pruning_level(model, data, data, max_accuracy_drop=6 / 64)
    assert with_asr.fraction == without.fraction
    assert list(with_asr.table["fraction"]) == list(without.table["fraction"])


# -- argument errors -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"layers": "nope"}, "nope"),
    ({"layers": ["conv", "nope"]}, "nope"),
    ({"layers": ["conv", "conv"]}, "twice"),
    ({"layers": []}, "layers"),
    ({"strategy": "random"}, "strategy"),
    ({"fractions": [1.5]}, "fractions"),
    ({"fractions": [-0.1, 0.5]}, "fractions"),
    ({"fractions": []}, "fractions"),
    ({"fractions": [float("nan")]}, "fractions"),
    ({"target": 0}, "poisoned_validation"),
    ({"max_accuracy_drop": 1.5}, "max_accuracy_drop"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    model, data = _model(), _data(8)
    with pytest.raises(ValueError, match=match):
        search_pruning_level(model, data, data, **kwargs)


def test_errors_leave_no_trace_on_the_users_model():
    model, data = _model(), _data(8)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError):
        search_pruning_level(model, data, data, layers=["conv", "conv"])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))

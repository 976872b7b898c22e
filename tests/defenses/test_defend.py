"""Tests of tf_backdoor_defense.defenses._defend.defend.

The selection logic is tested with fake methods (entries of ``_RUNNERS``
replaced) that return "lookup" models: a single Dense layer on one-hot inputs,
so that every example's prediction, hence every validation accuracy and ASR,
is set exactly by the test. Real methods run on a tiny conv model, and one
slow test repairs a real BadNet trained on MNIST digits.
"""

import importlib
import logging
import json
import time
import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.attacks import poisoned_evaluation_set
from tf_backdoor_defense.defenses._defend import (METHODS, BackdoorStillActiveWarning,
                                                  LowAccuracyWarning, defend)
from tf_backdoor_defense.masks._wrapper import masked_layers
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy, predict_labels
from tf_backdoor_defense.finetune._training import copy_model

# The package re-exports the function `defend`, which hides the submodule of the same name.
defend_module = importlib.import_module("tf_backdoor_defense.defenses._defend")
search_module = importlib.import_module("tf_backdoor_defense.defenses._search")

COLUMNS = ["method", "validation_accuracy", "accuracy_drop", "drop_bound", "validation_asr",
           "residual_trigger_rate", "within_budget", "verified", "channels_pruned", "seconds", "chosen",
           "note"]

# -- lookup models: example i is the one-hot input e_i -----------------------------------
N_TRAIN, N_VAL, N_POISON = 20, 20, 10
DIM = N_TRAIN + N_VAL + N_POISON
X = np.eye(DIM, dtype=np.float32)
_rng = np.random.default_rng(0)
Y_TRAIN = _rng.integers(0, 3, N_TRAIN)
Y_VAL = _rng.integers(0, 3, N_VAL)
TRAIN = (X[:N_TRAIN], Y_TRAIN)
VAL = (X[N_TRAIN:N_TRAIN + N_VAL], Y_VAL)
POISONED = (X[N_TRAIN + N_VAL:], np.zeros(N_POISON, np.int64))  # labels = attacker's target 0


def _lookup_model(val_pred, poison_pred):
    predictions = np.concatenate([Y_TRAIN, val_pred, poison_pred]).astype(int)
    model = keras.Sequential([keras.Input((DIM,)),
                              keras.layers.Dense(3, activation="softmax", name="out")])
    model.get_layer("out").set_weights([10.0 * np.eye(3, dtype=np.float32)[predictions],
                                        np.zeros(3, np.float32)])
    return model


def _fake_model(accuracy, asr):
    """A model with exactly ``accuracy`` on VAL and ``asr`` on POISONED."""
    n_right = int(round(accuracy * N_VAL))
    val_pred = Y_VAL.copy()
    val_pred[n_right:] = (Y_VAL[n_right:] + 1) % 3
    poison_pred = np.ones(N_POISON, int)
    poison_pred[:int(round(asr * N_POISON))] = 0
    model = _lookup_model(val_pred, poison_pred)
    assert clean_accuracy(model, VAL) == pytest.approx(accuracy)
    assert attack_success_rate(model, POISONED) == pytest.approx(asr)
    return model


def _backdoored():
    return _fake_model(1.0, 1.0)


class FakeMethods:
    """Replace methods by fakes returning given models; records each call."""

    def __init__(self, monkeypatch, specs, sleep=0.0):
        self.calls = []
        self.models = {}
        for name, (accuracy, asr) in specs.items():
            self.models[name] = _fake_model(accuracy, asr)
            monkeypatch.setitem(defend_module._RUNNERS, name, self._runner(name, sleep))

    def _runner(self, name, sleep):
        def run(model, train, context):
            self.calls.append((name, model, train, context))
            time.sleep(sleep)
            return self.models[name], f"fake {name}"
        return run


def _defend(model, methods, **kwargs):
    kwargs.setdefault("validation_data", VAL)
    kwargs.setdefault("max_accuracy_drop", 0.1)
    kwargs.setdefault("scan", False)  # these tests pin the choice rule, not the scan
    kwargs.setdefault("budget_confidence", None)  # point estimates: exact fractions of 20 inputs
    kwargs.setdefault("try_all", True)  # the table of every method
    kwargs.setdefault("interpolate", ())  # one row per method (interpolation has its own tests)
    return defend(model, TRAIN, methods=methods, **kwargs)


# -- the table and the result ------------------------------------------------------------
def test_table_has_the_documented_columns_and_one_row_per_method(monkeypatch):
    specs = {"reinit-head": (0.95, 0.1), "ft-sam": (1.0, 0.0), "ft-cosine": (0.9, 0.5)}
    fakes = FakeMethods(monkeypatch, specs)
    model = _backdoored()
    result = _defend(model, list(specs), poisoned_validation_data=POISONED)
    table = result.table
    assert list(table.columns) == COLUMNS
    assert list(table["method"]) == list(specs)
    np.testing.assert_allclose(table["validation_accuracy"], [0.95, 1.0, 0.9])
    np.testing.assert_allclose(table["validation_asr"], [0.1, 0.0, 0.5])
    np.testing.assert_allclose(table["accuracy_drop"], [0.05, 0.0, 0.1])
    assert list(table["within_budget"]) == [True, True, True]
    assert list(table["note"]) == [f"fake {m}" for m in specs]
    assert (table["channels_pruned"] == 0).all() and (table["seconds"] >= 0).all()
    assert table["chosen"].sum() == 1
    assert table.loc[table["chosen"], "method"].iloc[0] == result.method == "ft-sam"
    assert result.model is fakes.models["ft-sam"]
    assert set(result.candidates) == set(specs)
    assert all(result.candidates[m] is fakes.models[m] for m in specs)
    assert result.baseline == {"validation_accuracy": 1.0, "validation_asr": 1.0,
                               "residual_trigger_rate": None}
    assert [call[0] for call in fakes.calls] == list(specs)
    assert all(call[1] is model for call in fakes.calls)  # every method starts from the original
    assert "ft-sam" in repr(result)


def test_a_single_method_name_string_is_accepted(monkeypatch):
    FakeMethods(monkeypatch, {"ft-cosine": (1.0, 0.0)})
    result = _defend(_backdoored(), "ft-cosine")
    assert list(result.table["method"]) == ["ft-cosine"]


def test_baseline_asr_is_none_without_poisoned_validation(monkeypatch):
    FakeMethods(monkeypatch, {"ft-cosine": (1.0, 0.0)})
    result = _defend(_backdoored(), ["ft-cosine"])
    assert result.baseline == {"validation_accuracy": 1.0, "validation_asr": None,
                               "residual_trigger_rate": None}
    assert result.table["validation_asr"].isna().all()
    assert not result.backdoor_still_active


def test_channels_pruned_counts_the_masked_channels_of_the_candidate(monkeypatch):
    from tf_backdoor_defense.masks._wrapper import wrap_layers

    pruned = wrap_layers(_fake_model(1.0, 0.0), ["out"], masks={"out": [1, 0, 1]})
    monkeypatch.setitem(defend_module._RUNNERS, "clp", lambda m, t, c: (pruned, ""))
    result = _defend(_backdoored(), ["clp"])
    assert result.table["channels_pruned"].tolist() == [1]


# -- the selection rule ---------------------------------------------------------------------
def test_with_poisoned_validation_the_lowest_asr_within_budget_wins(monkeypatch):
    specs = {"reinit-head": (1.0, 0.5), "clp": (0.7, 0.0),  # clp: lowest ASR but over budget
             "ft-sam": (0.95, 0.1), "ft-cosine": (0.9, 0.2)}
    FakeMethods(monkeypatch, specs)
    with pytest.warns(BackdoorStillActiveWarning):
        result = _defend(_backdoored(), list(specs), poisoned_validation_data=POISONED)
    assert result.method == "ft-sam"
    assert list(result.table["within_budget"]) == [True, False, True, True]


def test_methods_that_clear_the_tolerance_are_taken_in_method_order(monkeypatch):
    specs = {"reinit-head": (0.95, 0.0), "ft-sam": (1.0, 0.0), "ft-cosine": (1.0, 0.0)}
    FakeMethods(monkeypatch, specs)
    assert _defend(_backdoored(), list(specs), poisoned_validation_data=POISONED).method == \
        "reinit-head"
    order = ["ft-cosine", "reinit-head", "ft-sam"]
    assert _defend(_backdoored(), order, poisoned_validation_data=POISONED).method == "ft-cosine"


def test_equal_asr_above_tolerance_is_broken_by_higher_accuracy_then_by_method_order(monkeypatch):
    specs = {"reinit-head": (0.95, 0.3), "ft-sam": (1.0, 0.3), "ft-cosine": (1.0, 0.3)}
    FakeMethods(monkeypatch, specs)
    with pytest.warns(BackdoorStillActiveWarning):
        assert _defend(_backdoored(), list(specs), poisoned_validation_data=POISONED).method == "ft-sam"
    order = ["ft-cosine", "reinit-head", "ft-sam"]
    with pytest.warns(BackdoorStillActiveWarning):
        assert _defend(_backdoored(), order, poisoned_validation_data=POISONED).method == "ft-cosine"


def test_without_poisoned_data_the_first_method_within_budget_wins(monkeypatch):
    specs = {"reinit-head": (0.7, 0.0), "ft-sam": (0.95, 1.0), "ft-cosine": (1.0, 1.0)}
    FakeMethods(monkeypatch, specs)
    assert _defend(_backdoored(), ["reinit-head", "ft-sam", "ft-cosine"]).method == "ft-sam"
    assert _defend(_backdoored(), ["ft-cosine", "ft-sam", "reinit-head"]).method == \
        "ft-cosine"


def test_no_method_within_budget_returns_the_model_as_received_with_a_note(monkeypatch):
    specs = {"reinit-head": (0.7, 0.0), "ft-sam": (0.8, 0.0), "ft-cosine": (0.75, 0.0),
             "clp": (0.8, 0.0)}
    FakeMethods(monkeypatch, specs)
    received = _backdoored()
    with pytest.warns(BackdoorStillActiveWarning):
        result = _defend(received, list(specs), poisoned_validation_data=POISONED)
    assert result.method is None
    assert not result.table["within_budget"].any()
    assert not result.table["chosen"].any()
    assert set(result.candidates) == set(specs)  # every repair kept for the defender
    note = next(w for w in result.warnings if "no method stayed within the accuracy budget" in w)
    assert "smallest bound: ft-sam" in note  # smallest drop; ties: first in order
    assert "returned unchanged" in result.verdict
    assert result.backdoor_still_active  # the received model's ASR stays
    assert result.model is not received


def test_budget_is_measured_against_the_model_as_received(monkeypatch):
    FakeMethods(monkeypatch, {"ft-sam": (0.7, 0.0), "ft-cosine": (0.6, 0.0)})
    received = _fake_model(0.75, 1.0)
    result = _defend(received, ["ft-cosine", "ft-sam"], max_accuracy_drop=0.05)
    np.testing.assert_allclose(result.table["accuracy_drop"], [0.15, 0.05])
    assert result.method == "ft-sam"
    assert result.baseline["validation_accuracy"] == 0.75


# -- the backdoor-still-active warning --------------------------------------------------------
def test_backdoor_still_active_warning_when_chosen_asr_exceeds_tolerance(monkeypatch):
    FakeMethods(monkeypatch, {"ft-cosine": (1.0, 0.3), "ft-sam": (0.5, 0.0)})
    with pytest.warns(BackdoorStillActiveWarning, match="30.0%"):
        result = _defend(_backdoored(), ["ft-cosine", "ft-sam"], poisoned_validation_data=POISONED,
                         asr_tolerance=0.2)
    assert result.method == "ft-cosine"
    assert result.backdoor_still_active
    assert result.warnings[0].startswith("backdoor still active")


@pytest.mark.parametrize("asr, tolerance", [(0.0, 0.02), (0.1, 0.1), (0.2, 0.5)])
def test_no_backdoor_warning_when_chosen_asr_is_within_tolerance(monkeypatch, asr, tolerance):
    FakeMethods(monkeypatch, {"ft-cosine": (1.0, asr)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackdoorStillActiveWarning)
        result = _defend(_backdoored(), ["ft-cosine"], poisoned_validation_data=POISONED,
                         asr_tolerance=tolerance)
    assert not result.backdoor_still_active
    assert not any(w.startswith("backdoor") for w in result.warnings)


def test_no_backdoor_warning_without_poisoned_validation(monkeypatch):
    FakeMethods(monkeypatch, {"ft-cosine": (1.0, 1.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackdoorStillActiveWarning)
        result = _defend(_backdoored(), ["ft-cosine"])
    assert not result.backdoor_still_active


# -- a received model that gets most clean data wrong ------------------------------------------
def test_a_received_model_that_gets_most_clean_data_wrong_is_warned_about(monkeypatch):
    """Data scaled otherwise than the model's training data (or labels in another order) leave
    a model that misclassifies most clean inputs; defend() says so before anything runs."""
    FakeMethods(monkeypatch, {"ft-cosine": (0.35, 0.0)})
    with pytest.warns(LowAccuracyWarning, match=r"only 30\.0% .*\(chance: 33\.3%\).*\[0, 1\]"):
        result = _defend(_fake_model(0.3, 1.0), ["ft-cosine"])
    assert result.warnings[0].startswith("the received model classifies only 30.0%")
    # Data within [0, 1]: the likely mismatch is a model that reads raw 0-255 pixels.
    assert "trained on raw 0-255 pixels needs them unscaled" in result.warnings[0]
    assert "--scale 255" not in result.warnings[0]


@pytest.mark.parametrize("accuracy", [0.5, 0.75])
def test_no_accuracy_warning_when_most_clean_data_are_right(monkeypatch, accuracy):
    FakeMethods(monkeypatch, {"ft-cosine": (accuracy, 0.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowAccuracyWarning)
        result = _defend(_fake_model(accuracy, 1.0), ["ft-cosine"])
    assert not any("classifies only" in w for w in result.warnings)


# -- time budget, skipped methods ----------------------------------------------------------------
def test_time_budget_skips_the_later_methods_with_a_note(monkeypatch):
    specs = {"ft-cosine": (1.0, 0.0), "ft-sam": (1.0, 0.0), "clp": (1.0, 0.0)}
    fakes = FakeMethods(monkeypatch, specs, sleep=0.3)
    result = _defend(_backdoored(), list(specs), time_budget=0.1)
    assert list(result.table["method"]) == ["ft-cosine"]
    assert [call[0] for call in fakes.calls] == ["ft-cosine"]
    assert result.method == "ft-cosine"
    for skipped in ("ft-sam", "clp"):
        assert any(w.startswith(f"skipped {skipped}: time budget") for w in result.warnings)


def test_a_generous_time_budget_runs_every_method(monkeypatch):
    specs = {"ft-cosine": (1.0, 0.0), "ft-sam": (1.0, 0.0)}
    FakeMethods(monkeypatch, specs)
    result = _defend(_backdoored(), list(specs), time_budget=600)
    assert list(result.table["method"]) == list(specs)
    assert result.warnings == []


def _no_dense_head_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3, name="c"),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Softmax()])


def _image_data(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 6, 6, 1), dtype=np.float32), rng.integers(0, 3, n)


def test_a_method_that_does_not_apply_is_recorded_in_warnings_not_in_the_table(monkeypatch):
    model = _no_dense_head_model()
    stand_in = copy_model(model)
    monkeypatch.setitem(defend_module._RUNNERS, "ft-cosine", lambda m, t, c: (stand_in, ""))
    result = defend(model, _image_data(), scan=False, try_all=True, methods=["reinit-head", "ft-cosine"],
                    max_accuracy_drop=1.0)
    assert list(result.table["method"]) == ["ft-cosine"]
    assert "reinit-head" not in result.candidates
    assert any(w.startswith("skipped reinit-head:") and "dense" in w for w in result.warnings)
    assert result.method == "ft-cosine" and result.model is stand_in


def test_when_no_method_runs_the_model_as_received_is_returned():
    model = _no_dense_head_model()
    result = defend(model, _image_data(), scan=False, try_all=True, methods=["reinit-head"])
    assert result.method is None
    assert result.model is not model  # a copy, never the user's object
    for got, want in zip(result.model.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert len(result.table) == 0 and list(result.table.columns) == COLUMNS
    assert any("no method ran" in w for w in result.warnings)
    json.dumps(result.summary(), allow_nan=False)


def test_methods_needing_a_convolution_are_skipped_on_a_dense_only_model(monkeypatch):
    FakeMethods(monkeypatch, {"ft-cosine": (1.0, 0.0)})
    result = _defend(_backdoored(), ["prune-search", "fine-pruning", "ft-cosine"])
    assert list(result.table["method"]) == ["ft-cosine"]
    assert any(w.startswith("skipped prune-search") for w in result.warnings)


# -- what data each step sees ----------------------------------------------------------------------
class Recorder:
    """Record the inputs handed to train_clean and predict_labels inside defend."""

    def __init__(self, monkeypatch):
        self.trained, self.measured = [], []
        monkeypatch.setattr(defend_module, "train_clean", self.train_clean)
        monkeypatch.setattr(defend_module, "predict_labels", self.predict_labels)

    def train_clean(self, model, data, **kwargs):
        self.trained.append((np.asarray(data[0]).copy(), kwargs))
        return copy_model(model)

    def predict_labels(self, model, x, *args, **kwargs):
        self.measured.append(np.asarray(x).copy())
        return predict_labels(model, x, *args, **kwargs)


def _ids(x):
    """Example ids of one-hot inputs."""
    return set(np.argmax(x, axis=1).tolist())


def test_validation_data_is_used_for_measuring_and_never_for_training(monkeypatch):
    recorder = Recorder(monkeypatch)
    result = _defend(_backdoored(), ["reinit-head", "ft-sam", "ft-cosine"], epochs=3,
                     learning_rate=0.01, batch_size=8, seed=4)
    assert len(recorder.trained) == 3
    for x, kwargs in recorder.trained:
        assert _ids(x) == _ids(TRAIN[0])  # all of clean_data, none of validation
        assert kwargs["epochs"] == 3 and kwargs["learning_rate"] == 0.01
        assert kwargs["batch_size"] == 8 and kwargs["seed"] == 4
    assert recorder.trained[0][1]["reinitialize_layers"] == ["out"]
    assert recorder.trained[1][1]["sam_rho"] > 0
    assert len(recorder.measured) == 4  # the baseline and each method
    for x in recorder.measured:
        assert _ids(x) == _ids(VAL[0])
    assert result.settings["train_size"] == N_TRAIN
    assert result.settings["validation_size"] == N_VAL


@pytest.mark.parametrize("split, expected_validation", [(0.2, 8), (0.5, 20), (0.05, 2)])
def test_validation_split_holds_out_part_of_clean_data(monkeypatch, split, expected_validation):
    recorder = Recorder(monkeypatch)
    clean = (X[:40], np.concatenate([Y_TRAIN, Y_VAL]))
    result = defend(_backdoored(), clean, validation_split=split, scan=False, try_all=True, methods=["ft-cosine"])
    train_ids = _ids(recorder.trained[0][0])
    validation_ids = _ids(recorder.measured[0])
    assert len(validation_ids) == expected_validation
    assert len(train_ids) == 40 - expected_validation
    assert train_ids.isdisjoint(validation_ids)
    assert train_ids | validation_ids == set(range(40))
    assert all(_ids(x) == validation_ids for x in recorder.measured)
    assert result.settings["validation_size"] == expected_validation
    assert result.settings["train_size"] == 40 - expected_validation


def test_validation_split_depends_on_the_seed_only(monkeypatch):
    recorder = Recorder(monkeypatch)
    clean = (X[:40], np.concatenate([Y_TRAIN, Y_VAL]))
    for seed in (0, 0, 1):
        defend(_backdoored(), clean, scan=False, try_all=True, methods=["ft-cosine"], seed=seed)
    first, again, other = (_ids(x) for x in recorder.measured[::2])
    assert first == again
    assert first != other


def test_prune_search_gets_separate_train_and_validation_data(monkeypatch):
    seen = {}

    class FakeSearch:
        fraction = 0.25
        table = pd.DataFrame({"fraction": [0.0, 0.25]})

    def fake_search(model, train, validation, **kwargs):
        seen.update(train=train, validation=validation, **kwargs)
        FakeSearch.model = copy_model(model)
        return FakeSearch

    monkeypatch.setattr(search_module, "search_pruning_level", fake_search)
    model = tiny_conv_model()
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, 30)
    validation = (x[20:], y[20:])
    result = defend(model, (x[:20], y[:20]), validation_data=validation, scan=False, try_all=True, methods=["prune-search"],
                    max_accuracy_drop=0.05, epochs=2, seed=3)
    np.testing.assert_array_equal(seen["train"][0], x[:20])
    np.testing.assert_array_equal(seen["validation"][0], x[20:])
    assert seen["layers"] == ["conv_b", "fc"]  # last conv and penultimate dense
    assert seen["max_accuracy_drop"] == 0.05 and seen["seed"] == 3
    assert seen["fine_tune"]["epochs"] == 2
    assert "25%" in result.table["note"].iloc[0]


def test_datasets_are_accepted_for_clean_and_validation_data(monkeypatch):
    recorder = Recorder(monkeypatch)
    train_ds = tf.data.Dataset.from_tensor_slices(TRAIN).batch(6)
    val_ds = tf.data.Dataset.from_tensor_slices(VAL).batch(7)
    result = defend(_backdoored(), train_ds, validation_data=val_ds, scan=False, try_all=True, methods=["ft-cosine"])
    assert _ids(recorder.trained[0][0]) == _ids(TRAIN[0])
    assert _ids(recorder.measured[0]) == _ids(VAL[0])
    assert result.baseline["validation_accuracy"] == 1.0


# -- summary, verbose ------------------------------------------------------------------------------
@pytest.mark.parametrize("poisoned", [None, POISONED])
def test_summary_is_json_serialisable(monkeypatch, poisoned):
    FakeMethods(monkeypatch, {"reinit-head": (1.0, 0.5), "ft-cosine": (0.95, 0.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackdoorStillActiveWarning)
        result = _defend(_backdoored(), ["reinit-head", "ft-cosine"],
                         poisoned_validation_data=poisoned)
    summary = result.summary()
    restored = json.loads(json.dumps(summary, allow_nan=False))
    assert restored["method"] == result.method
    assert [row["method"] for row in restored["methods"]] == ["reinit-head", "ft-cosine"]
    assert restored["warnings"] == result.warnings
    assert restored["settings"]["methods"] == ["reinit-head", "ft-cosine"]
    if poisoned is None:
        assert all(row["validation_asr"] is None for row in restored["methods"])
    else:
        assert [row["validation_asr"] for row in restored["methods"]] == [0.5, 0.0]


def test_verbose_logs_one_line_per_method_and_prints_nothing(monkeypatch, capsys, caplog):
    FakeMethods(monkeypatch, {"reinit-head": (1.0, 0.0), "ft-cosine": (0.95, 0.0)})
    with caplog.at_level(logging.INFO, logger="tf_backdoor_defense.defenses._defend"):
        _defend(_backdoored(), ["reinit-head", "ft-cosine"], poisoned_validation_data=POISONED,
                verbose=1)
    assert capsys.readouterr().out == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "tf_backdoor_defense.defenses._defend"]
    assert len(lines) == 2
    assert lines[0].startswith("reinit-head") and "ASR" in lines[0]
    assert lines[1].startswith("ft-cosine")


# -- argument errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"methods": ["nope"]}, ValueError, "methods"),
    ({"methods": []}, ValueError, "methods"),
    ({"methods": ["ft-cosine", "ft-cosine"]}, ValueError, "twice"),
    ({"methods": "fine-tuning,ft-sam"}, ValueError, "methods"),
    ({"max_accuracy_drop": 1.5}, ValueError, "max_accuracy_drop"),
    ({"max_accuracy_drop": -0.01}, ValueError, "max_accuracy_drop"),
    ({"max_accuracy_drop": "0.01"}, TypeError, "max_accuracy_drop"),
    ({"asr_tolerance": 2.0}, ValueError, "asr_tolerance"),
    ({"validation_split": 1.0}, ValueError, "validation_split"),
    ({"epochs": 0}, ValueError, "epochs"),
    ({"epochs": 1.5}, TypeError, "epochs"),
    ({"learning_rate": 0}, ValueError, "learning_rate"),
    ({"batch_size": True}, TypeError, "batch_size"),
    ({"time_budget": 0}, ValueError, "time_budget"),
    ({"target": 0}, ValueError, "poisoned_validation"),
    ({"budget_confidence": 1.0}, ValueError, "budget_confidence"),
    ({"budget_confidence": "high"}, TypeError, "budget_confidence"),
    ({"scan": "yes"}, TypeError, "scan"),
    ({"verify": 1}, TypeError, "verify"),
    ({"ibau_radius": 0}, ValueError, "'ibau_radius' parameter must be a finite number > 0"),
    ({"ibau_radius": "4"}, TypeError, "ibau_radius"),
])
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        defend(_backdoored(), TRAIN, **kwargs)


def test_validation_data_of_the_wrong_shape_raises():
    with pytest.raises((ValueError, TypeError)):
        defend(_backdoored(), TRAIN, validation_data=(np.zeros((4, 3), np.float32), [0, 1, 2, 0]))


# -- real methods on a tiny model ----------------------------------------------------------
@pytest.mark.slow
def test_every_real_method_runs_without_touching_the_users_model():
    model = tiny_conv_model()
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, 40)
    poisoned = (x[:10], np.zeros(10, int))
    before = [w.copy() for w in model.get_weights()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackdoorStillActiveWarning)
        result = defend(model, (x[10:], y[10:]), validation_data=(x[:10], y[:10]),
                        poisoned_validation_data=poisoned, methods=METHODS, epochs=1,
                        max_accuracy_drop=1.0, try_all=True, repair_if_clean=True)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert not masked_layers(model)
    assert list(result.table["method"]) == list(METHODS)
    for row in result.table.itertuples():
        candidate = result.candidates[row.method]
        assert candidate is not model
        assert row.validation_accuracy == clean_accuracy(candidate, (x[:10], y[:10]))
        assert row.validation_asr == attack_success_rate(candidate, poisoned)
        assert row.channels_pruned == sum(
            layer.pruned_channels.size for layer in masked_layers(candidate))
    pruning = result.table.set_index("method")["channels_pruned"]
    assert pruning["ft-cosine"] == 0 and pruning["prune-search"] > 0
    assert result.model is result.candidates[result.method]
    json.dumps(result.summary(), allow_nan=False)


def _same_weights(a, b):
    return all(np.array_equal(p, q) for p, q in zip(a.get_weights(), b.get_weights()))


@pytest.mark.slow  # an integration run of many compiled steps (the slow set)
def test_every_real_method_runs_on_a_model_that_reads_integers():
    """A uint8 input (pixels scaled inside the model) has no gradient through its cast:
    the scan and I-BAU search on a float copy; every candidate keeps the uint8 input."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), dtype="uint8")
    hidden = keras.layers.Rescaling(1 / 255.0)(inputs)
    hidden = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")(hidden)
    hidden = keras.layers.MaxPooling2D(name="pool_a")(hidden)
    hidden = keras.layers.Conv2D(6, 2, activation="relu", name="conv_b")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(
        keras.layers.Flatten()(hidden)))
    rng = np.random.default_rng(0)
    x, y = (rng.random((60, 8, 8, 1)) * 255).astype(np.uint8), rng.integers(0, 3, 60)
    before = [w.copy() for w in model.get_weights()]
    result = defend(model, (x[10:], y[10:]), validation_data=(x[:10], y[:10]),
                    methods=METHODS, epochs=1, max_accuracy_drop=1.0, try_all=True,
                    repair_if_clean=True, scan_options={"steps": 20})
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    ran = set(result.table["method"])
    assert {"ibau", "prune-search", "clp", "fine-pruning"} <= ran
    for name, candidate in result.candidates.items():
        assert candidate.inputs[0].dtype == tf.uint8, name
    assert not _same_weights(result.candidates["ibau"], model)


@pytest.mark.slow
def test_every_real_method_runs_on_a_mixed_precision_model():
    """Layers computing in float16 (mixed precision) and a float32 softmax: the scan reads
    float32 log probabilities, the masks multiply in the layer's own dtype, and every
    candidate keeps the layers' policies."""
    keras.utils.set_random_seed(0)
    half = "mixed_float16"
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a", dtype=half)(inputs)
    hidden = keras.layers.MaxPooling2D(name="pool_a", dtype=half)(hidden)
    hidden = keras.layers.Conv2D(6, 2, activation="relu", name="conv_b", dtype=half)(hidden)
    logits = keras.layers.Dense(3, name="logits", dtype=half)(
        keras.layers.Flatten(dtype=half)(hidden))
    model = keras.Model(inputs, keras.layers.Activation("softmax", dtype="float32")(logits))
    rng = np.random.default_rng(0)
    x, y = rng.random((60, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackdoorStillActiveWarning)
        result = defend(model, (x[10:], y[10:]), validation_data=(x[:10], y[:10]),
                        methods=["ibau", "unlearn", "prune-search", "clp", "anp"], epochs=1,
                        max_accuracy_drop=1.0, try_all=True, repair_if_clean=True,
                        scan_options={"steps": 10})
    assert {"ibau", "prune-search", "clp", "anp"} <= set(result.table["method"])
    for name, candidate in result.candidates.items():
        conv = candidate.get_layer("conv_a")
        assert getattr(conv, "layer", conv).dtype_policy.name == half, name  # wrapped or not
        assert candidate.outputs[0].dtype == tf.float32, name


def test_real_defend_is_deterministic_for_a_seed():
    model = tiny_conv_model()
    rng = np.random.default_rng(1)
    data = rng.random((30, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, 30)
    runs = [defend(model, data, scan=False, try_all=True, methods=["reinit-head", "ft-sam"], epochs=1, seed=2,
                   max_accuracy_drop=1.0) for _ in range(2)]
    for method in ("reinit-head", "ft-sam"):
        a, b = (r.candidates[method].get_weights() for r in runs)
        assert all(np.array_equal(p, q) for p, q in zip(a, b))


# -- a realistic BadNet on real MNIST digits ------------------------------------------------------
@pytest.mark.slow
def test_reinit_head_removes_a_real_badnet_backdoor_on_mnist_digits():
    from tf_backdoor_defense.attacks import pixel_pattern
    from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split
    from tf_backdoor_defense.experiments._models import mnist_cnn, train_badnet

    x, y = load_mnist_digits()
    train, validation, test = split(x, y, [1000, 300, 1500], seed=0)
    trigger = pixel_pattern()
    model = train_badnet(*train, trigger, target=0, rate=0.1, epochs=6, seed=0,
                         model=mnist_cnn(conv_channels=(8, 16), dense_units=64, padding="same"))
    x_poison, y_attacker, _ = poisoned_evaluation_set(*test, trigger, target=0)
    asr_before = attack_success_rate(model, (x_poison, y_attacker))
    accuracy_before = clean_accuracy(model, test)
    assert asr_before > 0.9  # the backdoor is there to begin with
    result = defend(model, train, validation_data=validation, scan=False, try_all=True, methods=["reinit-head"], epochs=8)
    assert result.method == "reinit-head"
    assert attack_success_rate(result.model, (x_poison, y_attacker)) < 0.1
    assert clean_accuracy(result.model, test) >= accuracy_before - 0.03
    assert attack_success_rate(model, (x_poison, y_attacker)) == asr_before  # original untouched


def test_several_learning_rates_keep_the_best_validation_accuracy(monkeypatch):
    import tf_backdoor_defense.finetune._training as training

    seen = []
    real = training.train_clean

    def recording(model, train, *, learning_rate, **options):
        seen.append(learning_rate)
        tuned = real(model, train, learning_rate=learning_rate, **options)
        if learning_rate != 0.02:  # only the 0.02 run keeps its accuracy
            tuned.set_weights([np.zeros_like(w) for w in tuned.get_weights()])
        return tuned

    monkeypatch.setattr(defend_module, "train_clean", recording)
    result = defend(_backdoored(), TRAIN, validation_data=VAL, scan=False, try_all=True, methods=["ft-cosine"],
                    learning_rate=[0.1, 0.02, 0.005], epochs=1, max_accuracy_drop=1.0)
    assert seen == [0.1, 0.02, 0.005]
    assert result.table["note"].iloc[0] == "lr 0.02"
    assert result.settings["learning_rate"] == [0.1, 0.02, 0.005]


def test_each_model_is_measured_on_validation_data_once(monkeypatch):
    measured = []
    real = defend_module.predict_labels

    def counting(model, x, **kwargs):
        measured.append(id(model))
        return real(model, x, **kwargs)

    monkeypatch.setattr(defend_module, "predict_labels", counting)
    defend(_backdoored(), TRAIN, validation_data=VAL, scan=False, try_all=True, methods=["ft-cosine", "ft-sam"],
           learning_rate=[0.1, 0.02], epochs=1, max_accuracy_drop=1.0)
    # the received model, then two tuned models per method; the chosen one is not re-measured
    assert len(measured) == 5 and len(set(measured)) == 5


@pytest.mark.parametrize("rates, error", [([], ValueError), ([0.1, -1.0], ValueError),
                                          ([0.1, True], TypeError)])
def test_bad_learning_rate_lists_are_refused(rates, error):
    with pytest.raises(error, match="learning_rate"):
        defend(_backdoored(), TRAIN, validation_data=VAL, scan=False, try_all=True, methods=["ft-cosine"],
               learning_rate=rates, epochs=1)


def test_methods_stop_at_the_first_that_the_choice_rule_would_take(monkeypatch):
    fakes = FakeMethods(monkeypatch, {"reinit-head": (0.95, 0.5), "ft-sam": (1.0, 0.0),
                                      "ft-cosine": (1.0, 0.0)})
    result = _defend(_backdoored(), ["reinit-head", "ft-sam", "ft-cosine"],
                     poisoned_validation_data=POISONED, try_all=False)
    assert [call[0] for call in fakes.calls] == ["reinit-head", "ft-sam"]
    assert result.method == "ft-sam"
    assert any(w.startswith("not run: ft-cosine") for w in result.warnings)


def test_paired_drop_bound_rejects_a_drop_that_noise_could_hide():
    reference = np.ones(200, bool)
    candidate = reference.copy()
    candidate[:2] = False  # 1 point lost on 200 inputs
    drop, bound = defend_module.paired_drop(reference, candidate, confidence=0.8)
    assert drop == pytest.approx(0.01) and bound > 0.01
    assert defend_module.paired_drop(reference, candidate, confidence=None) == (0.01, 0.01)
    gained = reference.copy()
    gained[:3] = False
    both = gained.copy()
    both[:2] = True
    drop, bound = defend_module.paired_drop(gained, both, confidence=0.8)
    assert drop < 0 and bound < 0.01  # a repair that only fixes inputs


def _scan_stub(found, targets=(), all_to_all=False, class_map=None):
    """A stand-in ScanResult: stamps nothing and reports ``found``."""
    class Stub:
        backdoor_found = found
        verdict = "backdoor found" if found else "no backdoor found"
        suspected_targets = tuple(targets)
        all_to_all_suspected = all_to_all
        all_to_all_map = (None if class_map is None or not all_to_all
                          else np.asarray(class_map, np.int64))
        seconds = 0.0

        def as_dict(self):
            return {"backdoor_found": found, "verdict": self.verdict,
                    "suspected_targets": list(targets), "all_to_all_suspected": all_to_all,
                    "seconds": 0.0, "classes": []}

        def apply(self, x, target):
            return np.asarray(x)

        def suspected_triggers(self):
            return []
    return Stub()


def test_a_model_the_scan_finds_clean_is_returned_unchanged(monkeypatch):
    import tf_backdoor_defense.scan._scan as scan_module

    monkeypatch.setattr(scan_module, "scan_model", lambda model, data, **kw: _scan_stub(False))
    fakes = FakeMethods(monkeypatch, {"ft-cosine": (0.9, 0.0)})
    model = _backdoored()
    result = _defend(model, ["ft-cosine"], scan=True)
    assert fakes.calls == [] and result.method is None
    assert result.verdict.startswith("no backdoor found") and not result.backdoor_still_active
    assert result.model is not model
    for got, want in zip(result.model.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    repaired = _defend(model, ["ft-cosine"], scan=True, repair_if_clean=True)
    assert repaired.method == "ft-cosine"
    assert repaired.verdict == "no backdoor found; repair requested; repaired with ft-cosine"
    # unlearning needs a reversed trigger: on request it runs nothing, and the verdict says so
    nothing = _defend(model, ["unlearn"], scan=True, repair_if_clean=True)
    assert nothing.method is None and len(nothing.table) == 0
    assert nothing.verdict == "no backdoor found; repair requested; no method ran, model " \
                              "returned unchanged"


def test_verification_scan_that_still_finds_a_backdoor_warns(monkeypatch):
    import tf_backdoor_defense.scan._scan as scan_module

    monkeypatch.setattr(scan_module, "scan_model",
                        lambda model, data, **kw: _scan_stub(True, targets=(0,)))
    FakeMethods(monkeypatch, {"ft-cosine": (1.0, 0.0)})
    with pytest.warns(BackdoorStillActiveWarning, match="still finds one"):
        result = _defend(_backdoored(), ["ft-cosine"], scan=True)
    assert result.backdoor_still_active and result.verification is not None
    assert result.summary()["verification"]["backdoor_found"] is True


def test_a_candidate_still_found_backdoored_does_not_stop_the_search(monkeypatch):
    import tf_backdoor_defense.scan._scan as scan_module

    fakes = FakeMethods(monkeypatch, {"ft-cosine": (1.0, 0.0), "ft-sam": (1.0, 0.0)})
    scanned = []

    def scan(model, data, **kw):
        scanned.append(model)
        return _scan_stub(model is not fakes.models["ft-sam"], targets=(0,))

    monkeypatch.setattr(scan_module, "scan_model", scan)
    result = _defend(_backdoored(), ["ft-cosine", "ft-sam"], scan=True, try_all=False)
    assert [name for name, *_ in fakes.calls] == ["ft-cosine", "ft-sam"]
    assert result.table["verified"].tolist() == [False, True]
    assert result.method == "ft-sam" and not result.backdoor_still_active
    assert result.verification is not None and not result.verification.backdoor_found
    assert len(scanned) == 3  # the received model and each candidate once; no extra rescan


def test_verified_candidates_are_chosen_before_unverified_ones(monkeypatch):
    import tf_backdoor_defense.scan._scan as scan_module

    fakes = FakeMethods(monkeypatch, {"ft-cosine": (1.0, 0.0), "ft-sam": (0.95, 0.0)})
    monkeypatch.setattr(scan_module, "scan_model", lambda model, data, **kw: _scan_stub(
        model is not fakes.models["ft-sam"], targets=(0,)))
    assert _defend(_backdoored(), ["ft-cosine", "ft-sam"], scan=True).method == "ft-sam"


@pytest.mark.parametrize("asr, shipped", [(0.6, False), (0.4, True)])
def test_a_repair_that_does_not_halve_the_backdoor_signal_is_not_shipped(monkeypatch, asr,
                                                                         shipped):
    FakeMethods(monkeypatch, {"ft-cosine": (1.0, asr)})
    model = _backdoored()
    with pytest.warns(BackdoorStillActiveWarning):
        result = _defend(model, ["ft-cosine"], poisoned_validation_data=POISONED)
    assert (result.method == "ft-cosine") is shipped
    assert result.backdoor_still_active
    if not shipped:
        assert "returned unchanged" in result.verdict
        assert any("no repair within the budget removed the backdoor signal" in w
                   for w in result.warnings)
        assert result.model is not model and not result.table["chosen"].any()
        for got, want in zip(result.model.get_weights(), model.get_weights()):
            np.testing.assert_array_equal(got, want)


def test_unlearn_unlearns_what_the_rescan_of_its_result_finds(monkeypatch):
    import tf_backdoor_defense.defenses._unlearning as unlearning_module
    import tf_backdoor_defense.scan._scan as scan_module

    received, first, second = _backdoored(), _fake_model(1.0, 0.0), _fake_model(1.0, 0.0)
    outputs = iter([first, second, _fake_model(1.0, 0.0)])
    calls = []

    def unlearn(model, train, triggers, **kw):
        calls.append((model, list(triggers)))
        return next(outputs)

    def scan(model, data, **kw):
        stub = _scan_stub(model is not second, targets=(0,))
        stub.suspected_triggers = lambda: ["A"] if model is received else ["B"]
        return stub

    monkeypatch.setattr(unlearning_module, "unlearn_triggers", unlearn)
    monkeypatch.setattr(scan_module, "scan_model", scan)
    result = _defend(received, ["unlearn"], scan=True)
    assert [(model is received, model is first) for model, _ in calls] == [(True, False),
                                                                            (False, True)]
    assert [triggers for _, triggers in calls] == [["A"], ["A", "B"]]
    assert "in 2 rounds" in result.table["note"].iloc[0]
    assert result.table["verified"].tolist() == [True] and result.model is second
    without = _defend(_backdoored(), ["unlearn"], scan=True, verify=False)
    assert "rounds" not in without.table["note"].iloc[0]


@pytest.mark.parametrize("scan_options, first_targets, rescan_classes", [
    (None, (3,), (3,)),        # the rescan's second tier may name the first scan's target only
    (None, (), ()),            # an all-to-all suspicion: a new class needs the first tier
    ({"second_tier_classes": None}, (3,), None),   # the caller's setting wins
])
def test_rescans_limit_the_second_tier_to_the_first_scans_targets(monkeypatch, scan_options,
                                                                   first_targets, rescan_classes):
    import tf_backdoor_defense.scan._scan as scan_module

    FakeMethods(monkeypatch, {"ft-cosine": (1.0, 0.0)})
    received = _backdoored()
    calls = []

    def scan(model, data, **kw):
        calls.append((model is received, kw))
        return _scan_stub(model is received, targets=first_targets,
                          all_to_all=not first_targets)

    monkeypatch.setattr(scan_module, "scan_model", scan)
    result = _defend(received, ["ft-cosine"], scan=True, scan_options=scan_options)
    assert [first for first, _ in calls] == [True, False]
    first, rescan = calls[0][1], calls[1][1]
    assert first.get("second_tier_classes") is None
    assert rescan["second_tier_classes"] == rescan_classes
    assert result.table["verified"].tolist() == [True]


# -- the ibau method and the scan's target ----------------------------------------------------
SHIFT = [1, 2, 0]  # an all-to-all class map of three classes: c -> c + 1


@pytest.mark.parametrize("targets, all_to_all, class_map, expected", [
    ((3, 5), False, None, 3),      # the most anomalous suspected class
    ((), True, SHIFT, SHIFT),      # all-to-all: along the scan's class map
    ((3,), True, SHIFT, SHIFT),    # both suspicions: the map, which covers every class
    ((), True, None, None),        # all-to-all without a map (nothing moved): untargeted
    ((3,), True, None, None),
    ((), False, None, None),
])
def test_ibau_searches_towards_the_scans_target_or_class_map(monkeypatch, targets, all_to_all,
                                                             class_map, expected):
    from tf_backdoor_defense.defenses import _defend, _ibau, _unlearning

    seen, unlearnt = {}, []
    after_ibau = object()

    def fake_ibau(model, train, **kwargs):
        seen.update(kwargs)
        return after_ibau

    def fake_unlearn(model, train, triggers, **kwargs):
        unlearnt.append((model, triggers, kwargs))
        return model

    monkeypatch.setattr(_ibau, "ibau", fake_ibau)
    monkeypatch.setattr(_unlearning, "unlearn_triggers", fake_unlearn)
    scan = _scan_stub(True, targets=targets, all_to_all=all_to_all, class_map=class_map)
    context = {"scan": scan, "fine_tune": {"batch_size": 8}, "seed": 3, "strategy": None,
               "ibau_radius": _defend.IBAU_RADIUS, "first_stages": {}}
    repaired, note = _defend._ibau(object(), None, context)
    assert seen["learning_rate"] == _defend.IBAU_LEARNING_RATE == 1e-3
    assert seen["radius"] == _defend.IBAU_RADIUS == 3.0
    # then the scan's reversed triggers are unlearnt from I-BAU's repair, once
    assert repaired is after_ibau and len(unlearnt) == 1
    model, triggers, options = unlearnt[0]
    assert model is after_ibau and triggers == scan.suspected_triggers()
    assert options["seed"] == 3 and options["batch_size"] == 8
    assert "then 0 reversed trigger(s) unlearnt" in note
    name, first, first_note = context["first_stages"]["ibau"]  # I-BAU alone, judged if needed
    assert name == "ibau-alone" and first is after_ibau and "reversed" not in first_note
    _defend._ibau(object(), None, dict(context, ibau_radius=2.5))
    assert seen["radius"] == 2.5
    if isinstance(expected, list):
        assert seen["target"].tolist() == expected
        assert "along the class map 0->1, 1->2, 2->0" in note
    else:
        assert seen["target"] == expected
        assert (f"towards class {expected}" in note) == (expected is not None)


@pytest.mark.parametrize("whole_accuracy, alone_accuracy, interpolate, expected_rows, chosen", [
    # the whole over the budget: its first stage
    (0.8, 1.0, (0.8,), ["ibau", "ibau-alone"], "ibau-alone"),
    # within the budget: nothing more is judged
    (1.0, 1.0, (0.8,), ["ibau"], "ibau"),
    # both over: the first stage and its interpolation, then the whole's interpolation
    (0.8, 0.8, (0.8,), ["ibau", "ibau-alone", "ibau-alone@0.8", "ibau@0.8"], None),
    (0.8, 0.8, (), ["ibau", "ibau-alone"], None),
])
def test_a_repair_in_stages_over_the_budget_is_judged_at_its_first_stage(
        monkeypatch, whole_accuracy, alone_accuracy, interpolate, expected_rows, chosen):
    alone, whole = _fake_model(alone_accuracy, 0.0), _fake_model(whole_accuracy, 0.0)

    def staged(model, train, context):
        context["first_stages"]["ibau"] = ("ibau-alone", alone, "first stage")
        return whole, "both stages"

    monkeypatch.setitem(defend_module._RUNNERS, "ibau", staged)
    result = _defend(_backdoored(), ["ibau"], poisoned_validation_data=POISONED,
                     interpolate=interpolate)
    assert result.table["method"].tolist() == expected_rows
    assert result.method == chosen
    if chosen is not None:
        assert result.model is (alone if chosen == "ibau-alone" else whole)


@pytest.mark.parametrize("name, base", [
    ("ibau", "ibau"), ("ibau@0.8", "ibau"), ("ibau-alone", "ibau"), ("ibau-alone@0.8", "ibau"),
    ("unlearn@0.8", "unlearn"), (None, None)])
def test_rows_are_read_as_the_method_they_came_from(name, base):
    assert defend_module._base_method(name) == base


@pytest.mark.parametrize("scan", [None, _scan_stub(False)])
def test_ibau_unlearns_nothing_more_without_a_scan_finding(monkeypatch, scan):
    from tf_backdoor_defense.defenses import _defend, _ibau, _unlearning

    monkeypatch.setattr(_ibau, "ibau", lambda model, train, **kwargs: "repaired")
    monkeypatch.setattr(_unlearning, "unlearn_triggers",
                        lambda *args, **kwargs: pytest.fail("nothing to unlearn"))
    context = {"scan": scan, "fine_tune": {"batch_size": 8}, "seed": 0, "strategy": None,
               "ibau_radius": _defend.IBAU_RADIUS, "first_stages": {}}
    repaired, note = _defend._ibau(object(), None, context)
    assert repaired == "repaired" and note == "universal perturbation unlearnt"
    assert context["first_stages"] == {}


@pytest.mark.parametrize("targets, all_to_all, class_map, order", [
    ((0,), False, None, ["ibau", "unlearn", "clp"]),   # an all-to-one target: TARGETED_METHODS
    ((), True, SHIFT, ["ibau", "unlearn", "clp"]),     # all-to-all with its map: the same
    ((0,), True, SHIFT, ["ibau", "unlearn", "clp"]),
    ((), True, None, ["unlearn", "ibau", "clp"]),      # nothing to search along: DEFAULT_METHODS
    ((0,), True, None, ["unlearn", "ibau", "clp"]),
])
def test_the_default_order_follows_the_scan(monkeypatch, targets, all_to_all, class_map, order):
    import tf_backdoor_defense.scan._scan as scan_module

    monkeypatch.setattr(scan_module, "scan_model", lambda model, data, **kw: _scan_stub(
        True, targets=targets, all_to_all=all_to_all, class_map=class_map))
    fakes = FakeMethods(monkeypatch, {name: (1.0, 0.0) for name in order})
    result = _defend(_backdoored(), None, scan=True, verify=False)
    assert [name for name, *_ in fakes.calls] == order
    assert result.settings["methods"] == order


@pytest.mark.parametrize("ibau_accuracy, ibau_residual, targets, expected", [
    (0.8, 0.0, (0,), "was over the budget (bound +0.2000 against 0.1)"),  # unlearn shipped
    (1.0, 0.3, (0,), "left a reversed-trigger residual of 30.0% (tolerance 2.0%)"),
    (1.0, 0.0, (0,), None),     # ibau qualifies: it ships, nothing to note
    (0.8, 0.0, (), None),       # no target or map: ibau did not search a dense trigger
])
def test_a_dense_repair_not_chosen_is_noted(monkeypatch, ibau_accuracy, ibau_residual, targets,
                                            expected):
    import tf_backdoor_defense.scan._scan as scan_module

    monkeypatch.setattr(scan_module, "scan_model", lambda model, data, **kw: _scan_stub(
        True, targets=targets))
    fakes = FakeMethods(monkeypatch, {"ibau": (ibau_accuracy, 0.0), "unlearn": (1.0, 0.0),
                                      "clp": (1.0, 0.0)})
    residuals = {id(fakes.models["ibau"]): ibau_residual}
    monkeypatch.setattr(defend_module, "_residual",
                        lambda model, context: residuals.get(id(model), 0.0))
    result = _defend(_backdoored(), ["ibau", "unlearn", "clp"], scan=True, verify=False,
                     try_all=False)
    noted = [n for n in result.warnings if n.startswith("ibau, which also unlearns dense")]
    assert bool(noted) == (expected is not None)
    if expected:
        assert result.method == "unlearn" and expected in noted[0]
        assert "result.candidates['ibau']" in noted[0] and "ibau" in result.candidates


def test_a_dense_repair_the_rescan_still_finds_backdoored_is_noted(monkeypatch):
    import tf_backdoor_defense.scan._scan as scan_module

    fakes = FakeMethods(monkeypatch, {"ibau": (1.0, 0.0), "unlearn": (1.0, 0.0)})
    received = _backdoored()
    monkeypatch.setattr(scan_module, "scan_model", lambda model, data, **kw: _scan_stub(
        model is received or model is fakes.models["ibau"], targets=(0,)))
    monkeypatch.setattr(defend_module, "_residual", lambda model, context: 0.0)
    result = _defend(received, ["ibau", "unlearn"], scan=True, try_all=False)
    assert result.method == "unlearn"
    assert result.table["verified"].tolist() == [False, True]
    (noted,) = [n for n in result.warnings if n.startswith("ibau, which also unlearns dense")]
    assert "was still found backdoored by the rescan" in noted


def test_a_dense_repair_is_not_noted_when_triggered_data_decide(monkeypatch):
    import tf_backdoor_defense.scan._scan as scan_module

    monkeypatch.setattr(scan_module, "scan_model", lambda model, data, **kw: _scan_stub(
        True, targets=(0,)))
    FakeMethods(monkeypatch, {"ibau": (0.8, 0.0), "unlearn": (1.0, 0.0)})
    result = _defend(_backdoored(), ["ibau", "unlearn"], scan=True, verify=False,
                     poisoned_validation_data=POISONED)
    assert result.method == "unlearn"
    assert not [n for n in result.warnings if "dense" in n]


def test_methods_given_keep_their_order_whatever_the_scan(monkeypatch):
    import tf_backdoor_defense.scan._scan as scan_module

    monkeypatch.setattr(scan_module, "scan_model",
                        lambda model, data, **kw: _scan_stub(True, targets=(0,)))
    fakes = FakeMethods(monkeypatch, {"unlearn": (1.0, 0.0), "ibau": (1.0, 0.0)})
    _defend(_backdoored(), ["unlearn", "ibau"], scan=True, verify=False)
    assert [name for name, *_ in fakes.calls] == ["unlearn", "ibau"]


def _stamping_scan(class_map):
    """An all-to-all scan stub whose untargeted trigger turns input e_i into e_(i + n)."""
    class Stamping:
        backdoor_found = True
        suspected_targets = ()
        all_to_all_suspected = True
        all_to_all_map = None if class_map is None else np.asarray(class_map, np.int64)

        def apply(self, x, target):
            assert target == "untargeted"
            return np.roll(np.asarray(x), x.shape[1] // 2, axis=1)
    return Stamping()


@pytest.mark.parametrize("class_map, expected", [
    ([1, 2, 0], 3 / 8),  # rows 0, 2 and 4 (below)
    (None, 4 / 8),       # no map: 6 of 8 moved off their class, beyond the 2 of 8 clean errors
])
def test_the_all_to_all_residual_counts_moves_along_the_scans_map(class_map, expected):
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    clean = np.array([0, 0, 1, 2, 2, 2, 1, 1])   # two errors: 1 -> 2 (row 3), 0 -> 1 (row 6)
    stamped = np.array([1, 2, 2, 2, 0, 2, 1, 1])
    # row 0: 0 -> 1 along the map (counted); row 1: 0 -> 2, a natural flip (not counted with a
    # map); row 2: 1 -> 2 along the map (counted); row 3: 1 -> 2 but already 2 unstamped (not);
    # row 4: 2 -> 0 along the map (counted); row 6: 0 -> 1, already 1 unstamped (not).
    n = labels.size
    predictions = np.concatenate([clean, stamped])
    model = keras.Sequential([keras.Input((2 * n,)),
                              keras.layers.Dense(3, activation="softmax", name="out")])
    model.get_layer("out").set_weights([10.0 * np.eye(3, dtype=np.float32)[predictions],
                                        np.zeros(3, np.float32)])
    x = np.eye(2 * n, dtype=np.float32)[:n]
    context = {"scan": _stamping_scan(class_map), "validation": (x, labels),
               "validation_labels": labels, "predictions_of": {}, "strategy": None}
    assert defend_module._residual(model, context) == pytest.approx(expected)


def test_ibau_radius_reaches_ibau_and_the_settings(monkeypatch):
    from tf_backdoor_defense.defenses import _ibau

    seen = []

    def fake_ibau(model, train, **kwargs):
        seen.append(kwargs["radius"])
        return copy_model(model)

    monkeypatch.setattr(_ibau, "ibau", fake_ibau)
    result = defend(_backdoored(), TRAIN, methods=["ibau"], scan=False, ibau_radius=2.5,
                    max_accuracy_drop=1.0)
    assert seen == [2.5]
    assert result.settings["ibau_radius"] == 2.5 and result.summary()["settings"]["ibau_radius"] == 2.5


@pytest.mark.slow  # an integration run of many compiled steps (the slow set)
def test_defend_scans_and_unlearns_on_a_model_of_flat_inputs(planted, caplog):
    """The scan's triggers reach the residual and unlearning in the model's flat shape; each
    scan's verdict is logged once, each rescan after a line naming what it scans."""
    from planted import planted_model  # tests/scan/planted.py, on the path through `planted`

    model = planted_model("all-to-one", input_shape=(64,))
    x, y = planted["data"]
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="tf_backdoor_defense"):
        warnings.simplefilter("ignore", BackdoorStillActiveWarning)
        result = defend(model, (x.reshape(len(x), 64), y), methods=["unlearn"], seed=1,
                        scan_options={"steps": 150, "init_cost": 1e-2}, epochs=2,
                        max_accuracy_drop=1.0, interpolate=(), verbose=1)
    lines = [record.getMessage() for record in caplog.records]
    scans = [index for index, line in enumerate(lines) if line.startswith("scan: ")]
    rescans = [index for index, line in enumerate(lines) if line.startswith("rescanning ")]
    assert lines[scans[0]].startswith("scan: backdoor found: all-to-one, target class 2")
    assert len(rescans) >= 1 and len(scans) == 1 + len(rescans), lines
    # Each rescan's verdict comes after its own line and before the next rescan's.
    for index, start in enumerate(rescans):
        stop = rescans[index + 1] if index + 1 < len(rescans) else len(lines)
        assert len([s for s in scans if start < s < stop]) == 1, lines
    assert lines[rescans[0]] == "rescanning unlearn's round 1"
    # The summary (defense.json) keeps the whole scan: its per-class table too.
    scan = json.loads(json.dumps(result.summary(), allow_nan=False))["scan"]
    assert scan["suspected_targets"] == [2] and scan["input_shape"] == [64]
    assert [row["class"] for row in scan["classes"]] == list(range(result.scan.table.shape[0]))
    assert scan["classes"][2]["mask_l1"] == pytest.approx(float(result.scan.table["mask_l1"][2]))
    assert result.scan.suspected_targets == (2,) and result.scan.input_shape == (64,)
    assert result.baseline["residual_trigger_rate"] > 0.9
    row = result.table.set_index("method").loc["unlearn"]
    assert 0.0 <= row["residual_trigger_rate"] <= 1.0
    assert "unlearnt" in row["note"]
    assert result.candidates["unlearn"].inputs[0].shape[1:] == (64,)


def _attacked_digits():
    """The attacker's 3,000 real digits, 10% stamped with a checkerboard patch relabelled 3;
    the defender's 1,000 and 1,000 test digits, which the attacker never has."""
    from tf_backdoor_defense.attacks import checkerboard_patch, poison_dataset
    from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split

    x, y = load_mnist_digits()
    attacker, defender, test = split(x, y, [3000, 1000, 1000], seed=0)
    trigger = checkerboard_patch(4, 1.0)
    x_bad, y_bad, _ = poison_dataset(*attacker, trigger, rate=0.1, target=3, seed=0)
    return defender, test, trigger, x_bad, y_bad


@pytest.mark.slow
@pytest.mark.parametrize("input_shape", [(784,), (28, 28)])
def test_defend_scans_and_repairs_a_badnet_that_does_not_read_channel_last_images(input_shape):
    """A multilayer perceptron on flat digits, or a net reading (28, 28) digits, trained on
    data the defender never has: defend() with its defaults and no triggered data names the
    target and ships a repair."""
    defender, test, trigger, x_bad, y_bad = _attacked_digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                              keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x_bad.reshape((-1,) + input_shape), y_bad, epochs=15, batch_size=64, verbose=0)
    flat = lambda images: images.reshape((len(images),) + input_shape)  # noqa: E731
    x_poison, y_attacker, _ = poisoned_evaluation_set(*test, trigger, target=3)
    poisoned = (flat(x_poison), y_attacker)
    asr_before = attack_success_rate(model, poisoned)
    accuracy_before = clean_accuracy(model, (flat(test[0]), test[1]))
    assert asr_before > 0.9 and accuracy_before > 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackdoorStillActiveWarning)
        result = defend(model, (flat(defender[0]), defender[1]), max_accuracy_drop=0.02)
    assert result.scan.suspected_targets == (3,) and result.scan.input_shape == input_shape
    assert result.scan.masks.shape[1:] == (28, 28, 1)
    assert result.method is not None
    assert attack_success_rate(result.model, poisoned) < 0.1
    assert clean_accuracy(result.model, (flat(test[0]), test[1])) >= accuracy_before - 0.03
    assert attack_success_rate(model, poisoned) == asr_before  # the user's model untouched


class _ConvNetClass(keras.Model):
    """A convnet written as a class, as TensorFlow's quickstart for experts writes one."""

    def __init__(self):
        super().__init__()
        self.conv1 = keras.layers.Conv2D(16, 3, activation="relu")
        self.pool1 = keras.layers.MaxPooling2D()
        self.conv2 = keras.layers.Conv2D(32, 3, activation="relu")
        self.pool2 = keras.layers.MaxPooling2D()
        self.flatten = keras.layers.Flatten()
        self.d1 = keras.layers.Dense(64, activation="relu")
        self.d2 = keras.layers.Dense(10, activation="softmax")

    def call(self, x):
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.d2(self.d1(self.flatten(x)))


def _channels_first_convnet():
    """The same convnet reading (1, 28, 28) digits, as models ported from PyTorch do."""
    first = dict(data_format="channels_first")
    return keras.Sequential([
        keras.Input((1, 28, 28)), keras.layers.Conv2D(16, 3, activation="relu", **first),
        keras.layers.MaxPooling2D(**first), keras.layers.Conv2D(32, 3, activation="relu", **first),
        keras.layers.MaxPooling2D(**first), keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")])


@pytest.mark.slow
@pytest.mark.parametrize("form", ["subclassed", "channels-first"])
def test_defend_repairs_a_convnet_written_as_a_class_or_reading_channels_first(form):
    """Trained on digits the defender never has: defend() with its defaults and no triggered
    data names the target over the digits' pixels and ships a repair."""
    from tf_backdoor_defense.graph import is_subclassed

    defender, test, trigger, x_bad, y_bad = _attacked_digits()
    keras.utils.set_random_seed(0)
    if form == "subclassed":
        model, layout = _ConvNetClass(), (lambda images: images)
    else:
        model, layout = _channels_first_convnet(), (lambda images: np.moveaxis(images, -1, 1))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(layout(x_bad), y_bad, epochs=8, batch_size=64, verbose=0)
    x_poison, y_attacker, _ = poisoned_evaluation_set(*test, trigger, target=3)
    poisoned, clean_test = (layout(x_poison), y_attacker), (layout(test[0]), test[1])
    asr_before, accuracy_before = attack_success_rate(model, poisoned), clean_accuracy(
        model, clean_test)
    assert asr_before > 0.9 and accuracy_before > 0.9
    weights = [w.copy() for w in model.get_weights()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackdoorStillActiveWarning)
        result = defend(model, (layout(defender[0]), defender[1]), max_accuracy_drop=0.02)
    assert result.scan.suspected_targets == (3,)
    assert result.scan.masks.shape[1:] == (28, 28, 1)
    assert result.scan.channels_first == (form == "channels-first")
    assert result.method is not None and not is_subclassed(result.model)
    assert attack_success_rate(result.model, poisoned) < 0.1
    assert clean_accuracy(result.model, clean_test) >= accuracy_before - 0.03
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))

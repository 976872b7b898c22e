"""Tests of defend()'s interpolated candidates and of interpolate_weights.

The candidates are "lookup" models (tests/defenses/test_defend.py): one Dense
layer on one-hot inputs, so the logits of every example are set by the test.
A repair whose wrong validation answers have weak logits (2) and whose right
ones have strong logits (10) is over the budget, and 0.8 of the way from the
received model (logit 10 on the right class) it answers those examples right
again: 0.2 * 10 = 2 > 0.8 * 2 = 1.6.
"""

import importlib
import warnings

import numpy as np
import pytest

from test_defend import N_POISON, N_TRAIN, N_VAL, POISONED, VAL, Y_TRAIN, Y_VAL, DIM, _backdoored
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.defenses._defend import (INTERPOLATE, BackdoorStillActiveWarning, defend,
                                                  interpolate_weights)
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy

defend_module = importlib.import_module("tf_backdoor_defense.defenses._defend")


def _logit_model(val_pred, val_logit, poison_pred, poison_logit=10.0):
    """A lookup model: validation example i gets ``val_logit[i]`` on class ``val_pred[i]``."""
    kernel = np.zeros((DIM, 3), np.float32)
    kernel[np.arange(N_TRAIN), Y_TRAIN] = 10.0
    kernel[N_TRAIN + np.arange(N_VAL), val_pred] = val_logit
    kernel[N_TRAIN + N_VAL + np.arange(N_POISON), poison_pred] = poison_logit
    model = keras.Sequential([keras.Input((DIM,)),
                              keras.layers.Dense(3, activation="softmax", name="out")])
    model.get_layer("out").set_weights([kernel, np.zeros(3, np.float32)])
    return model


def _repair(wrong=4, weak=2.0):
    """ASR 0 (strong), ``wrong`` validation examples on a wrong class with logit ``weak``."""
    val_pred, val_logit = Y_VAL.copy(), np.full(N_VAL, 10.0, np.float32)
    val_pred[:wrong] = (Y_VAL[:wrong] + 1) % 3
    val_logit[:wrong] = weak
    return _logit_model(val_pred, val_logit, np.ones(N_POISON, int))


@pytest.fixture
def run(monkeypatch):
    """``run(received, repair, **kwargs)``: defend() with ``ft-cosine`` returning ``repair``."""
    def call(model, repair, **kwargs):
        monkeypatch.setitem(defend_module._RUNNERS, "ft-cosine", lambda m, t, c: (repair, "fake"))
        kwargs.setdefault("interpolate", INTERPOLATE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BackdoorStillActiveWarning)  # the kept received model
            return defend(model, (np.eye(DIM, dtype=np.float32)[:N_TRAIN], Y_TRAIN),
                          validation_data=VAL, poisoned_validation_data=POISONED,
                          methods=["ft-cosine"], scan=False, budget_confidence=None,
                          max_accuracy_drop=0.1, **kwargs)
    return call


def test_the_fixture_repair_is_over_budget_and_its_interpolation_is_not():
    received, repair = _backdoored(), _repair()
    assert clean_accuracy(repair, VAL) == pytest.approx(0.8)
    assert attack_success_rate(repair, POISONED) == 0.0
    blended = interpolate_weights(received, repair, 0.8)
    assert clean_accuracy(blended, VAL) == 1.0
    assert attack_success_rate(blended, POISONED) == 0.0


def test_an_over_budget_repair_is_judged_again_interpolated_and_chosen(run):
    received, repair = _backdoored(), _repair()
    before = [w.copy() for w in received.get_weights()], [w.copy() for w in repair.get_weights()]
    result = run(received, repair)
    table = result.table
    assert list(table["method"]) == ["ft-cosine", "ft-cosine@0.8"]
    assert list(table["within_budget"]) == [False, True]
    np.testing.assert_allclose(table["validation_accuracy"], [0.8, 1.0])
    np.testing.assert_allclose(table["validation_asr"], [0.0, 0.0])
    assert table.loc[1, "note"] == "weights 0.8 of the way from the received model to the " \
                                   "ft-cosine repair"
    assert result.method == "ft-cosine@0.8" and table["chosen"].tolist() == [False, True]
    assert result.model is result.candidates["ft-cosine@0.8"]
    assert result.candidates["ft-cosine"] is repair
    for got, a, b in zip(result.model.get_weights(), *before):
        np.testing.assert_allclose(got, a + 0.8 * (b - a), rtol=1e-6, atol=1e-6)
    for model, weights in zip((received, repair), before):  # neither model is touched
        for got, want in zip(model.get_weights(), weights):
            np.testing.assert_array_equal(got, want)
    assert result.settings["interpolate"] == [0.8]
    assert result.verdict == "not scanned; repaired with ft-cosine@0.8"
    assert not result.backdoor_still_active


def test_without_interpolation_the_over_budget_repair_is_not_shipped(run):
    result = run(_backdoored(), _repair(), interpolate=())
    assert list(result.table["method"]) == ["ft-cosine"]
    assert result.method is None
    assert any("no method stayed within the accuracy budget" in n for n in result.warnings)


def test_a_repair_within_budget_is_not_interpolated(run):
    result = run(_backdoored(), _repair(wrong=1))  # 1 of 20: a 0.05 drop, budget 0.1
    assert list(result.table["method"]) == ["ft-cosine"]
    assert result.method == "ft-cosine"


def test_fractions_are_tried_in_order_until_one_qualifies(run):
    # at 0.9 the weak wrong answers stay wrong (1.8 > 1.0), at 0.8 they come right
    result = run(_backdoored(), _repair(), interpolate=(0.9, 0.8, 0.5))
    assert list(result.table["method"]) == ["ft-cosine", "ft-cosine@0.9", "ft-cosine@0.8"]
    assert list(result.table["within_budget"]) == [False, False, True]
    assert result.method == "ft-cosine@0.8"


def test_an_interpolation_still_over_budget_is_not_shipped(run):
    # strong wrong answers: 0.8 * 10 > 0.2 * 10, so the interpolation is as wrong
    result = run(_backdoored(), _repair(weak=10.0))
    assert list(result.table["within_budget"]) == [False, False]
    assert result.method is None
    assert any("smallest bound" in n for n in result.warnings)


def test_a_pruned_repair_is_not_interpolated(run):
    from tf_backdoor_defense.masks._wrapper import wrap_layers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pruning an output layer: no unit is pruned here
        pruned = wrap_layers(_repair(), ["out"], masks={"out": [1, 1, 1]})
    result = run(_backdoored(), pruned)
    assert list(result.table["method"]) == ["ft-cosine"]


@pytest.mark.parametrize("value, error", [
    (0.8, TypeError), ("0.8", TypeError), (("a",), TypeError), ((1.0,), ValueError),
    ((0.0,), ValueError), ((-0.5,), ValueError), ((float("nan"),), ValueError)])
def test_bad_fractions_are_refused_by_name(run, value, error):
    with pytest.raises(error, match="interpolate"):
        run(_backdoored(), _repair(), interpolate=value)


def test_interpolate_weights_blends_every_variable_batchnorm_statistics_included():
    def net(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                                  keras.layers.BatchNormalization(), keras.layers.Dense(2)])
        model.layers[1].set_weights([w + seed for w in model.layers[1].get_weights()])
        return model

    a, b = net(0), net(1)
    blended = interpolate_weights(a, b, 0.25)
    assert blended is not a and blended is not b
    for got, wa, wb in zip(blended.get_weights(), a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(got, wa + 0.25 * (wb - wa), rtol=1e-6)
    moving_mean = blended.layers[1].moving_mean.numpy()
    np.testing.assert_allclose(moving_mean, 0.75 * a.layers[1].moving_mean.numpy()
                               + 0.25 * b.layers[1].moving_mean.numpy(), rtol=1e-6)


def test_interpolate_weights_needs_the_same_variables():
    a = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert interpolate_weights(a, keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                               0.5) is None
    assert interpolate_weights(a, keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                                                    keras.layers.Dense(3)]), 0.5) is None


@pytest.mark.parametrize("chosen, noted", [("ibau@0.8", False), ("unlearn@0.8", True),
                                           ("unlearn", True), (None, False)])
def test_the_dense_repair_note_treats_an_interpolated_ibau_as_ibau(chosen, noted):
    import pandas as pd
    from types import SimpleNamespace

    scan = SimpleNamespace(all_to_all_map=None, suspected_targets=(0,), all_to_all_suspected=False)
    table = pd.DataFrame([{"method": "ibau", "within_budget": False, "drop_bound": 0.02,
                           "verified": None, "residual_trigger_rate": 0.0}])
    note = defend_module._dense_repair_not_chosen(table, chosen, scan, None, 0.01, 0.02)
    assert bool(note) == noted
    if noted:
        assert f"{chosen} removes the scan's reversed triggers only" in note

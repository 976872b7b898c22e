"""Tests of the paper's evaluation (attacks x defenses) in tf_backdoor_defense.experiments._paper."""

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense.experiments import _paper as evaluation
from tf_backdoor_defense.experiments._paper import DEFENSES, evaluate_defenses, paper_table_mnist
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy


def _set(seed, n=24, poisoned=False):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    if poisoned:
        x[:, -2:, -2:, :] = 1.0  # a corner trigger; labels are the attacker's class 0
        return x, np.zeros(n, np.int64)
    return x, rng.integers(0, 3, size=n)


@pytest.fixture
def sets():
    return {
        "defender_clean": _set(1),
        "defender_validation": _set(2),
        "evaluation_clean": _set(3),
        "evaluation_poisoned": _set(4, poisoned=True),
        "poisoned_validation": _set(5, poisoned=True),
    }


@pytest.fixture
def models():
    return {"baseline": tiny_conv_model(seed=0), "pruning-aware": tiny_conv_model(seed=1)}


def _run(models, sets, **kwargs):
    kwargs.setdefault("fine_tune_epochs", 1)
    kwargs.setdefault("poisoned_validation_data", sets["poisoned_validation"])
    return evaluate_defenses(models, sets["defender_clean"], sets["defender_validation"],
                             sets["evaluation_clean"], sets["evaluation_poisoned"], **kwargs)


def test_table_has_one_row_per_attack_and_defense(models, sets):
    result = _run(models, sets)
    assert len(result.table) == len(models) * len(DEFENSES)
    pairs = set(zip(result.table["attack"], result.table["defense"]))
    assert pairs == {(a, d) for a in models for d in DEFENSES}
    assert list(result.table.columns) == evaluation.COLUMNS
    assert not result.table[["clean_accuracy", "attack_success_rate"]].isna().any().any()
    assert result.table1().shape == (2, len(DEFENSES))
    assert list(result.table1().columns) == list(DEFENSES)
    assert list(result.utility_matrix().index) == list(models)
    assert set(result.models) == pairs
    assert result.notes == []


def test_utility_is_clean_accuracy_minus_attack_success_rate(models, sets):
    result = _run(models, sets, defenses=["none", "pruning"])
    table = result.table
    np.testing.assert_allclose(table["utility"], table["clean_accuracy"] - table["attack_success_rate"])
    matrix = result.utility_matrix()
    for row in table.itertuples():
        assert matrix.loc[row.attack, row.defense] == pytest.approx(row.utility)


def test_table1_cells_are_clean_accuracy_slash_asr_in_percent(models, sets):
    result = _run(models, sets, defenses=["none", "fine-tuning"])
    wide = result.table1()
    for row in result.table.itertuples():
        expected = f"{100 * row.clean_accuracy:.1f}/{100 * row.attack_success_rate:.1f}"
        assert wide.loc[row.attack, row.defense] == expected


def test_numbers_are_measured_on_the_evaluation_sets(models, sets):
    result = _run(models, sets, defenses=["none", "pruning"])
    for (attack, defense), model in result.models.items():
        row = result.table[(result.table["attack"] == attack) & (result.table["defense"] == defense)]
        assert row["clean_accuracy"].item() == clean_accuracy(model, sets["evaluation_clean"])
        assert row["attack_success_rate"].item() == attack_success_rate(model,
                                                                         sets["evaluation_poisoned"])
    assert result.models[("baseline", "none")] is models["baseline"]


def _arrays_in(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _arrays_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _arrays_in(item)


def _same(a, b):
    return np.shares_memory(a, b) or (a.shape == b.shape and np.array_equal(a, b))


def test_defenses_only_receive_defender_data(models, sets, monkeypatch):
    calls = []

    def spy(name, function):
        def wrapper(*args, **kwargs):
            calls.append((name, args, kwargs))
            return function(*args, **kwargs)
        return wrapper

    for name in ("fine_prune", "prune_to_threshold", "attack_guided_prune"):
        monkeypatch.setattr(evaluation, name, spy(name, getattr(evaluation, name)))
    _run(models, sets)

    assert sorted({c[0] for c in calls}) == ["attack_guided_prune", "fine_prune",
                                             "prune_to_threshold"]
    assert len(calls) == 2 * 4  # fine-tuning, fine-pruning, pruning, attack-guided per model
    held_out = [sets[key][0] for key in ("evaluation_clean", "evaluation_poisoned")]
    held_out_labels = [sets[key][1] for key in ("evaluation_clean", "evaluation_poisoned")]
    defender = [sets[k][0] for k in ("defender_clean", "defender_validation", "poisoned_validation")]
    for name, args, kwargs in calls:
        passed = list(_arrays_in([args, kwargs]))
        assert passed, name
        assert not any(_same(p, h) for p in passed for h in held_out), name
        assert not any(np.shares_memory(p, h) for p in passed for h in held_out_labels), name
        assert any(_same(p, d) for p in passed for d in defender), name
    # ranking on defender-clean, threshold on defender-validation
    pruning = [c for c in calls if c[0] == "prune_to_threshold"][0]
    assert pruning[1][1] is sets["defender_validation"]
    assert pruning[2]["ranking_data"] is sets["defender_clean"]
    fine = [c for c in calls if c[0] == "fine_prune"][0]
    assert fine[1][1] is sets["defender_clean"] and fine[1][2] is sets["defender_validation"]


def test_evaluation_data_overlapping_defender_data_is_refused(models, sets):
    leaked = (np.concatenate([sets["evaluation_clean"][0], sets["defender_clean"][0][:1]]),
              np.concatenate([sets["evaluation_clean"][1], sets["defender_clean"][1][:1]]))
    with pytest.raises(ValueError, match="eval_data.*train_data"):
        evaluate_defenses(models, sets["defender_clean"], sets["defender_validation"], leaked,
                          sets["evaluation_poisoned"], defenses=["none"])


def test_same_seed_gives_the_same_table(models, sets):
    first = _run(models, sets, seed=3).table.drop(columns="seconds")
    second = _run(models, sets, seed=3).table.drop(columns="seconds")
    pd.testing.assert_frame_equal(first, second)


def test_attacked_models_are_not_modified(models, sets):
    before = {name: [w.copy() for w in m.get_weights()] for name, m in models.items()}
    _run(models, sets, defenses=["fine-tuning", "fine-pruning", "pruning", "attack-guided"])
    for name, model in models.items():
        for old, new in zip(before[name], model.get_weights()):
            np.testing.assert_array_equal(old, new)


def test_pruning_defenses_report_pruned_channels(models, sets):
    result = _run(models, sets, max_accuracy_drop=1.0, defenses=["none", "pruning"])
    table = result.table.set_index(["attack", "defense"])
    assert table.loc[("baseline", "none"), "channels_pruned"] == 0
    # with a budget of 100 points every channel of the last conv layer (6) is pruned
    assert table.loc[("baseline", "pruning"), "channels_pruned"] == 6


def test_attack_guided_is_skipped_with_a_note_without_poisoned_validation(models, sets):
    result = _run(models, sets, poisoned_validation_data=None, defenses=["none", "attack-guided"])
    assert set(result.table["defense"]) == {"none"}
    assert len(result.notes) == 1 and "poisoned_validation" in result.notes[0]


@pytest.mark.parametrize("defenses, message", [
    (["none", "pruneing"], "Unknown defense.*pruneing"),
    (["none", "none"], "twice"),
    ([], "at least one"),
])
def test_bad_defense_names_raise_clear_errors(models, sets, defenses, message):
    with pytest.raises(ValueError, match=message):
        _run(models, sets, defenses=defenses)


def test_bad_attacked_models_raise_type_error(sets):
    with pytest.raises(TypeError, match="attacked_models"):
        _run([tiny_conv_model()], sets)
    with pytest.raises(TypeError, match="attacked_models"):
        _run({}, sets)


@pytest.mark.slow
def test_paper_table_mnist_runs_on_real_digits():
    result = paper_table_mnist(seed=0, epochs=1, attack_epochs=1, fine_tune_epochs=1,
                               sizes=(300, 100, 100, 100), defenses=["none", "pruning"])
    assert result.table1().shape == (2, 2)
    assert list(result.table1().index) == ["baseline", "pruning-aware"]
    assert result.settings["data_sizes"]["evaluation"] == 100
    assert result.table["clean_accuracy"].between(0, 1).all()


def test_old_keywords_still_work_with_a_deprecation_warning(models, sets):
    with pytest.warns(DeprecationWarning) as caught:
        result = evaluate_defenses(models, sets["defender_clean"], sets["defender_validation"],
                                   sets["evaluation_clean"], sets["evaluation_poisoned"],
                                   defenses=["none"], layer="conv_b",
                                   poisoned_validation=sets["poisoned_validation"])
    messages = " ".join(str(w.message) for w in caught)
    assert "'layer' parameter of evaluate_defenses is now 'layers'" in messages
    assert "'poisoned_validation' parameter of evaluate_defenses" in messages
    assert result.settings["layers"] == "conv_b"
    with pytest.raises(TypeError, match="both"):
        _run(models, sets, defenses=["none"], layer="conv_b", layers="conv_b")

"""One result idiom: the result classes are frozen dataclasses; mask results share MasksResult."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from tf_backdoor_defense.attacks import PruningAwareAttackResult
from tf_backdoor_defense.defenses._guided import GuidedPruningResult
from tf_backdoor_defense.defenses._repair import RepairedScores
from tf_backdoor_defense.defenses._search import PruningSearchResult
from tf_backdoor_defense.experiments._paper import EvaluationResult
from tf_backdoor_defense.export._export import ExportReport, LayerExport
from tf_backdoor_defense.masks._results import MasksResult
from tf_backdoor_defense.scoring._anp import AnpResult
from tf_backdoor_defense.scoring._lipschitz import ClpResult

MASKS = {"conv": np.array([1, 0, 0, 1], np.float32), "fc": np.array([1, 1], np.float32)}
TABLE = pd.DataFrame({"attack": ["a"], "defense": ["none"], "utility": [0.5]})

RESULTS = [
    (AnpResult, dict(model=None, masks=MASKS, scores={}, threshold=0.2, fraction=None, count=None)),
    (ClpResult, dict(model=None, masks=MASKS, scores={}, u=3.0)),
    (GuidedPruningResult, dict(model=None, masks=MASKS, history=TABLE, baseline_accuracy=0.9,
                               baseline_attack_success_rate=1.0, clean_accuracy=0.88,
                               attack_success_rate=0.1)),
    (PruningSearchResult, dict(model=None, fraction=0.5, masks=MASKS, table=TABLE,
                               baseline_accuracy=0.9, within_budget=True, layers=["conv", "fc"])),
    (EvaluationResult, dict(table=TABLE, models={}, notes=[], settings={})),
    (PruningAwareAttackResult, dict(model=None, decoy_channels=np.array([1]), layer="conv",
                                    bias_decrement=np.array([0.5]), history={})),
    (RepairedScores, dict(clean_accuracy=0.9, attack_success_rate=0.1, clean_flagged=0.0,
                          poisoned_flagged=0.9)),
    (LayerExport, dict(name="conv", channels=4, pruned=2, action="removed")),
    (ExportReport, dict(shrink=True, layers=(), params_before=10, params_after=8)),
]


@pytest.mark.parametrize("cls, fields", RESULTS, ids=[cls.__name__ for cls, _ in RESULTS])
def test_every_result_is_a_frozen_dataclass_with_its_attributes(cls, fields):
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    result = cls(**fields)
    for name, value in fields.items():
        assert getattr(result, name) is value
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result, next(iter(fields)), None)
    assert repr(result).startswith(cls.__name__ + "(")


@pytest.mark.parametrize("cls, fields", [r for r in RESULTS if issubclass(r[0], MasksResult)],
                         ids=lambda value: getattr(value, "__name__", ""))
def test_mask_results_count_pruned_channels_the_same_way(cls, fields):
    result = cls(**fields)
    assert {k: v.tolist() for k, v in result.pruned_channels.items()} == {"conv": [1, 2], "fc": []}
    assert result.pruned_counts == {"conv": 2, "fc": 0}
    assert "'conv': 2" in repr(result)


def test_results_holding_models_compare_by_identity():
    """A DataFrame or a model has no truth value: == on results must not compare fields."""
    first = GuidedPruningResult(**dict(RESULTS[2][1]))
    second = GuidedPruningResult(**dict(RESULTS[2][1]))
    assert first == first and first != second
    assert len({first, second}) == 2

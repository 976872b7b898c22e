"""The untargeted test's decision: where a small untargeted trigger sends the inputs.

The matrices are the held-apart defender digits (true class x predicted class)
under the untargeted triggers reversed from real MNIST nets: a clean
BatchNorm net (natural universal perturbation: three "sink" classes), a blend
all-to-all BadNet (class c -> c + 1) and an all-to-one one.
"""

import numpy as np
import pytest

from tf_backdoor_defense.scan._scan import ALL_TO_ONE_SHARE, untargeted_test
from tf_backdoor_defense.scan._statistics import matching_share

CLEAN_SINKS = np.array([
    [15, 0, 0, 0, 0, 0, 0, 0, 6, 0], [15, 0, 0, 0, 9, 0, 0, 0, 0, 0],
    [10, 0, 3, 0, 5, 0, 0, 0, 13, 0], [7, 0, 0, 2, 2, 0, 0, 0, 12, 0],
    [5, 0, 0, 0, 10, 0, 0, 0, 8, 0], [2, 0, 0, 0, 3, 0, 0, 0, 17, 0],
    [5, 0, 0, 0, 1, 0, 0, 0, 15, 0], [7, 0, 0, 0, 16, 0, 0, 0, 7, 0],
    [3, 0, 0, 0, 0, 0, 0, 0, 22, 0], [11, 0, 0, 0, 3, 0, 0, 0, 16, 0]])
BLEND_ALL_TO_ALL = np.array([
    [7, 14, 0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 20, 0, 0, 3, 0, 0, 0, 0],
    [0, 4, 5, 20, 0, 1, 1, 0, 0, 0], [0, 0, 0, 10, 13, 0, 0, 0, 0, 0],
    [3, 0, 0, 0, 5, 15, 0, 0, 0, 0], [0, 0, 0, 0, 0, 8, 14, 0, 0, 0],
    [0, 4, 0, 0, 0, 0, 6, 11, 0, 0], [1, 0, 1, 0, 1, 9, 0, 2, 16, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 14, 9], [29, 0, 0, 0, 0, 0, 1, 0, 0, 0]])
SETTINGS = dict(tested=True, threshold=0.35, matching_threshold=0.5)


def _one_target(target=4, per_class=20):
    pairs = np.zeros((10, 10), np.int64)
    pairs[:, target] = per_class
    return pairs


def test_measured_matrices_score_as_measured():
    assert matching_share(CLEAN_SINKS) == pytest.approx(0.24, abs=0.01)
    assert matching_share(BLEND_ALL_TO_ALL) == pytest.approx(0.84, abs=0.01)


def test_a_small_natural_perturbation_with_sink_classes_is_no_backdoor():
    found = untargeted_test(CLEAN_SINKS, 0.79, 0.33, **SETTINGS)
    assert found["small"] and not found["fired"] and not found["all_to_all"]
    assert found["dominant_class"] == 8 and found["dominant_share"] < ALL_TO_ONE_SHARE


def test_a_one_to_one_map_is_all_to_all():
    found = untargeted_test(BLEND_ALL_TO_ALL, 0.74, 0.33, **SETTINGS)
    assert found["small"] and found["fired"] and found["all_to_all"]


def test_inputs_moved_to_one_class_are_all_to_one_not_all_to_all():
    found = untargeted_test(_one_target(4), 0.9, 0.1, **SETTINGS)
    assert found["fired"] and not found["all_to_all"]
    assert found["dominant_class"] == 4 and found["dominant_share"] == 1.0


@pytest.mark.parametrize("change", [dict(statistic=0.5), dict(flip_rate=0.4),
                                    dict(tested=False)])
def test_a_trigger_that_is_not_small_fires_nothing_whatever_its_map(change):
    kwargs = dict(SETTINGS, statistic=0.33, flip_rate=0.74)
    kwargs.update(change)
    found = untargeted_test(BLEND_ALL_TO_ALL, **kwargs)
    assert not found["small"] and not found["fired"]


def test_the_matching_bar_is_the_callers():
    found = untargeted_test(BLEND_ALL_TO_ALL, 0.74, 0.33, tested=True, threshold=0.35,
                            matching_threshold=0.9)
    assert found["small"] and not found["all_to_all"]


def test_nothing_moved_gives_nan_shares_and_no_verdict():
    found = untargeted_test(np.eye(10, dtype=np.int64) * 5, 0.0, 0.1, **SETTINGS)
    assert np.isnan(found["matching_share"]) and found["dominant_class"] is None
    assert not found["fired"]


def test_matching_share_rejects_a_non_square_matrix():
    with pytest.raises(ValueError, match="square"):
        matching_share(np.ones((3, 4)))


# -- the class map an all-to-all repair searches along -----------------------------------
def test_the_blend_all_to_all_map_is_recovered_from_its_measured_matrix():
    from tf_backdoor_defense.scan._statistics import matching_map

    assert matching_map(BLEND_ALL_TO_ALL).tolist() == [(c + 1) % 10 for c in range(10)]
    found = untargeted_test(BLEND_ALL_TO_ALL, 0.74, 0.33, **SETTINGS)
    assert found["class_map"] == [(c + 1) % 10 for c in range(10)]


def test_the_map_never_sends_a_class_to_itself():
    from tf_backdoor_defense.scan._statistics import matching_map

    for pairs in (CLEAN_SINKS, _one_target(4), np.eye(10, dtype=np.int64)):
        found = matching_map(pairs)
        assert found.dtype == np.int64 and found.shape == (10,)
        assert np.all(found != np.arange(10)) and found.min() >= 0 and found.max() <= 9
    # All to class 4: class 4 itself goes where the others' moved inputs went most, after 4.
    assert matching_map(_one_target(4))[4] != 4


def test_nothing_moved_gives_no_map():
    found = untargeted_test(np.eye(10, dtype=np.int64) * 5, 0.0, 0.1, **SETTINGS)
    assert found["class_map"] is None


def test_matching_map_refuses_a_matrix_that_is_not_square():
    from tf_backdoor_defense.scan._statistics import matching_map

    with pytest.raises(ValueError, match="square"):
        matching_map(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        matching_map(np.zeros((1, 1)))


@pytest.mark.parametrize("all_to_all, class_map, expected", [
    (True, [1, 2, 0], [1, 2, 0]), (False, [1, 2, 0], None), (True, None, None)])
def test_scan_result_gives_the_map_only_for_an_all_to_all_suspicion(all_to_all, class_map,
                                                                   expected):
    import dataclasses

    from tf_backdoor_defense.scan._scan import ScanResult

    values = {field.name: None for field in dataclasses.fields(ScanResult)}
    values.update(all_to_all_suspected=all_to_all, untargeted={"class_map": class_map})
    found = ScanResult(**values).all_to_all_map
    assert (found is None) if expected is None else (found.tolist() == expected)

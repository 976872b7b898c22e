"""The targeted test's decision: which classes' reversed triggers make them suspects.

The mask sizes are those the scan reversed from real MNIST nets (750 defender
digits): a LeNet BadNet whose trigger is a sinusoidal signal over the whole
image (target 0) and a clean LeNet.
"""

import numpy as np
import pytest

from tf_backdoor_defense.scan._scan import targeted_suspects
from tf_backdoor_defense.scan._statistics import anomaly_index

SIGNAL_TARGET_0 = [37.42, 193.37, 116.80, 121.49, 129.15, 119.03, 110.49, 142.70, 78.20, 118.42]
CLEAN = [135.67, 169.62, 105.10, 91.60, 123.02, 92.09, 122.67, 131.32, 85.63, 110.88]
TIERS = [(2.0, 0.2), (3.0, 0.35)]


def _suspects(sizes, tiers=TIERS, rates=None):
    rates = np.ones(len(sizes)) if rates is None else rates
    return targeted_suspects(list(range(len(sizes))), sizes, anomaly_index(sizes), rates, tiers)


def test_measured_sizes_score_as_measured():
    signal, clean = anomaly_index(SIGNAL_TARGET_0), anomaly_index(CLEAN)
    assert signal[0] == pytest.approx(9.98, abs=0.02)
    assert SIGNAL_TARGET_0[0] / np.median(SIGNAL_TARGET_0) == pytest.approx(0.32, abs=0.01)
    assert clean.max() == pytest.approx(1.54, abs=0.02)


def test_a_signal_target_needs_the_strong_tier():
    assert _suspects(SIGNAL_TARGET_0, tiers=TIERS[:1]) == []
    assert _suspects(SIGNAL_TARGET_0, tiers=[TIERS[0], (None, 0.35)]) == []
    assert _suspects(SIGNAL_TARGET_0) == [0]


def test_a_clean_net_has_no_suspect_in_either_tier():
    assert _suspects(CLEAN) == []
    # Its easiest class (8, index 1.5) is 0.7 x the median: no tier takes it.
    assert _suspects(CLEAN, tiers=[(1.0, 0.35)]) == []


def test_each_tier_needs_both_its_index_and_its_size():
    sizes = [40.0, 100, 104, 98, 101, 99, 103, 97, 102, 100]   # class 0: 0.4 x, a huge index
    assert anomaly_index(sizes)[0] > 10
    assert _suspects(sizes) == []
    assert _suspects(sizes, tiers=[(3.0, 0.45)]) == [0]
    assert _suspects(sizes, tiers=[(100.0, 0.45)]) == []


def test_a_trigger_that_fails_on_held_apart_inputs_is_no_suspect():
    rates = np.ones(10)
    rates[0] = 0.4
    assert _suspects(SIGNAL_TARGET_0, rates=rates) == []


def test_suspects_come_most_anomalous_first():
    sizes = [15.0, 10, 100, 104, 98, 101, 99, 103, 97, 102]
    assert _suspects(sizes) == [1, 0]


def test_the_second_tier_adds_nothing_beside_a_first_tier_target():
    # Blend all-to-one BadNet (seed 0): target 4 far below the rest; the natural sink 8 at
    # 0.3 x with index above 3 passes the second tier alone.
    sizes = [100.0, 104, 98, 101, 6, 99, 103, 97, 30, 102]
    assert anomaly_index(sizes)[8] > 3 and sizes[8] / np.median(sizes) < 0.35
    assert _suspects(sizes) == [4]
    assert _suspects(sizes, tiers=[(3.0, 0.35)]) == [4, 8]


def test_the_second_tier_names_one_class_at_most():
    sizes = [30.0, 100, 104, 98, 101, 99, 103, 97, 33, 102]
    index = anomaly_index(sizes)
    assert index[0] > index[8] > 3
    assert _suspects(sizes) == [0]

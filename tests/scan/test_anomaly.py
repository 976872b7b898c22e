"""The anomaly index: median absolute deviation, below-median positive, log scale."""

import numpy as np
import pytest

from tf_backdoor_defense.scan import MAD_CONSISTENCY, anomaly_index


def test_matches_the_definition_on_raw_values():
    values = np.array([10.0, 12.0, 9.0, 11.0, 2.0])
    median = 10.0
    deviation = MAD_CONSISTENCY * np.median(np.abs(values - median))
    np.testing.assert_allclose(anomaly_index(values, log=False), (median - values) / deviation)


def test_log_scale_is_symmetric_in_ratios():
    index = anomaly_index(np.array([100.0, 50.0, 200.0, 100.0, 100.0, 80.0, 125.0]))
    assert index[1] == pytest.approx(-index[2])
    assert index[0] == pytest.approx(0.0)


def test_small_value_is_positive_and_large_value_negative():
    index = anomaly_index(np.array([90.0, 100.0, 110.0, 95.0, 105.0, 3.0, 900.0]))
    assert index[5] > 2 and index[6] < -2
    assert np.argmax(index) == 5


def test_scale_free():
    values = np.array([40.0, 55.0, 61.0, 47.0, 4.0])
    np.testing.assert_allclose(anomaly_index(values), anomaly_index(values * 37.0))


@pytest.mark.parametrize("values", [[1.0, 2.0], [5.0, 5.0, 5.0, 5.0], [np.nan, 1.0, np.nan]])
def test_undefined_cases_give_nan(values):
    assert np.all(np.isnan(anomaly_index(np.array(values))))


def test_nan_entries_are_ignored():
    index = anomaly_index(np.array([10.0, np.nan, 11.0, 9.0, 1.0]))
    assert np.isnan(index[1])
    assert np.isfinite(index[[0, 2, 3, 4]]).all()
    np.testing.assert_allclose(index[[0, 2, 3, 4]], anomaly_index(np.array([10.0, 11.0, 9.0, 1.0])))

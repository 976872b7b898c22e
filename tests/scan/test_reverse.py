"""The batched trigger optimisation: parametrisation, value range, success and determinism."""

import numpy as np
import pytest

from tf_backdoor_defense.scan._reverse import (UNTARGETED, ReverseSettings, Slots, TriggerOptimizer,
                                               infer_value_range, stamp)


@pytest.mark.parametrize("low, high, expected", [
    (0.0, 1.0, (0.0, 1.0)), (0.2, 0.9, (0.0, 1.0)), (-0.5, 1.0, (-1.0, 1.0)),
    (0.0, 255.0, (0.0, 255.0)), (3.0, 200.0, (0.0, 255.0)), (-3.0, 4.5, (-3.0, 4.5)),
    (0.0, 16.0, (0.0, 16.0)), (0.0, 0.4, (0.0, 0.4)),  # fit a range, span less than half
])
def test_infer_value_range(low, high, expected):
    assert infer_value_range(np.array([low, high])) == expected


def test_stamp_blends_mask_and_pattern():
    x = np.full((2, 2, 2, 1), 0.5, np.float32)
    mask = np.array([[1.0, 0.0], [0.25, 0.0]], np.float32)[..., None]
    pattern = np.ones((2, 2, 1), np.float32)
    out = stamp(x, mask, pattern)
    np.testing.assert_allclose(out[0, :, :, 0], [[1.0, 0.5], [0.625, 0.5]])
    assert out.dtype == np.float32 and float(x.max()) == 0.5  # the input is not changed


def test_images_stay_in_range():
    optimizer = TriggerOptimizer.__new__(TriggerOptimizer)
    optimizer.low, optimizer.high = 0.0, 255.0
    mask, pattern = optimizer.to_images(np.array([-50.0, 0.0, 50.0]), np.array([-50.0, 0.0, 50.0]))
    np.testing.assert_allclose(mask, [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(pattern, [0.0, 127.5, 255.0], atol=1e-3)


def _run(planted, kind, seed=1, steps=150):
    x, y = planted["data"]
    targets = np.array([0, 2, UNTARGETED])
    pools = [np.flatnonzero(y != 0), np.flatnonzero(y != 2), np.arange(len(y))]
    settings = ReverseSettings(init_cost=1e-2, max_images_per_step=40)  # 2 slots per step
    optimizer = TriggerOptimizer(planted[kind], x, y, (0.0, 1.0), settings, seed)
    return optimizer, optimizer.run(Slots(targets, pools, np.array([0.99, 0.99, 0.8])),
                                    steps=steps)


def test_backdoor_target_needs_the_smallest_mask(planted):
    optimizer, out = _run(planted, "all-to-one")
    assert out["reached"].all()
    assert out["l1"][1] < 3.0 < 10.0 < out["l1"][0]  # class 2 is the target: one pixel
    masks, patterns = optimizer.to_images(out["mask_w"], out["pattern_w"])
    assert masks.shape == (3, 8, 8, 1) and patterns.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(masks.sum(axis=(1, 2, 3)), out["l1"], rtol=1e-4)
    assert masks[1].reshape(-1).argmax() == 63  # the trigger pixel (7, 7)


def test_all_to_all_trigger_is_found_untargeted(planted):
    _, clean = _run(planted, "clean")
    _, bad = _run(planted, "all-to-all")
    assert bad["l1"][2] < 0.3 * clean["l1"][2]


def test_same_seed_same_result_other_seed_other_start(planted):
    _, first = _run(planted, "all-to-one", seed=3, steps=30)
    _, second = _run(planted, "all-to-one", seed=3, steps=30)
    _, other = _run(planted, "all-to-one", seed=4, steps=30)
    np.testing.assert_array_equal(first["mask_w"], second["mask_w"])
    np.testing.assert_array_equal(first["l1"], second["l1"])
    assert not np.array_equal(first["mask_w"], other["mask_w"])


def test_batch_is_capped_by_the_smallest_pool(planted):
    x, y = planted["data"]
    optimizer = TriggerOptimizer(planted["clean"], x, y, (0.0, 1.0), ReverseSettings(), 0)
    slots = Slots(np.array([0, 1]), [np.arange(5), np.arange(100)])
    assert optimizer.batch_size(slots) == 5
    assert optimizer.chunk_size(2, 5) == 2
    assert TriggerOptimizer(planted["clean"], x, y, (0.0, 1.0),
                            ReverseSettings(max_images_per_step=6), 0).chunk_size(2, 5) == 1


def test_an_input_shape_that_does_not_fit_the_view_is_refused(planted):
    x, y = planted["data"]
    with pytest.raises(ValueError, match=r"cannot be viewed as the model's input shape \(63,\)"):
        TriggerOptimizer(planted["clean"], x, y, (0.0, 1.0), ReverseSettings(), 0,
                         input_shape=(63,))
    assert TriggerOptimizer(planted["clean"], x, y, (0.0, 1.0), ReverseSettings(), 0,
                            input_shape=(64,)).input_shape == (64,)

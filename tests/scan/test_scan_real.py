"""The scan on real networks: an MNIST BadNet trained here, and the lab's face BadNet."""

import numpy as np
import pytest

from tf_backdoor_defense.scan import scan_model


@pytest.mark.slow
def test_mnist_badnet_target_is_named():
    from tf_backdoor_defense.attacks import all_to_all_shift, pixel_pattern
    from tf_backdoor_defense.experiments import load_mnist_digits, mnist_cnn, split, train_badnet

    x, y = load_mnist_digits()
    (x_attacker, y_attacker), (x_defender, y_defender) = split(x, y, [2000, 500], seed=3)
    for target in (4, "all-to-all"):
        mapping = all_to_all_shift(10) if target == "all-to-all" else target
        model = train_badnet(x_attacker, y_attacker, pixel_pattern(1.0), target=mapping,
                             epochs=10, model=mnist_cnn(padding="same", seed=0))
        result = scan_model(model, (x_defender, y_defender), seed=0)
        if target == "all-to-all":
            assert result.all_to_all_suspected and result.suspected_targets == ()
        else:
            assert result.suspected_targets == (4,) and not result.all_to_all_suspected
            mask, _ = result.trigger(4)
            assert mask[-4:, -4:].sum() > 0.8 * mask.sum()  # in the trigger's corner


@pytest.mark.slow
@pytest.mark.shared_data
def test_face_badnet_scan_runs_on_raw_pixels(lab3_dir):
    """Five clean faces, 1,283 classes, pixels 0..255: the scan runs and keeps the range.

    It does not name class 0 from five faces (see benchmarks/scan_detection.py --face).
    """
    from tf_backdoor_defense import load_data, load_model

    model = load_model(lab3_dir / "bd_net.h5")
    x, y = load_data(str(lab3_dir / "faces" / "cl_*.png"))
    result = scan_model(model, (x, y), candidates=list(range(12)), steps=30, seed=0)
    assert result.value_range == (0.0, 255.0) and result.success_data == "optimisation"
    assert len(result.table) == 1283 and result.classes == tuple(range(12))
    assert 0.0 <= result.patterns.min() and result.patterns.max() <= 255.0
    assert not result.untargeted["tested"]
    stamped = result.apply(x, 0)
    assert stamped.shape == x.shape and np.all((stamped >= 0) & (stamped <= 255))

"""The scan and the repairs' training loops under tf.distribute, against one device.

The slow tests run the scan of the planted all-to-one net (tests/scan/planted.py) and trigger
unlearning in fresh processes, with the harness of tests/scoring/test_distributed.py:
MirroredStrategy on 2 logical CPUs (the model built in ``strategy.scope()``, no ``strategy=``
argument) and MultiWorkerMirroredStrategy with 2 workers on 127.0.0.1 (``strategy=`` passed).
The quick tests check that no strategy and the default strategy are the same code and result.
"""

import textwrap

import numpy as np
import pytest

from conftest import distributed_harness, tiny_conv_model
from tf_backdoor_defense._keras import tf
from tf_backdoor_defense.defenses._ibau import ibau
from tf_backdoor_defense.defenses._unlearning import unlearn_triggers
from tf_backdoor_defense.finetune._training import train_clean
from tf_backdoor_defense.scan import scan_model

SCAN = dict(steps=150, init_cost=1e-2, seed=1)
UNLEARN = dict(epochs=2, batch_size=25, seed=3)


def _trigger():
    from planted import TRIGGER  # tests/scan/planted.py

    mask = np.zeros((8, 8, 1), np.float32)
    mask[TRIGGER] = 1.0
    return mask, np.ones((8, 8, 1), np.float32)


def _summary(scan, repaired, x):
    return {"verdict": scan.verdict, "suspected": list(scan.suspected_targets),
            "tests": scan.tests, "rates": scan.table["attack_success_rate"].tolist(),
            "mask_l1": scan.table["mask_l1"].tolist(),
            "flip_rate": scan.untargeted["flip_rate"],
            "weights": [w.tolist() for w in repaired.get_weights()],
            "predictions": np.argmax(repaired.predict(x, verbose=0), axis=1).tolist()}


WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path[:0] = {paths!r}
    mode, out = sys.argv[1:3]
""") + distributed_harness().STRATEGY + textwrap.dedent("""
    from planted import planted_data, planted_model
    from test_scan_distributed import SCAN, UNLEARN, _summary, _trigger
    from tf_backdoor_defense.defenses._unlearning import unlearn_triggers
    from tf_backdoor_defense.scan import scan_model
    x, y = planted_data()
    build = lambda: planted_model("all-to-one")  # noqa: E731
""") + distributed_harness().MODEL + textwrap.dedent("""
    scan = scan_model(model, (x, y), **SCAN, **options)
    repaired = unlearn_triggers(model, (x, y), [_trigger()], **UNLEARN, **options)
    result = _summary(scan, repaired, x)
    result["replicas"] = strategy.num_replicas_in_sync
    with open(out, "w") as handle:
        json.dump(result, handle)
""")


@pytest.fixture(scope="module")
def reference(planted):
    """The single-device scan and unlearning, and the worker script."""
    x, y = planted["data"]
    scan = scan_model(planted["all-to-one"], (x, y), **SCAN)
    repaired = unlearn_triggers(planted["all-to-one"], (x, y), [_trigger()], **UNLEARN)
    return _summary(scan, repaired, x)


def _check(result, reference):
    assert result["replicas"] == 2
    assert result["verdict"] == reference["verdict"] and "target class 2" in result["verdict"]
    assert result["suspected"] == reference["suspected"] == [2]
    assert result["tests"] == reference["tests"]
    assert result["rates"] == reference["rates"]  # counts of predictions: exact
    assert result["flip_rate"] == reference["flip_rate"]
    # Masks and weights: gradients summed over the replicas in another order.
    np.testing.assert_allclose(result["mask_l1"], reference["mask_l1"], rtol=1e-3)
    for got, want in zip(result["weights"], reference["weights"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert result["predictions"] == reference["predictions"]


def _script(tmp_path):
    return distributed_harness().worker_script(WORKER, tmp_path, 'scan')


@pytest.mark.slow
def test_mirrored_strategy_scan_and_unlearning_match_one_device(reference, tmp_path):
    _check(distributed_harness().run_mirrored(_script(tmp_path), [], tmp_path), reference)


@pytest.mark.slow
def test_two_workers_scan_and_unlearning_match_one_device_and_each_other(reference, tmp_path):
    results = distributed_harness().run_two_workers(_script(tmp_path), [], tmp_path)
    for result in results:
        _check(result, reference)
    assert results[0] == results[1]  # every worker ends with the same triggers and weights


@pytest.mark.slow  # an integration run of many compiled steps (the slow set)
def test_no_strategy_and_the_default_strategy_give_identical_results(planted):
    x, y = planted["data"]
    model = planted["all-to-one"]
    default = tf.distribute.get_strategy()
    scans = [scan_model(model, (x, y), steps=20, seed=2, strategy=s) for s in (None, default)]
    assert scans[0].verdict == scans[1].verdict
    assert np.array_equal(scans[0].masks, scans[1].masks)
    assert scans[0].table.drop(columns="stage").equals(scans[1].table.drop(columns="stage"))
    tiny = tiny_conv_model()
    rng = np.random.default_rng(0)
    tx, ty = rng.random((40, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, size=40)
    mask = np.zeros((8, 8, 1), np.float32)
    mask[-2:, -2:] = 1.0
    for repair in (lambda s: unlearn_triggers(tiny, (tx, ty), [(mask, np.ones_like(mask))],
                                              epochs=1, batch_size=16, strategy=s),
                   lambda s: ibau(tiny, (tx, ty), rounds=1, inner_steps=2, batch_size=16,
                                  strategy=s),
                   lambda s: train_clean(tiny, (tx, ty), epochs=1, batch_size=16, sam_rho=0.05,
                                         strategy=s)):
        first, second = repair(None), repair(default)
        for a, b in zip(first.get_weights(), second.get_weights()):
            assert np.array_equal(a, b)


def test_a_strategy_of_the_wrong_type_is_refused(planted):
    with pytest.raises(TypeError, match="'strategy' parameter must be a tf.distribute.Strategy"):
        scan_model(planted["all-to-one"], planted["data"], steps=1, strategy="mirrored")

"""prune_to_threshold under tf.distribute, against one device.

The slow tests sweep the tiny conv model of conftest in fresh processes, with the harness of
tests/scoring/test_distributed.py: MirroredStrategy on 2 logical CPUs (the model built in
``strategy.scope()``, no ``strategy=`` argument) and MultiWorkerMirroredStrategy with 2 workers
on 127.0.0.1 (``strategy=`` passed). One layer is swept with the statistics' pass kept whole,
kept in part (a small memory budget) and ranked on other data; two layers with ``steps``. The
history tables, chosen levels, rankings and masks must equal those of one device, and the
channel means agree within float32 rounding (each replica's forward pass sees other batches).
examples/multi_worker_sweep.py runs on 2 workers and compares its workers' tables with one
device's itself. The quick test checks that no strategy and the default strategy are the same
code and result.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, distributed_harness, tiny_conv_model
from tf_backdoor_defense._keras import tf
from tf_backdoor_defense.pruning._sweep import prune_to_threshold

EXAMPLE = REPO / "examples" / "multi_worker_sweep.py"
BATCH = 10  # 52 examples: uneven last batches, and each replica gets 5 rows of a full batch

# Keyword arguments of each sweep; "ranking_data" is replaced by the first 30 clean examples.
CASES = {
    "one_layer": dict(layers="conv_b", max_accuracy_drop=[0.05, 0.2]),
    "one_layer_budget": dict(layers="conv_b", max_accuracy_drop=0.2, memory_budget=3000),
    "one_layer_ranked_apart": dict(layers="conv_b", max_accuracy_drop=0.2, ranking_data=True),
    "two_layers": dict(layers=["conv_b", "fc"], steps=4, max_accuracy_drop=[0.05, 0.2]),
}


def _sweeps(model, x, y, px, py, **options):
    """Every case of CASES swept on ``model``, summarised as JSON-ready values."""
    results = {}
    for key, kwargs in CASES.items():
        kwargs = dict(kwargs)
        if kwargs.pop("ranking_data", False):
            kwargs["ranking_data"] = (x[:30], y[:30])
        result = prune_to_threshold(model, (x, y), poisoned_validation_data=(px, py), target=0,
                                    batch_size=BATCH, **kwargs, **options)
        results[key] = {
            "history": result.history.to_dict(orient="list"),
            "levels": [[t, int(k)] for t, k in result.levels.items()],
            "rankings": {name: order.tolist() for name, order in result.rankings.items()},
            "means": {name: means.tolist() for name, means in result.mean_activations.items()},
            "masks": [[t, {name: mask.tolist() for name, mask in masks.items()}]
                      for t, masks in result.masks.items()],
        }
    return results


WORKER = textwrap.dedent("""
    sys.path.insert(0, {pruning_tests!r})
    from test_sweep_distributed import _sweeps
""") + distributed_harness().MODEL + textwrap.dedent("""
    result = _sweeps(model, x, y, saved["px"], saved["py"], **options)
    result["replicas"] = strategy.num_replicas_in_sync
    with open(out, "w") as handle:
        json.dump(result, handle)
""")


def _data():
    rng = np.random.default_rng(0)
    model = tiny_conv_model(channels=8)
    x = rng.random((52, 8, 8, 1), dtype=np.float32)
    y = np.argmax(model.predict(x, verbose=0), axis=1)
    px = np.clip(x[:26] + 0.5 * (rng.random((26, 8, 8, 1)) > 0.7), 0, 1).astype(np.float32)
    return model, x, y, px, y[:26]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-device sweeps, and the worker script with its saved weights and data."""
    harness = distributed_harness()
    model, x, y, px, py = _data()
    tmp = tmp_path_factory.mktemp("sweep_distributed")
    weights = model.get_weights()
    npz = tmp / "setup.npz"
    np.savez(npz, x=x, y=y, px=px, py=py, n=len(weights),
             **{f"w{i}": w for i, w in enumerate(weights)})
    script = tmp / "worker.py"
    script.write_text(harness.HEADER.format(tests=str(REPO / "tests"),
                                            example=str(harness.EXAMPLE))
                      + WORKER.format(pruning_tests=str(REPO / "tests" / "pruning")))
    return {"sweeps": json.loads(json.dumps(_sweeps(model, x, y, px, py))), "npz": npz,
            "script": script, "harness": harness}


def _check(result, reference):
    assert result["replicas"] == 2
    for key, want in reference["sweeps"].items():
        got = result[key]
        assert got["history"] == want["history"], key  # counts of predictions: exact
        assert got["levels"] == want["levels"], key
        assert got["rankings"] == want["rankings"], key
        assert got["masks"] == want["masks"], key
        for name, means in want["means"].items():  # float32 passes over other batches
            np.testing.assert_allclose(got["means"][name], means, rtol=1e-6, atol=1e-9)
    assert any(k > 0 for _, k in reference["sweeps"]["one_layer"]["levels"])  # something pruned


@pytest.mark.slow
def test_mirrored_strategy_sweeps_match_one_device(reference, tmp_path):
    harness = reference["harness"]
    out, log = tmp_path / "mirrored.json", tmp_path / "mirrored.log"
    proc = subprocess.Popen([sys.executable, str(reference["script"]), "mirrored",
                             str(reference["npz"]), str(out)],
                            env=harness._env(), stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    harness._run([proc], [log])
    _check(json.loads(out.read_text()), reference)


@pytest.mark.slow
def test_two_workers_sweeps_match_one_device_and_each_other(reference, tmp_path):
    results = reference["harness"].run_two_workers(reference["script"], [reference["npz"]],
                                                   tmp_path)
    for result in results:
        _check(result, reference)
    assert results[0] == results[1]  # every worker ends with the same table and masks


@pytest.mark.slow
def test_the_multi_worker_sweep_example_gives_one_devices_table(tmp_path):
    harness = distributed_harness()
    log = tmp_path / "example.log"
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--workers", "2", "--badnet-epochs", "1",
                           "--examples", "400"], env=harness._env(), capture_output=True,
                          text=True, timeout=2 * harness.TIMEOUT)
    log.write_text(proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "clean_accuracy" in proc.stdout  # the table
    assert "every worker's table equals one device's: True" in proc.stdout


def test_no_strategy_and_the_default_strategy_give_identical_sweeps():
    model, x, y, px, py = _data()
    default = tf.distribute.get_strategy()
    for kwargs in CASES.values():
        kwargs = dict(kwargs)
        if kwargs.pop("ranking_data", False):
            kwargs["ranking_data"] = (x[:30], y[:30])
        first, second = (prune_to_threshold(model, (x, y), poisoned_validation_data=(px, py),
                                            target=0, batch_size=BATCH, strategy=s, **kwargs)
                         for s in (None, default))
        assert first.history.equals(second.history)
        assert first.levels == second.levels
        for t in first.masks:
            for name, mask in first.masks[t].items():
                assert np.array_equal(mask, second.masks[t][name])
        for name, means in first.mean_activations.items():
            assert np.array_equal(means, second.mean_activations[name])


def test_a_strategy_of_the_wrong_type_is_refused():
    model, x, y, _, _ = _data()
    with pytest.raises(TypeError, match="'strategy' parameter must be a tf.distribute.Strategy"):
        prune_to_threshold(model, (x, y), layers="conv_b", strategy="mirrored")

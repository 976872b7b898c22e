"""FinePruning and PruneByActivation under tf.distribute.

Each case runs in fresh Python processes (MirroredStrategy needs its two
logical CPU devices configured before TensorFlow initialises; the
MultiWorkerMirroredStrategy case needs two worker processes talking over
127.0.0.1). The processes load the same initial weights and data as this
process, fine-prune for two epochs with the worker code of
examples/multi_worker_fine_pruning.py and write what they saw to JSON, which
is compared with the single-device result computed here.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, tiny_conv_model
from tf_backdoor_defense.scoring._activations import mean_channel_activations
from tf_backdoor_defense.masks._wrapper import wrap_layers
from tf_backdoor_defense.pruning._sweep import prune_to_threshold

TIMEOUT = 240
DROP = 0.2

EXAMPLE = REPO / "examples" / "multi_worker_fine_pruning.py"


def _load_example():
    """The example as a module (its top level imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("multi_worker_fine_pruning", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The strategy of a worker script, from its `mode` argument: "mirrored" (2 logical CPUs of
# one process, run_mirrored) or "multi_worker" (one of two workers, run_two_workers).
STRATEGY = textwrap.dedent("""
    from tf_backdoor_defense._keras import tf
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
""")

# Each worker runs the example's fine_prune_in_scope on the tiny model and saves what it saw.
# HEADER sets up the strategy, the example module, the data and build(); a body follows.
# The model of a worker script, from build() (which the script defines first): built in the
# mirrored strategy's scope, where the library finds the strategy from the model (no strategy=
# argument), or for the workers outside any scope, with strategy= passed in `options`.
MODEL = textwrap.dedent("""
    if mode == "mirrored":
        with strategy.scope():
            model = build()
        options = dict()
    else:
        model = build()
        options = dict(strategy=strategy)
""")

HEADER = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    mode, npz, out = sys.argv[1:4]
""") + STRATEGY + textwrap.dedent("""
    from conftest import tiny_conv_model
    spec = importlib.util.spec_from_file_location("multi_worker_fine_pruning", {example!r})
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    saved = np.load(npz)
    x, y = saved["x"], saved["y"]
    weights = [saved[f"w{{i}}"] for i in range(int(saved["n"]))]

    def build():
        model = tiny_conv_model(channels=8)
        model.set_weights(weights)
        return model
""")

WORKER = HEADER + textwrap.dedent("""
    from tf_backdoor_defense.scoring._distributed import distributed_channel_means
    from tf_backdoor_defense.masks._wrapper import wrap_layers

    with strategy.scope():
        probe = wrap_layers(build(), "conv_b")
    means = distributed_channel_means(probe, (x, y), "conv_b", strategy=strategy, batch_size=10)
    model, callback, history = example.fine_prune_in_scope(
        strategy, build, (x, y), (x, y), (x[:12], np.zeros(12, int)), layers="conv_b",
        max_accuracy_drop={drop}, epochs=2, batch_size=8, learning_rate=0.05, shuffle=False)
    layer = model.get_layer("conv_b")
    pruned = layer.pruned_channels
    first_masks = [v.numpy().tolist() for v in layer.mask.values]
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[callback])  # reused callback
    result = {{
        "masks_unchanged_by_a_second_fit": [v.numpy().tolist() for v in layer.mask.values]
                                           == first_masks,
        "status": [int(v.numpy()) for v in layer.fine_pruning_status.values],
        "replicas": strategy.num_replicas_in_sync,
        "means": means.tolist(),
        "callback_means": callback.mean_activations_["conv_b"].tolist(),
        "ranking": callback.rankings_["conv_b"].tolist(),
        "replica_masks": [v.numpy().tolist() for v in layer.mask.values],
        "pruned_weights_zero": [bool(np.all(v.numpy()[..., pruned] == 0)) for v in layer.layer.kernel.values]
                               + [bool(np.all(v.numpy()[pruned] == 0)) for v in layer.layer.bias.values],
        "history": {{k: [float(v) for v in vs] for k, vs in history.history.items()}},
    }}
    with open(out, "w") as handle:
        json.dump(result, handle)
""")


@pytest.fixture
def setup(tmp_path):
    """Initial weights and data saved for the workers, and the single-device reference."""
    base = tiny_conv_model(channels=8)
    weights = base.get_weights()  # the workers wrap the layer themselves
    model = wrap_layers(base, "conv_b")
    rng = np.random.default_rng(0)
    x = rng.random((52, 8, 8, 1), dtype=np.float32)  # 52: the last batches are uneven
    y = np.argmax(model.predict(x, verbose=0), axis=1)
    npz = tmp_path / "setup.npz"
    np.savez(npz, x=x, y=y, n=len(weights), **{f"w{i}": w for i, w in enumerate(weights)})
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests"), example=str(EXAMPLE), drop=DROP))
    reference = prune_to_threshold(model, (x, y), layers="conv_b", max_accuracy_drop=DROP)
    means = mean_channel_activations(model, (x, y), layers="conv_b")
    return {"script": script, "npz": npz, "means": means, "mask": reference.masks[DROP]["conv_b"],
            "ranking": reference.rankings["conv_b"], "tmp": tmp_path}


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _run(procs, logs):
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]


def _check(result, setup, replicas):
    assert result["replicas"] == replicas
    np.testing.assert_allclose(result["means"], setup["means"], rtol=1e-6, atol=1e-9)  # float32 forward passes
    np.testing.assert_allclose(result["callback_means"], setup["means"], rtol=1e-6, atol=1e-9)  # float32 forward passes
    assert result["ranking"] == setup["ranking"].tolist()
    for mask in result["replica_masks"]:
        assert mask == setup["mask"].tolist()
    assert all(result["pruned_weights_zero"])
    assert result["masks_unchanged_by_a_second_fit"]
    assert result["status"] and set(result["status"]) == {2}   # done, on every local replica
    history = result["history"]
    assert history["fine_pruning/channels_pruned"] == [float(np.sum(setup["mask"] == 0))] * 2
    assert len(history["fine_pruning/attack_success_rate"]) == 2


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus_matches_single_device(setup):
    result = run_mirrored(setup["script"], [setup["npz"]], setup["tmp"])
    assert len(result["replica_masks"]) == 2
    _check(result, setup, replicas=2)


def worker_script(template, folder, *test_folders):
    """``folder/worker.py`` from ``template``, whose ``{paths!r}`` becomes the list of ``tests``
    and its ``test_folders`` (for ``sys.path[:0] = {paths!r}``)."""
    paths = [str(REPO / "tests")] + [str(REPO / "tests" / name) for name in test_folders]
    script = folder / "worker.py"
    script.write_text(template.format(paths=paths))
    return script


def run_mirrored(script, args, folder):
    """Run ``script mirrored *args OUT`` in a fresh process; its JSON result.

    OUT is ``folder/mirrored.json`` (stderr goes to ``mirrored.log``, shown when it fails).
    """
    out, log = folder / "mirrored.json", folder / "mirrored.log"
    proc = subprocess.Popen([sys.executable, str(script), "mirrored", *map(str, args), str(out)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    _run([proc], [log])
    return json.loads(out.read_text())


def run_two_workers(script, args, folder):
    """Run ``script multi_worker *args OUT`` as two workers on 127.0.0.1; their JSON results.

    Each worker gets its own free port in TF_CONFIG and writes ``folder/worker<i>.json``
    (its stderr goes to ``worker<i>.log``, shown when it fails).
    """
    ports = _load_example().free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs, outs, logs = [], [], []
    for index in range(2):
        outs.append(folder / f"worker{index}.json")
        logs.append(folder / f"worker{index}.log")
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, str(script), "multi_worker", *map(str, args), str(outs[-1])],
            env=_env(TF_CONFIG=config), stdout=subprocess.DEVNULL,
            stderr=logs[-1].open("wb")))
    _run(procs, logs)
    return [json.loads(out.read_text()) for out in outs]


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_two_workers_agree_with_single_device(setup):
    results = run_two_workers(setup["script"], [setup["npz"]], setup["tmp"])
    for result in results:
        _check(result, setup, replicas=2)
    assert results[0]["replica_masks"] == results[1]["replica_masks"]
    assert results[0]["means"] == pytest.approx(results[1]["means"], rel=0, abs=0)
    assert results[0]["history"] == results[1]["history"]


SEVERAL = HEADER + textwrap.dedent("""
    model, callback, history = example.fine_prune_in_scope(
        strategy, build, (x, y), (x, y), (x[:12], np.zeros(12, int)), layers=["conv_b", "fc"],
        max_accuracy_drop={drop}, epochs=2, batch_size=8, learning_rate=0.05, shuffle=False)
    result = {{"masks": {{}}, "zero": []}}
    for name in ("conv_b", "fc"):
        layer = model.get_layer(name)
        pruned = layer.pruned_channels
        result["masks"][name] = [v.numpy().tolist() for v in layer.mask.values]
        result["zero"] += [bool(np.all(v.numpy()[..., pruned] == 0)) for v in layer.layer.kernel.values]
        result["zero"] += [bool(np.all(v.numpy()[pruned] == 0)) for v in layer.layer.bias.values]
    result["channels_pruned"] = history.history["fine_pruning/channels_pruned"]
    from tf_backdoor_defense.finetune._callbacks import FinePruning, GradualChannelSchedule
    from tf_backdoor_defense.masks._wrapper import wrap_layers
    with strategy.scope():
        gradual = wrap_layers(build(), ["conv_b", "fc"])
        gradual.compile("sgd", "sparse_categorical_crossentropy")
    schedule = GradualChannelSchedule(target_fraction=0.5, channels_per_step=1, every_n_steps=2)
    gradual.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0, callbacks=[FinePruning(
        (x, y), layers=["conv_b", "fc"], schedule=schedule, max_accuracy_drop=None)])
    result["gradual"] = {{name: {{
        "masks": [v.numpy().tolist() for v in gradual.get_layer(name).mask.values],
        "steps": [int(v.numpy()) for v in gradual.get_layer(name).fine_pruning_step.values]}}
        for name in ("conv_b", "fc")}}
    with open(out, "w") as handle:
        json.dump(result, handle)
""")


@pytest.mark.slow
def test_mirrored_strategy_prunes_several_layers_like_a_single_device(setup):
    script = setup["tmp"] / "several.py"
    script.write_text(SEVERAL.format(tests=str(REPO / "tests"), example=str(EXAMPLE), drop=DROP))
    saved = np.load(setup["npz"])
    base = tiny_conv_model(channels=8)
    base.set_weights([saved[f"w{i}"] for i in range(int(saved["n"]))])
    reference = prune_to_threshold(wrap_layers(base, ["conv_b", "fc"]), (saved["x"], saved["y"]),
                                   layers=["conv_b", "fc"], max_accuracy_drop=DROP)
    out, log = setup["tmp"] / "several.json", setup["tmp"] / "several.log"
    proc = subprocess.Popen([sys.executable, str(script), "mirrored", str(setup["npz"]), str(out)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    _run([proc], [log])
    result = json.loads(out.read_text())
    total = 0
    for name, mask in reference.masks[DROP].items():
        assert result["masks"][name] == [mask.tolist()] * 2  # both replicas
        total += int(np.sum(mask == 0))
    assert total > 0 and all(result["zero"])
    assert result["channels_pruned"] == [float(total)] * 2
    # The gradual schedule: 4 steps of 16 examples, one channel after steps 2 and 4 (conv_b,
    # then fc), the step counted in the model on both replicas, as on one device.
    from tf_backdoor_defense.finetune._callbacks import FinePruning, GradualChannelSchedule

    single = wrap_layers(base, ["conv_b", "fc"])
    single.compile("sgd", "sparse_categorical_crossentropy")
    schedule = GradualChannelSchedule(target_fraction=0.5, channels_per_step=1, every_n_steps=2)
    single.fit(saved["x"], saved["y"], epochs=1, batch_size=16, shuffle=False, verbose=0,
               callbacks=[FinePruning((saved["x"], saved["y"]), layers=["conv_b", "fc"],
                                      schedule=schedule, max_accuracy_drop=None)])
    for name in ("conv_b", "fc"):
        mask = single.get_layer(name).get_mask()
        assert int(np.sum(mask == 0)) == 1
        assert result["gradual"][name]["masks"] == [mask.tolist()] * 2
        assert result["gradual"][name]["steps"] == [4, 4]

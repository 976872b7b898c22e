"""The command line on real files: subprocesses for the main paths, ``main([...])`` for the rest."""

import argparse
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense.cli import _main as cli
from tf_backdoor_defense.io._loading import load_model


def run_cli(*args, cwd=None):
    """Run ``python -m tf_backdoor_defense ARGS`` and return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "tf_backdoor_defense", *map(str, args)],
                           capture_output=True, text=True, timeout=300, cwd=cwd,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny model, clean data as channels-first HDF5, poisoned data as .npz."""
    root = tmp_path_factory.mktemp("lab")
    model = tiny_conv_model()
    model.save(root / "model.h5")
    rng = np.random.default_rng(0)
    x = rng.random((60, 8, 8, 1), dtype=np.float32)
    y = np.argmax(model.predict(x, verbose=0), axis=1)
    with h5py.File(root / "clean.h5", "w") as handle:
        handle["data"] = np.transpose(x, (0, 3, 1, 2)) * 255.0  # (N, 1, 8, 8), raw pixels
        handle["label"] = y.astype(np.float64)
    poisoned = x.copy()
    poisoned[:, -3:, -3:, :] = 1.0
    np.savez(root / "poisoned.npz", x=poisoned * 255.0, y=np.zeros(60, np.int64))
    np.savez(root / "clean.npz", x=x * 255.0, y=y)
    return root


def test_help_texts_have_examples(capsys):
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    for command in ("inspect", "evaluate", "prune", "fine-prune", "defend", "export", "repair",
                    "demo"):
        assert command in top
    assert "examples:" in top
    assert cli.main(["prune", "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--trust-model-code" in text and "--all-to-all" in text


@pytest.mark.slow  # a subprocess
def test_inspect_subprocess_json(lab):
    done = run_cli("inspect", lab / "model.h5", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["input_shape"] == [8, 8, 1] and info["classes"] == 3
    assert info["default_layer"] == "conv_b"
    assert info["convs_read_by_dense"] == ["conv_b"]  # conv_a is read by conv_b only
    prunable = {row["name"] for row in info["layers"] if row["prunable"]}
    assert prunable == {"conv_a", "conv_b", "fc", "out"}


def test_inspect_names_every_conv_the_classifier_reads_directly(tmp_path, capsys):
    from tf_backdoor_defense._keras import keras

    inputs = keras.Input((8, 8, 1))  # the lab BadNet's shape: conv_3 feeds both conv_4 and fc_1
    c3 = keras.layers.MaxPooling2D(name="pool_3")(
        keras.layers.Conv2D(4, 3, activation="relu", name="conv_3")(inputs))
    c4 = keras.layers.Conv2D(5, 2, activation="relu", name="conv_4")(c3)
    a = keras.layers.Dense(6, name="fc_1")(keras.layers.Flatten()(c3))
    b = keras.layers.Dense(6, name="fc_2")(keras.layers.Flatten()(c4))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Add()([a, b]))
    keras.Model(inputs, outputs).save(tmp_path / "branched.h5")
    assert cli.main(["inspect", str(tmp_path / "branched.h5")]) == 0
    text = capsys.readouterr().out
    assert "default layer to prune: conv_4" in text
    assert "read directly by a dense layer: conv_3, conv_4" in text


@pytest.mark.slow  # a subprocess
def test_prune_subprocess_writes_the_whole_report(lab, tmp_path):
    out = tmp_path / "report"
    done = run_cli("prune", lab / "model.h5", "--clean", lab / "clean.h5", "--poisoned",
                   lab / "poisoned.npz", "--scale", 255, "--thresholds", 0.05, 0.5,
                   "--output", out, "--json", "--keep-wrappers")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    history = pd.read_csv(out / "sweep.csv")
    assert history["channels_pruned"].tolist() == list(range(7))  # conv_b has 6 channels
    assert history["clean_accuracy"].iloc[0] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["clean_accuracy"] == 1.0
    assert set(summary["after"]) == {"0.05", "0.5"}
    assert summary["versions"]["tensorflow"] and "sweep_seconds" in summary["timings"]
    for entry in summary["thresholds"]:
        level = entry["channels_pruned"]
        assert len(entry["pruned_channels"]["conv_b"]) == level  # keyed by layer, also for one
        assert entry["clean_accuracy"] == pytest.approx(history["clean_accuracy"].iloc[level])
        assert 1.0 - entry["clean_accuracy"] <= entry["max_accuracy_drop"] + 1e-9
        model = load_model(out / "models" / f"pruned_drop_{entry['max_accuracy_drop']:g}.h5")
        assert model.get_layer("conv_b").pruned_channels.size == level
    from PIL import Image

    for name in ("sweep.png", "activations.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 300
    assert payload["before"]["clean_accuracy"] == 1.0 and len(payload["thresholds"]) == 2
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_prune_several_layers_together_writes_their_report(lab, tmp_path, capsys):
    out = tmp_path / "both"
    code = cli.main(["prune", str(lab / "model.h5"), "--clean", str(lab / "clean.h5"),
                     "--poisoned", str(lab / "poisoned.npz"), "--scale", "255",
                     "--layer", "conv_b", "fc", "--steps", "4", "--thresholds", "0.05", "1.0",
                     "--output", str(out), "--json", "--keep-wrappers"])
    assert code == 0, capsys.readouterr().err
    payload = json.loads(capsys.readouterr().out)
    assert payload["layers"] == ["conv_b", "fc"] and payload["channels"] == {"conv_b": 6, "fc": 8}
    history = pd.read_csv(out / "sweep.csv")
    assert history["pruned_conv_b"].tolist() == [0, 2, 3, 4, 6]  # round(k / 4 * 6), half to even
    assert history["pruned_fc"].tolist() == [0, 2, 4, 6, 8]
    summary = json.loads((out / "summary.json").read_text())
    everything = summary["thresholds"][1]
    assert everything["channels_pruned"] == 14
    assert {k: len(v) for k, v in everything["pruned_channels"].items()} == {"conv_b": 6, "fc": 8}
    model = load_model(out / "models" / "pruned_drop_1.h5")
    assert model.get_layer("conv_b").pruned_channels.size == 6
    assert model.get_layer("fc").pruned_channels.size == 8
    assert (out / "activations.png").stat().st_size > 0


def test_steps_needs_several_layers(lab, tmp_path, capsys):
    code = cli.main(["prune", str(lab / "model.h5"), "--clean", str(lab / "clean.h5"),
                     "--scale", "255", "--steps", "4", "--output", str(tmp_path / "r")])
    assert code != 0 and "several layers" in capsys.readouterr().err
    assert not (tmp_path / "r" / "sweep.csv").exists()


@pytest.mark.slow  # a subprocess
def test_malicious_lambda_is_refused_and_its_code_never_runs(lab, tmp_path):
    from tf_backdoor_defense._keras import keras

    marker = tmp_path / "PWNED"
    target = str(marker)

    def payload(x):
        open(target, "w").write("attacker code ran")
        return x

    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Lambda(payload, name="preprocess")(inputs)
    model = keras.Model(inputs, tiny_conv_model()(hidden))
    model.save(tmp_path / "evil.h5")
    marker.unlink()
    done = run_cli("evaluate", tmp_path / "evil.h5", "--clean", lab / "clean.npz",
                   "--scale", 255)
    assert done.returncode == 2
    assert not marker.exists()
    assert "preprocess" in done.stderr and "Lambda" in done.stderr
    assert "--trust-model-code" in done.stderr and "Traceback" not in done.stderr
    # the same command with the flag loads the model, so the file really carried the payload
    assert cli.main(["evaluate", str(tmp_path / "evil.h5"), "--clean", str(lab / "clean.npz"),
                     "--scale", "255", "--trust-model-code", "--quiet"]) == 0
    assert marker.exists()


@pytest.mark.slow  # a subprocess
def test_nan_data_exits_2_with_the_file_named(lab, tmp_path):
    bad = tmp_path / "nan.npz"
    x = np.zeros((4, 8, 8, 1))
    x[1, 2, 3, 0] = np.nan
    np.savez(bad, x=x, y=[0, 1, 2, 0])
    done = run_cli("evaluate", lab / "model.h5", "--clean", bad)
    assert done.returncode == 2
    assert "nan.npz" in done.stderr and "NaN" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("x_shape, labels, message", [
    ((4, 9, 9, 1), [0, 1, 2, 0], "expects"),            # wrong shape for the model
    ((4, 8, 8, 1), [0, 1, 2, 7], "label 7 out of range"),
    ((4, 8, 8, 1), [0, 1, 2], "4 inputs but 3 labels"),
    ((0, 8, 8, 1), [], "empty"),
])
def test_bad_data_exits_2_naming_file_and_problem(lab, tmp_path, capsys, x_shape, labels, message):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(x_shape), y=np.asarray(labels, dtype=np.int64))
    code = cli.main(["evaluate", str(lab / "model.h5"), "--clean", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.npz" in err and message in err and "Traceback" not in err


def test_evaluate_modes_and_json(lab, capsys):
    base = ["evaluate", str(lab / "model.h5"), "--clean", str(lab / "clean.h5"), "--scale", "255",
            "--json"]
    assert cli.main(base) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["clean_accuracy"] == 1.0 and result["attack_success_rate"] is None
    assert cli.main(base + ["--poisoned", str(lab / "clean.h5"), "--untargeted"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["attack_success_rate"] == 0.0  # the clean set is all classified right
    assert cli.main(base + ["--poisoned", str(lab / "poisoned.npz"), "--all-to-all", "1"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["attack_success_rate"] <= 1.0
    assert cli.main(base + ["--target", "1", "--untargeted"]) == 2  # mutually exclusive
    assert "not allowed with" in capsys.readouterr().err


def test_existing_outputs_need_force_and_unknown_layer_is_exit_2(lab, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "sweep.csv").write_text("precious\n")
    args = ["prune", str(lab / "model.h5"), "--clean", str(lab / "clean.npz"), "--scale", "255",
            "--thresholds", "0.1", "--no-plots", "--output", str(out), "--quiet"]
    assert cli.main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "sweep.csv").read_text() == "precious\n"
    # --force replaces only an earlier output of this tool, never a folder it did not write
    assert cli.main(args + ["--force"]) == 2
    capsys.readouterr()
    assert (out / "sweep.csv").read_text() == "precious\n"
    ours = tmp_path / "ours"
    args = args[:-2] + [str(ours), "--quiet"]
    assert cli.main(args) == 0
    assert cli.main(args + ["--force"]) == 0
    assert (ours / "sweep.csv").read_text().startswith("channels_pruned,")
    assert cli.main(args + ["--force", "--layer", "nope"]) == 2
    assert "Unknown layer 'nope'" in capsys.readouterr().err


def test_export_repair_and_evaluate_repaired(lab, tmp_path, capsys):
    from tf_backdoor_defense._keras import tf

    out = tmp_path / "report"
    assert cli.main(["prune", str(lab / "model.h5"), "--clean", str(lab / "clean.npz"),
                     "--scale", "255", "--thresholds", "0.2", "--no-plots", "--keep-wrappers",
                     "--output", str(out), "--quiet"]) == 0
    pruned = out / "models" / "pruned_drop_0.2.h5"
    capsys.readouterr()
    assert cli.main(["export", str(pruned), "--output", str(tmp_path / "served"), "--version",
                     "1", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    serve = tf.saved_model.load(exported["output"]).signatures["serving_default"]
    x = np.random.default_rng(1).random((2, 8, 8, 1), dtype=np.float32)
    expected = load_model(pruned)(x).numpy()
    np.testing.assert_allclose(list(serve(tf.constant(x)).values())[0].numpy(), expected,
                               atol=1e-5)
    assert cli.main(["export", str(pruned), "--output", str(tmp_path / "small.keras"),
                     "--shrink", "--quiet"]) == 0
    np.testing.assert_allclose(load_model(tmp_path / "small.keras")(x), expected, atol=1e-5)
    assert "pruned channels removed" in capsys.readouterr().out

    goodnet = tmp_path / "goodnet.h5"
    assert cli.main(["repair", str(lab / "model.h5"), "--pruned", str(pruned), "--output",
                     str(goodnet), "--clean", str(lab / "clean.npz"), "--poisoned",
                     str(lab / "poisoned.npz"), "--scale", "255", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    repaired = load_model(goodnet)
    assert repaired.output_shape == (None, 4)  # 3 classes + "backdoor suspected"
    assert cli.main(["evaluate", str(goodnet), "--repaired", "--clean", str(lab / "clean.npz"),
                     "--poisoned", str(lab / "poisoned.npz"), "--scale", "255", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["clean_accuracy"] == pytest.approx(scores["clean_accuracy"])
    assert again["attack_success_rate"] == pytest.approx(scores["attack_success_rate"])


def test_repair_can_prune_first_from_clean_data(lab, tmp_path, capsys):
    goodnet = tmp_path / "goodnet.keras"
    assert cli.main(["repair", str(lab / "model.h5"), "--clean", str(lab / "clean.npz"),
                     "--scale", "255", "--threshold", "0.2", "--output", str(goodnet),
                     "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["layer"] == "conv_b" and 0 <= payload["channels_pruned"] <= 6
    assert load_model(goodnet).output_shape == (None, 4)
    assert cli.main(["repair", str(lab / "model.h5"), "--output", str(tmp_path / "x.h5")]) == 2
    assert "--pruned" in capsys.readouterr().err


def test_fine_prune_writes_model_history_and_summary(lab, tmp_path, capsys):
    out = tmp_path / "fp"
    assert cli.main(["fine-prune", str(lab / "model.h5"), "--train", str(lab / "clean.npz"),
                     "--clean", str(lab / "clean.npz"), "--poisoned", str(lab / "poisoned.npz"),
                     "--scale", "255", "--epochs", "1", "--threshold", "0.2", "--no-plots",
                     "--output", str(out), "--json", "--keep-wrappers"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(pd.read_csv(out / "history.csv")) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["channels_pruned"] == payload["channels_pruned"]
    model = load_model(out / "fine_pruned.h5")
    assert model.get_layer("conv_b").pruned_channels.size == payload["channels_pruned"]


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal_and_same_results(lab):
    from tf_backdoor_defense.io._data import load_data
    from tf_backdoor_defense.pruning._sweep import prune_to_threshold

    model = load_model(lab / "model.h5")
    data = load_data(lab / "clean.npz", scale=255)
    terminal = _FakeTerminal()
    console = cli.Console(stream=terminal)

    class Args:
        batch_size = 16

    labels = ["statistics and sweep (clean)", "sweep (clean)"]
    streamed = cli._progress_data(data, Args, console, labels)
    with_bars = prune_to_threshold(model, streamed, max_accuracy_drop=0.1, batch_size=16)
    plain = prune_to_threshold(model, data, max_accuracy_drop=0.1, batch_size=16)
    pd.testing.assert_frame_equal(with_bars.history, plain.history)
    drawn = terminal.getvalue()
    # one pass gives the statistics and the sweep's inputs (within the memory budget)
    assert "statistics and sweep (clean)" in drawn and "4/4" in drawn
    assert "\rsweep (clean)" not in drawn and streamed.dataset.passes == 1
    terminal = _FakeTerminal()
    streamed = cli._progress_data(data, Args, cli.Console(stream=terminal), labels)
    again = prune_to_threshold(model, streamed, max_accuracy_drop=0.1, batch_size=16,
                               memory_budget=0)  # nothing kept: the sweep reads the data again
    pd.testing.assert_frame_equal(again.history, plain.history)
    assert streamed.dataset.passes == 2 and "sweep (clean)" in terminal.getvalue()
    assert cli._progress_data(data, Args, cli.Console(stream=io.StringIO()), ["x"]) is data
    assert not cli.Console(stream=_FakeTerminal(), quiet=True).bars


@pytest.mark.shared_data
@pytest.mark.slow  # a subprocess
def test_lab_badnet_inspect_and_evaluate_on_the_faces(lab3_dir, capsys):
    assert cli.main(["inspect", str(lab3_dir / "bd_net.h5"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_shape"] == [55, 47, 3] and info["classes"] == 1283
    conv_3 = next(row for row in info["layers"] if row["name"] == "conv_3")
    assert conv_3["channels"] == 60 and conv_3["prunable"]
    faces = lab3_dir / "faces"
    done = run_cli("evaluate", lab3_dir / "bd_net.h5", "--clean", faces / "cl_*.png",
                   "--poisoned", faces / "sun_*.png", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["clean_examples"] == 5 and result["poisoned_examples"] == 5
    assert result["clean_accuracy"] == 1.0  # raw 0..255 pixels, no --scale
    assert result["attack_success_rate"] == 1.0  # every sunglasses face goes to class 0


@pytest.mark.slow
@pytest.mark.xdist_group("demo")  # one worker trains the demo once for both
def test_demo_writes_its_report(tmp_path, capsys, monkeypatch, demo_run):
    from tf_backdoor_defense.experiments import _demo

    calls = []

    def trained_once(**kwargs):  # the session's demo run stands in for training it again
        calls.append(kwargs)
        return demo_run[0]

    monkeypatch.setattr(_demo, "run_demo", trained_once)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--epochs", "1", "--output", str(out), "--json"]) == 0
    assert calls == [{"epochs": 1, "seed": 0}]
    payload = json.loads(capsys.readouterr().out)
    assert payload["evaluation"][0]["model"] == "BadNet"
    for name in ("sweep.csv", "summary.json", "sweep.png", "activations.png", "evaluation.csv"):
        assert (out / name).is_file()
    assert len(pd.read_csv(out / "sweep.csv")) == 33  # mnist_cnn's last conv: 32 channels


def test_fine_prune_moves_an_epoch_bar_once_per_epoch_on_a_terminal(lab, tmp_path, capsys,
                                                                    monkeypatch):
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    epochs = 3
    assert cli.main(["fine-prune", str(lab / "model.h5"), "--train", str(lab / "clean.npz"),
                     "--clean", str(lab / "clean.npz"), "--poisoned", str(lab / "poisoned.npz"),
                     "--scale", "255", "--epochs", str(epochs), "--threshold", "0.2",
                     "--no-plots", "--output", str(tmp_path / "fp"), "--json"]) == 0
    history = pd.read_csv(tmp_path / "fp" / "history.csv")
    drawn = terminal.getvalue()
    assert "fine-pruning (epochs)" in drawn
    for epoch in range(1, epochs):
        assert drawn.count(f" {epoch}/{epochs} ") == 1  # drawn once, when that epoch ends
    assert drawn.count(f" {epochs}/{epochs} ") == 2  # the last epoch, then the closed bar
    last = drawn.rstrip("\n").split("\r")[-1]
    assert f"loss {history['loss'].iloc[-1]:.4f}" in last
    assert f"acc {history['accuracy'].iloc[-1]:.4f}" in last and "ASR " in last
    assert json.loads(capsys.readouterr().out)["epochs"] == epochs


def test_epoch_progress_callback_updates_its_bar_at_each_epoch_end(lab):
    from tf_backdoor_defense.finetune._fine_prune import fine_prune
    from tf_backdoor_defense.io._data import load_data

    class Recorder:
        def __init__(self):
            self.calls = []

        def update(self, n=1, info=None, force=False):
            self.calls.append((n, info, force))

    data = load_data(lab / "clean.npz", scale=255)
    bar = Recorder()
    from tf_backdoor_defense.cli._fit_progress import EpochProgress

    result = fine_prune(load_model(lab / "model.h5"), data, data, max_accuracy_drop=0.2,
                        epochs=2, callbacks=[EpochProgress(bar)])
    assert [call[0] for call in bar.calls] == [1, 1] and all(call[2] for call in bar.calls)
    for call, loss in zip(bar.calls, result.history["loss"]):
        assert call[1].startswith(f"loss {loss:.4f}  acc ")


@pytest.mark.slow  # a subprocess
def test_fine_prune_subprocess_without_a_terminal_draws_no_bar(lab, tmp_path):
    done = run_cli("fine-prune", lab / "model.h5", "--train", lab / "clean.npz", "--clean",
                   lab / "clean.npz", "--scale", 255, "--epochs", 2, "--threshold", 0.2,
                   "--no-plots", "--output", tmp_path / "fp")
    assert done.returncode == 0, done.stderr
    assert "fine-pruned layer" in done.stdout
    assert "fine-pruning (epochs)" not in done.stderr and "\r" not in done.stderr, done.stderr


TF_NOISE = ("oneDNN", "cuda", "TF_ENABLE_ONEDNN_OPTS", "absl", "E0000", "I0000", "W0000",
            "computation_placer", "cpu_feature_guard")


def _noise(text):
    return [line for line in text.splitlines()
            if any(marker.lower() in line.lower() for marker in TF_NOISE)]


@pytest.mark.slow  # a subprocess
def test_inspect_subprocess_stderr_has_no_tensorflow_startup_lines(lab):
    done = run_cli("inspect", lab / "model.h5")
    assert done.returncode == 0, done.stderr
    assert "conv_b" in done.stdout
    assert not _noise(done.stderr), f"TensorFlow's native lines reached stderr:\n{done.stderr}"


@pytest.mark.slow
def test_session_hides_native_lines_keeps_python_stderr_and_puts_fd_2_back(tmp_path):
    # a fresh process, so that TensorFlow loads inside the session (as in the command)
    code = textwrap.dedent("""
        import os, sys
        from tf_backdoor_defense.cli._console import Console, session
        before = os.fstat(2).st_ino, sys.stderr
        with session(Console(quiet=True), prog="p", quiet_native=True):
            assert "TF_CPP_MIN_LOG_LEVEL" in os.environ
            import tensorflow as tf
            tf.constant(1.0) + 1.0
            os.write(2, b"native line\\n")
            print("python stderr still shows", file=sys.stderr)
        assert (os.fstat(2).st_ino, sys.stderr) == before
        assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
        print("after the session", file=sys.stderr)
    """)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["python stderr still shows", "after the session"], \
        done.stderr


# -- defend ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def defense_files(tmp_path_factory):
    """A tiny model with varied predictions; clean, validation and poisoned .npz files.

    Labels are the model's own predictions: it is 100% accurate on the clean
    files and obeys the "trigger" on every poisoned input (poisoned labels are
    read as the attacker's targets).
    """
    root = tmp_path_factory.mktemp("defend")
    model = tiny_conv_model()
    model.save(root / "model.h5")
    rng = np.random.default_rng(1)
    for name, count in (("train", 64), ("val", 30)):
        x = rng.normal(0.0, 1.0, (count, 8, 8, 1)).astype(np.float32)
        np.savez(root / f"{name}.npz", x=x, y=np.argmax(model.predict(x, verbose=0), axis=1))
    poisoned = rng.normal(0.0, 1.0, (30, 8, 8, 1)).astype(np.float32)
    poisoned[:, -3:, -3:, :] = 3.0
    np.savez(root / "poisoned.npz", x=poisoned,
             y=np.argmax(model.predict(poisoned, verbose=0), axis=1))
    return root


FAST = ["--methods", "ft-cosine", "reinit-head", "--epochs", "1", "--no-scan", "--try-all",
        "--budget-confidence", "0.5"]


def test_defend_help_documents_the_example_and_exit_code_3(capsys):
    assert cli.main(["defend", "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "defend bd_net.h5 --clean" in text
    assert "--fail-if-active" in text and "--trust-model-code" in text and "--target" in text
    assert "exit code is still 0" in text and "3 --fail-if-active" in text
    assert "--interpolate" in text and "0.8 of the way" in text
    for method in ("reinit-head", "prune-search", "ft-cosine"):
        assert method in text
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert f"{cli.PROG} defend bd_net.h5" in top and "3 defend" in top
    assert "defend --fail-if-active" in cli.__doc__


@pytest.mark.slow  # a subprocess
def test_defend_subprocess_writes_the_chosen_model_and_defense_json(defense_files, tmp_path):
    from tf_backdoor_defense.metrics import clean_accuracy

    out = tmp_path / "defended"
    done = run_cli("defend", defense_files / "model.h5", "--clean", defense_files / "train.npz",
                   "--validation", defense_files / "val.npz", *FAST,
                   "--max-accuracy-drop", 1.0, "--output", out, "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)  # stdout holds the JSON only
    rows = payload["methods"]
    assert [row["method"] for row in rows] == ["ft-cosine", "reinit-head"]
    assert [row["method"] for row in rows if row["chosen"]] == [payload["method"]]
    assert payload["method"] == "ft-cosine"  # both within budget, no poisoned data: first
    assert payload["baseline"]["validation_accuracy"] == 1.0
    assert payload["backdoor_still_active"] is False and payload["warnings"] == []
    assert payload["versions"]["tensorflow"] and payload["settings"]["epochs"] == 1
    assert json.loads((out / "defense.json").read_text()) == payload
    assert sorted(p.name for p in out.iterdir()) == [".tf-backdoor-defense-output",
                                                     "defense.json", "repaired.h5"]
    # one progress line per method on stderr
    for method in ("ft-cosine", "reinit-head"):
        assert any(line.startswith(method) and "accuracy" in line
                   for line in done.stderr.splitlines()), done.stderr
    # the file is the chosen model: its accuracy is the table's, and it was fine-tuned
    repaired = load_model(out / "repaired.h5")
    with np.load(defense_files / "val.npz") as val:
        accuracy = clean_accuracy(repaired, (val["x"], val["y"]))
    chosen = next(row for row in rows if row["chosen"])
    assert accuracy == pytest.approx(chosen["validation_accuracy"])
    original = load_model(defense_files / "model.h5")
    assert not all(np.array_equal(a, b)
                   for a, b in zip(original.get_weights(), repaired.get_weights()))


def test_defend_text_table_and_existing_outputs_need_force(defense_files, tmp_path, capsys):
    out = tmp_path / "defended"
    args = ["defend", str(defense_files / "model.h5"), "--clean", str(defense_files / "train.npz"),
            *FAST, "--max-accuracy-drop", "1", "--output", str(out)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    for column in ("val accuracy", "drop", "val ASR", "within budget", "seconds", "chosen"):
        assert column in header
    table = [line.split() for line in lines if line.split()[:1] in (["ft-cosine"],
                                                                    ["reinit-head"])]
    assert [row[0] for row in table] == ["ft-cosine", "reinit-head"]
    assert [row[6] for row in table] == ["*", "re-initialised"]  # chosen mark on the first
    assert table[0][3] == "n/a"  # no poisoned data: no ASR
    assert "chosen: ft-cosine" in captured.out
    assert "defend: trying ft-cosine, reinit-head" in captured.err
    saved = {name: (out / name).read_bytes() for name in ("repaired.h5", "defense.json")}

    assert cli.main(args) == 2  # outputs exist, no --force
    err = capsys.readouterr().err
    assert "--force" in err and str(out) in err
    assert {name: (out / name).read_bytes() for name in saved} == saved

    assert cli.main(args + ["--force", "--quiet", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no notes, and no warning to give
    assert json.loads((out / "defense.json").read_text())["settings"]["seed"] == 1
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_defend_interpolate_option_reaches_defend(defense_files, tmp_path, capsys):
    base = ["defend", str(defense_files / "model.h5"), "--clean", str(defense_files / "train.npz"),
            *FAST, "--max-accuracy-drop", "1"]
    for extra, expected in (([], [0.8]), (["--interpolate"], []),
                            (["--interpolate", "0.9", "0.7"], [0.9, 0.7])):
        out = tmp_path / f"out{len(expected)}{len(extra)}"
        assert cli.main(base + extra + ["--output", str(out), "--quiet"]) == 0
        settings = json.loads((out / "defense.json").read_text())["settings"]
        assert settings["interpolate"] == expected
    capsys.readouterr()
    out = tmp_path / "refused"
    assert cli.main(base + ["--interpolate", "1.5", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "interpolate" in err and "Traceback" not in err
    assert not out.exists() or not any(p.suffix == ".h5" for p in out.iterdir())


def test_defend_bad_data_exits_2_naming_the_file_and_writes_nothing(defense_files, tmp_path,
                                                                    capsys):
    bad = tmp_path / "wrong_shape.npz"
    np.savez(bad, x=np.zeros((4, 9, 9, 1), np.float32), y=np.array([0, 1, 2, 0]))
    out = tmp_path / "defended"
    code = cli.main(["defend", str(defense_files / "model.h5"), "--clean",
                     str(defense_files / "train.npz"), "--validation", str(bad), *FAST,
                     "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "wrong_shape.npz" in err and "expects" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_defend_attack_options_need_poisoned_data(defense_files, tmp_path, capsys):
    base = ["defend", str(defense_files / "model.h5"), "--clean", str(defense_files / "train.npz"),
            "--output", str(tmp_path / "out")]
    for extra in (["--target", "0"], ["--untargeted"]):
        assert cli.main(base + extra) == 2
        assert "need --poisoned" in capsys.readouterr().err
    assert cli.main(base + ["--methods", "nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a subprocess
def test_defend_backdoor_still_active_warns_and_fail_if_active_exits_3(defense_files, tmp_path,
                                                                       capsys):
    # labels of poisoned.npz are the model's own predictions: a 100% "backdoor"; a tiny
    # learning rate leaves it in place
    out = tmp_path / "defended"
    args = ["defend", defense_files / "model.h5", "--clean", defense_files / "train.npz",
            "--poisoned", defense_files / "poisoned.npz", "--methods", "ft-cosine",
            "--epochs", 1, "--learning-rate", 1e-7, "--output", out]
    done = run_cli(*args, "--fail-if-active", "--json")
    assert done.returncode == 3, done.stderr
    payload = json.loads(done.stdout)
    assert payload["backdoor_still_active"] is True
    assert payload["warnings"][0].startswith("backdoor still active on validation")
    assert payload["methods"][0]["validation_asr"] > payload["settings"]["asr_tolerance"]
    assert "warning: backdoor still active on validation" in done.stderr
    assert (out / "repaired.h5").is_file()  # written all the same
    assert json.loads((out / "defense.json").read_text())["backdoor_still_active"] is True

    # without --fail-if-active: exit 0, and the warning shows even with --quiet
    assert cli.main([str(a) for a in args] + ["--force", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "warning: backdoor still active on validation" in captured.err
    assert "backdoor still active on validation" in captured.out.split("warnings:")[1]


# -- help, exit codes, the console -------------------------------------------------------------
COMMANDS = ("inspect", "evaluate", "prune", "fine-prune", "defend", "export", "repair", "demo")


def _options_help(parser):
    """``{option or positional: help text}`` of every argument of ``parser``."""
    return {(action.option_strings or [action.metavar or action.dest])[-1]: action.help
            for action in parser._actions}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_gives_every_argument_a_text_and_each_default_once(command, capsys):
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    joined = " ".join(text.split())  # the help is wrapped: look at it as one line
    for match in re.finditer(r"\(default: [^)]*\)", joined):
        following = joined[match.end():match.end() + 12]
        assert not following.lstrip().startswith("(default:"), joined[match.start() - 80:]
    sub = next(action for action in cli.build_parser()._actions
               if isinstance(action, argparse._SubParsersAction)).choices[command]
    missing = [name for name, help_text in _options_help(sub).items() if not help_text]
    assert missing == []
    if command != "demo":
        assert "MODEL                 the " in text or "MODEL  " in text
        model_help = _options_help(sub)["MODEL"]
        assert re.fullmatch(r"the [a-z() ]*model: a \.h5 or \.keras file, .* with --weights",
                            model_help), model_help
    if command in ("evaluate", "prune", "repair"):
        assert "--batch-size N        inputs per forward pass" in text


def test_prune_help_shows_each_default_once(capsys):
    assert cli.main(["prune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: --clean) (default: None)" not in text
    assert "clean data for the activation ranking (default: --clean)" in text
    assert "one model per value (default: 0.02 0.04 0.1)" in text


def test_defense_methods_of_the_parser_are_the_library_s():
    from tf_backdoor_defense.defenses._defend import METHODS

    from tf_backdoor_defense.defenses._defend import DEFAULT_METHODS, IBAU_RADIUS, INTERPOLATE, \
        TARGETED_METHODS

    assert cli.DEFENSE_INTERPOLATE == tuple(INTERPOLATE)
    assert cli.DEFENSE_IBAU_RADIUS == IBAU_RADIUS
    assert cli.DEFENSE_METHODS == tuple(METHODS)
    assert cli.DEFAULT_DEFENSE_METHODS == tuple(DEFAULT_METHODS)
    assert cli.TARGETED_DEFENSE_METHODS == tuple(TARGETED_METHODS)


@pytest.mark.slow  # a subprocess
def test_help_does_not_import_tensorflow():
    code = textwrap.dedent("""
        import sys, time
        started = time.perf_counter()
        from tf_backdoor_defense.cli import main
        for argv in (["--help"], ["prune", "--help"], ["--version"]):
            try:
                code = main(argv)
            except SystemExit as stop:
                code = stop.code
            assert code == 0, (argv, code)
        print("tensorflow" in sys.modules, "tf_keras" in sys.modules, time.perf_counter() - started)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    tensorflow, tf_keras, seconds = done.stdout.split()[-3:]
    assert (tensorflow, tf_keras) == ("False", "False")
    assert float(seconds) < 5.0  # TensorFlow alone takes longer to import on 2 cores


def test_input_errors_exit_2_internal_errors_exit_1_as_a_bug(lab, monkeypatch, capsys):
    from tf_backdoor_defense._errors import InputError, InputTypeError

    args = ["inspect", str(lab / "model.h5")]
    for error in (InputError("The 'x' parameter must be > 0. Got -1."),
                  InputTypeError("The 'x' parameter must be an int. Got 'a'.")):
        monkeypatch.setattr(cli, "cmd_inspect", lambda args, console, error=error: _raise(error))
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err == f"tf-backdoor-defense inspect: error: {error}\n"
    # a plain ValueError is not an input error the library raised as such: a bug
    monkeypatch.setattr(cli, "cmd_inspect", lambda args, console: _raise(ValueError("oops\nmore")))
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["tf-backdoor-defense inspect: internal error (this is a bug): "
                                "ValueError: oops (--debug shows the traceback)"]
    monkeypatch.setattr(cli, "cmd_inspect", lambda args, console: _raise(KeyError("k")))
    assert cli.main(args + ["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "_raise" in err
    assert err.rstrip().splitlines()[-1] == ("tf-backdoor-defense inspect: internal error "
                                             "(this is a bug): KeyError: 'k'")


def _raise(error):
    raise error


def test_missing_files_and_usage_errors_exit_2(lab, tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5" in capsys.readouterr().err
    assert cli.main(["evaluate", str(lab / "model.h5"), "--clean",
                     str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in capsys.readouterr().err
    assert cli.main(["prune", "--thresholds", "2"]) == 2
    assert "expected a number in [0, 1]" in capsys.readouterr().err


def test_weights_only_file_gets_the_command_line_hint(lab, tmp_path, capsys):
    tiny_conv_model().save_weights(tmp_path / "weights.h5")
    assert cli.main(["inspect", str(tmp_path / "weights.h5")]) == 2
    err = capsys.readouterr().err
    assert "holds only weights" in err and "--weights FILE" in err


def test_main_gives_the_console_back_unchanged(lab, capsys):
    import logging
    import warnings

    filters = list(warnings.filters)
    show = warnings.showwarning
    loggers = {name: (logging.getLogger(name).level, logging.getLogger(name).propagate,
                      list(logging.getLogger(name).handlers))
               for name in ("tf_backdoor_defense", "tensorflow")}
    stderr, environ = sys.stderr, dict(os.environ)
    assert cli.main(["inspect", str(lab / "model.h5")]) == 0
    assert cli.main(["inspect", str(lab / "nope.h5")]) == 2
    capsys.readouterr()
    assert warnings.filters == filters and warnings.showwarning is show
    assert {name: (logging.getLogger(name).level, logging.getLogger(name).propagate,
                   list(logging.getLogger(name).handlers)) for name in loggers} == loggers
    assert sys.stderr is stderr and dict(os.environ) == environ


def test_library_log_lines_show_on_the_console_unless_quiet(lab, monkeypatch, capsys):
    import logging

    def command(args, console):
        logging.getLogger("tf_backdoor_defense.defenses._defend").info("method %s", "x")
        logging.getLogger("tf_backdoor_defense.somewhere").debug("not shown")
        return 0

    monkeypatch.setattr(cli, "cmd_inspect", command)
    assert cli.main(["inspect", str(lab / "model.h5")]) == 0
    assert capsys.readouterr().err == "method x\n"
    assert cli.main(["inspect", str(lab / "model.h5"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_warnings_show_as_one_line_during_main_and_python_s_way_with_debug(lab, monkeypatch,
                                                                           capsys):
    import warnings

    def command(args, console):
        warnings.warn("the shrink fell back to masks", UserWarning)
        warnings.warn("an old API", DeprecationWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_inspect", command)
    assert cli.main(["inspect", str(lab / "model.h5")]) == 0
    assert capsys.readouterr().err == ("tf-backdoor-defense: warning: the shrink fell back to "
                                       "masks (UserWarning)\n")
    with pytest.warns(UserWarning, match="the shrink fell back"):  # left to Python (pytest here)
        assert cli.main(["inspect", str(lab / "model.h5"), "--debug"]) == 0
    assert "tf-backdoor-defense:" not in capsys.readouterr().err


def test_the_low_accuracy_warning_line_names_the_scale_option():
    """The library's warning says what to do with the data; the CLI's line adds its option."""
    from tf_backdoor_defense._validation import LowAccuracyWarning, clean_data_notes
    from tf_backdoor_defense._keras import keras
    from tf_backdoor_defense.cli._console import _show_warning

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    (category, text), = clean_data_notes(model, np.arange(6) % 3, 0.2,
                                         np.array([0.0, 255.0]))
    assert category is LowAccuracyWarning and "--scale" not in text
    stream = io.StringIO()
    _show_warning("tf-backdoor-defense")(category(text), category, "f.py", 1, file=stream)
    assert "divided by 255 too (--scale 255)" in stream.getvalue()

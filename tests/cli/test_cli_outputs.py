"""Every command's outputs: whole or not at all, --force only over this tool's outputs.

Each command runs in-process (``main([...])``) on a tiny model. "Before any
work" is checked by making the model loader fail the test if it is called.
"""

import json
import os
import signal

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_conv_model, write_model_and_clean_data
from tf_backdoor_defense.cli import _main as cli
from tf_backdoor_defense.io import _loading
from tf_backdoor_defense.io._data import OUTPUT_MARKER


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return write_model_and_clean_data(tmp_path_factory.mktemp("outputs_lab"))


def _fake_demo(lab):
    """What run_demo returns, from a sweep of the tiny model (no MNIST training)."""
    from tf_backdoor_defense.pruning._sweep import prune_to_threshold

    with np.load(lab / "clean.npz") as data:
        result = prune_to_threshold(tiny_conv_model(), (data["x"], data["y"]),
                                    max_accuracy_drop=[0.2])
    evaluation = pd.DataFrame([{"model": "BadNet", "clean_accuracy": 1.0}])
    return {"evaluation": evaluation, "result": result, "seconds": 0.0}


# name: (argv without --output, kind of output, suffix of the output path)
COMMANDS = {
    "prune": (["prune", "{model}", "--clean", "{clean}", "--thresholds", "0.2", "--no-plots"],
              "folder", ""),
    "fine-prune": (["fine-prune", "{model}", "--train", "{clean}", "--clean", "{clean}",
                    "--epochs", "1", "--threshold", "0.2", "--no-plots"], "folder", ""),
    "defend": (["defend", "{model}", "--clean", "{clean}", "--methods", "reinit-head",
                "--epochs", "1", "--no-scan", "--max-accuracy-drop", "1",
                "--budget-confidence", "0.5"], "folder", ""),
    "scan": (["scan", "{model}", "--clean", "{clean}", "--steps", "2", "--screen-above", "99"],
             "folder", ""),
    "demo": (["demo", "--epochs", "1"], "folder", ""),
    "export-saved-model": (["export", "{model}"], "folder", ""),
    "export-keras": (["export", "{model}"], "file", ".keras"),
    "repair": (["repair", "{model}", "--clean", "{clean}", "--threshold", "0.2"], "file", ".h5"),
}


def _argv(name, lab, out, *extra):
    words, _, _ = COMMANDS[name]
    filled = [w.format(model=lab / "model.h5", clean=lab / "clean.npz") for w in words]
    return filled + ["--quiet", "--output", str(out), *extra]


def _out(name, folder):
    return folder / f"out{COMMANDS[name][2]}"


@pytest.fixture(scope="module")
def fake_demo(lab):
    return _fake_demo(lab)


@pytest.fixture
def demo_faked(fake_demo, monkeypatch):
    from tf_backdoor_defense.experiments import _demo

    monkeypatch.setattr(_demo, "run_demo", lambda **kwargs: fake_demo)


@pytest.fixture
def loading_forbidden(monkeypatch):
    """Fail when a command loads its model: the refusal must come before any work."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(_loading, "load_model", forbidden)


def _snapshot(folder):
    """{relative path: bytes} of every file under ``folder``, hidden ones included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_interrupted_write_leaves_the_earlier_output_whole_and_no_temp_files(
        name, lab, tmp_path, monkeypatch, capsys, demo_faked):
    out = _out(name, tmp_path)
    assert cli.main(_argv(name, lab, out)) == 0
    before = _snapshot(tmp_path)
    assert (out / OUTPUT_MARKER).is_file() if out.is_dir() else out.is_file()

    # the last write step does its work, then Ctrl-C arrives
    from tf_backdoor_defense.cli import _scan
    from tf_backdoor_defense.export import _export

    owner, attribute = {"scan": (_scan, "_write_triggers"),
                        "export-saved-model": (_export, "export_saved_model"),
                        "export-keras": (_export, "export_keras")}.get(name, (cli, "_write_model"))
    if name == "demo":
        owner, attribute = pd.DataFrame, "to_csv"  # evaluation.csv, written last
    original = getattr(owner, attribute)

    def interrupted(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, attribute, interrupted)
    assert cli.main(_argv(name, lab, out, "--force")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before  # the earlier output, byte for byte, and nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_sigterm_removes_the_output_being_written_and_exits_143(lab, tmp_path, monkeypatch,
                                                                capsys):
    out = tmp_path / "report"
    original = cli._write_model

    def terminated(*args, **kwargs):
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli, "_write_model", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(_argv("prune", lab, out)) == 143
    assert "terminated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no report, no hidden staging folder
    assert signal.getsignal(signal.SIGTERM) is handler  # put back after the command


@pytest.mark.parametrize("name", list(COMMANDS))
def test_force_refuses_what_this_tool_did_not_write_before_any_work(
        name, lab, tmp_path, capsys, loading_forbidden, demo_faked):
    out = _out(name, tmp_path)
    if COMMANDS[name][1] == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        expected = "did not write"
    else:
        out.write_bytes((lab / "model.h5").read_bytes())  # a model, but not one we wrote
        expected = "not written by this package"
    before = _snapshot(tmp_path)
    for extra in ([], ["--force"]):
        assert cli.main(_argv(name, lab, out, *extra)) == 2
        err = _one_error_line(capsys)
        assert (expected if extra else "--force") in err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_file_where_a_folder_goes_and_the_reverse_are_refused_before_any_work(
        name, lab, tmp_path, capsys, loading_forbidden, demo_faked):
    out = _out(name, tmp_path)
    if COMMANDS[name][1] == "folder":
        out.write_text("a file")
        expected = "is a file, but a folder is expected"
    else:
        out.mkdir()
        expected = "is a folder, but a file is expected"
    for extra in ([], ["--force"]):
        assert cli.main(_argv(name, lab, out, *extra)) == 2
        assert expected in _one_error_line(capsys)
    inside = tmp_path / "plain.txt"
    inside.write_text("x")
    assert cli.main(_argv(name, lab, inside / _out(name, tmp_path).name)) == 2
    assert "which is a file, not a folder" in _one_error_line(capsys)


@pytest.mark.parametrize("name", [n for n, (_, kind, _) in COMMANDS.items() if kind == "folder"])
def test_the_current_folder_and_its_parents_are_refused(name, lab, tmp_path, monkeypatch, capsys,
                                                        loading_forbidden, demo_faked):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    for out in (".", "..", str(tmp_path / "a")):
        assert cli.main(_argv(name, lab, out, "--force")) == 2
        assert "is the current folder or holds it" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b"]


def test_force_replaces_this_tool_s_own_files_which_carry_its_mark(lab, tmp_path, capsys):
    out = tmp_path / "plain.h5"
    assert cli.main(_argv("export-keras", lab, out)) == 0
    with h5py.File(out, "r") as handle:
        assert OUTPUT_MARKER in handle.attrs
    assert cli.main(_argv("export-keras", lab, out)) == 2
    assert "--force" in _one_error_line(capsys)
    assert cli.main(_argv("export-keras", lab, out, "--force")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.h5"]


def test_error_lines_escape_control_characters_in_paths(lab, tmp_path, capsys,
                                                       loading_forbidden):
    crafted = tmp_path / "x\x1b[2K\rOK"
    crafted.write_text("a file")
    assert cli.main(_argv("prune", lab, crafted)) == 2
    err = _one_error_line(capsys)
    assert "\x1b" not in err and "\r" not in err and "x\\x1b[2K\\x0dOK" in err
    ours = tmp_path / "y\x1b]0;title\x07"
    ours.mkdir()
    (ours / OUTPUT_MARKER).write_text("")
    (ours / "summary.json").write_text(json.dumps({}))
    assert cli.main(_argv("prune", lab, ours)) == 2  # exists: OutputExistsError
    err = _one_error_line(capsys)
    assert "output already exists" in err and "\x1b" not in err and "\x07" not in err
    assert "y\\x1b]0;title\\x07" in err

"""The ``scan`` subcommand, registered on a parser of its own (the CLI's options helper)."""

import argparse
import io
import json

import numpy as np
import pytest

from planted import planted_data, planted_model  # tests/scan/planted.py
from tf_backdoor_defense.cli._main import Console, _common
from tf_backdoor_defense.cli._scan import SCAN_FILES, add_scan_parser, cmd_scan
from tf_backdoor_defense.io._data import OUTPUT_MARKER


def _parser():
    parser = argparse.ArgumentParser(prog="tf-backdoor-defense")
    commands = parser.add_subparsers(dest="command")
    add_scan_parser(commands, _common)
    return parser


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan_cli")
    planted_model("all-to-one").save(folder / "net.h5")
    x, y = planted_data()
    np.savez(folder / "clean.npz", x=x, y=y)
    return folder


def _run(argv, capsys):
    args = _parser().parse_args(argv)
    code = cmd_scan(args, Console(quiet=True, stream=io.StringIO()))
    return code, capsys.readouterr().out


FAST = ["--steps", "150", "--seed", "1"]


def test_scan_prints_the_verdict_and_writes_files(files, capsys):
    out = files / "report"
    code, text = _run(["scan", str(files / "net.h5"), "--clean", str(files / "clean.npz"),
                       "--output", str(out), "--top", "3"] + FAST + ["--init-cost", "0.01"],
                      capsys)
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == "backdoor found: all-to-one, target class 2"
    table = lines[lines.index(next(l for l in lines if l.strip().startswith("class"))) + 1:]
    assert table[0].split()[0] == "2" and table[0].rstrip().endswith("yes")
    assert sorted(p.name for p in out.iterdir()) == sorted(SCAN_FILES + (OUTPUT_MARKER,))
    payload = json.loads((out / "scan.json").read_text())
    assert payload["suspected_targets"] == [2] and payload["clean_examples"] == 240
    assert (out / "triggers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(out / "triggers.npz") as saved:
        assert saved["masks"].shape == (6, 8, 8, 1) and saved["suspected_targets"].tolist() == [2]


def test_fail_if_found_and_json(files, capsys):
    code, text = _run(["scan", str(files / "net.h5"), "--clean", str(files / "clean.npz"),
                       "--json", "--fail-if-found"] + FAST + ["--init-cost", "0.01"], capsys)
    assert code == 3
    payload = json.loads(text)
    assert payload["backdoor_found"] and payload["model"].endswith("net.h5")


def test_existing_outputs_need_force(files, capsys):
    out = files / "taken"
    out.mkdir()
    (out / "scan.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already exists"):
        _run(["scan", str(files / "net.h5"), "--clean", str(files / "clean.npz"),
              "--output", str(out), "--steps", "1"], capsys)
    assert (out / "scan.json").read_text() == "{}"


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["scan", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--clean", "--output", "--anomaly-threshold", "--all-to-all-threshold",
                   "--fail-if-found", "--value-range", "--init-cost",
                   "--strong-anomaly-threshold", "--strong-max-relative-size"):
        assert option in help_text


def test_bad_value_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["scan", "m.h5", "--clean", "c.npz", "--value-range", "1,0"])
    assert "LOW < HIGH" in capsys.readouterr().err


def test_an_all_to_all_scan_prints_the_class_map(files, capsys):
    planted_model("all-to-all").save(files / "all_to_all.h5")
    code, text = _run(["scan", str(files / "all_to_all.h5"), "--clean", str(files / "clean.npz")]
                      + FAST + ["--init-cost", "0.01"], capsys)
    assert code == 0 and "all-to-all" in text.splitlines()[0]
    (line,) = [l for l in text.splitlines() if l.startswith("suspected all-to-all map")]
    assert line.endswith(": 0->1, 1->2, 2->3, 3->4, 4->5, 5->0")
    _, one = _run(["scan", str(files / "net.h5"), "--clean", str(files / "clean.npz")] + FAST
                  + ["--init-cost", "0.01"], capsys)
    assert "all-to-all map" not in one


def test_a_model_of_flat_inputs_is_scanned_and_drawn_as_images(tmp_path, capsys):
    planted_model("all-to-one", input_shape=(64,)).save(tmp_path / "mlp.h5")
    x, y = planted_data()
    np.savez(tmp_path / "clean.npz", x=x.reshape(len(x), 64), y=y)
    out = tmp_path / "report"
    code, text = _run(["scan", str(tmp_path / "mlp.h5"), "--clean", str(tmp_path / "clean.npz"),
                       "--output", str(out)] + FAST + ["--init-cost", "0.01"], capsys)
    assert code == 0 and text.splitlines()[0] == "backdoor found: all-to-one, target class 2"
    assert json.loads((out / "scan.json").read_text())["input_shape"] == [64]
    assert (out / "triggers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(out / "triggers.npz") as saved:
        assert saved["masks"].shape == (6, 8, 8, 1)

"""Output folders: written whole or not at all; --force replaces only this package's outputs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import write_model_and_clean_data
from tf_backdoor_defense._errors import InputError, OutputExistsError
from tf_backdoor_defense.io._data import OUTPUT_MARKER, check_output_dir, output_directory


def test_output_directory_is_swapped_in_whole_or_not_at_all(tmp_path):
    target = tmp_path / "report"
    with pytest.raises(RuntimeError):
        with output_directory(target) as staging:
            (staging / "summary.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with output_directory(target) as staging:
        (staging / "old_model.h5").write_text("old")
    with pytest.raises(OutputExistsError):
        check_output_dir(target)
    with output_directory(target, overwrite=True) as staging:
        (staging / "new.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no stray temp folders


def test_force_refuses_foreign_folders_files_and_the_current_folder(tmp_path, monkeypatch):
    foreign = tmp_path / "src"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="did not write"):
        check_output_dir(foreign, overwrite=True)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_output_dir(tmp_path / "file.txt", overwrite=True)
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    (tmp_path / "a" / OUTPUT_MARKER).write_text("")
    monkeypatch.chdir(inner)
    for path in (".", os.getcwd(), "..", str(tmp_path / "a")):
        with pytest.raises(InputError, match="current folder"):
            check_output_dir(path, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return write_model_and_clean_data(tmp_path_factory.mktemp("lab"))


def _prune(lab, out, *extra):
    from tf_backdoor_defense.cli._main import main

    return main(["prune", str(lab / "model.h5"), "--clean", str(lab / "clean.npz"),
                 "--no-plots", "--quiet", "--output", str(out), *extra])


def test_prune_force_replaces_the_whole_earlier_report(lab, tmp_path, capsys):
    out = tmp_path / "report"
    assert _prune(lab, out, "--thresholds", "0.1", "0.2") == 0
    assert len(list((out / "models").iterdir())) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert (out / OUTPUT_MARKER).is_file() and summary
    assert _prune(lab, out, "--thresholds", "0.3") == 2  # exists, no --force
    assert _prune(lab, out, "--thresholds", "0.3", "--force") == 0
    assert [p.name for p in (out / "models").iterdir()] == ["pruned_drop_0.3.h5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_prune_output_problems_are_refused_before_any_work(lab, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    foreign = tmp_path / "src"
    foreign.mkdir()
    (foreign / "code.py").write_text("x = 1")
    capsys.readouterr()
    # no data file: the output check must fail first, before the data is even read
    from tf_backdoor_defense.cli._main import main

    for out, message in ((tmp_path / "taken", "is a file"), (foreign, "did not write")):
        code = main(["prune", str(lab / "model.h5"), "--clean", str(tmp_path / "missing.npz"),
                     "--thresholds", "0.1", "--quiet", "--force", "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert (foreign / "code.py").read_text() == "x = 1"


@pytest.mark.slow
def test_inspect_into_a_closed_pipe_exits_cleanly(lab):
    code = ("import sys; from tf_backdoor_defense.cli._main import main; "
            f"sys.exit(main(['inspect', {str(lab / 'model.h5')!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head -0`: the reader is gone before the table is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err

"""Outputs of a writer killed outright (SIGKILL) leave nothing behind after the next write."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tf_backdoor_defense.io._data import (OUTPUT_MARKER, output_directory, output_file,
                                          remove_stale_temporaries)

DEAD = 999999999  # above any pid the kernel hands out


def test_stale_temporaries_of_dead_writers_go_and_others_stay(tmp_path):
    target = tmp_path / "report"
    stale = [tmp_path / f".report.tmp-{DEAD}-a", tmp_path / f".report.old-{DEAD}-b"]
    for folder in stale:
        folder.mkdir()
    live = tmp_path / f".report.tmp-{os.getpid()}-c"
    live.mkdir()
    foreign = [tmp_path / ".report.tmp-notes", tmp_path / "report.tmp-1-x", tmp_path / ".other.tmp-1-x"]
    for folder in foreign:
        folder.mkdir()
    stale_file = tmp_path / f".model.tmp-{DEAD}-zz.h5"
    stale_file.write_bytes(b"partial")
    with output_directory(target) as staging:
        (staging / "summary.json").write_text("{}")
    assert not any(p.exists() for p in stale) and live.is_dir()
    assert all(p.is_dir() for p in foreign)
    import h5py

    with output_file(tmp_path / "model.h5") as temp:
        h5py.File(temp, "w").close()
    assert not stale_file.exists()


def test_an_earlier_output_moved_aside_by_a_killed_swap_comes_back(tmp_path):
    target = tmp_path / "report"
    trash = tmp_path / f".report.old-{DEAD}-q"
    (trash / "old").mkdir(parents=True)
    (trash / "old" / OUTPUT_MARKER).write_text("x")
    (trash / "old" / "summary.json").write_text("{}")
    assert remove_stale_temporaries(target) == [trash]
    assert (target / "summary.json").is_file() and not trash.exists()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_writer_killed_with_sigkill_leaves_nothing_after_the_next_write(tmp_path):
    target = tmp_path / "report"
    code = textwrap.dedent(f"""
        import os, signal
        from tf_backdoor_defense.io._data import output_directory
        with output_directory({str(target)!r}) as staging:
            (staging / "half.csv").write_text("1,2")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".report.tmp"]  # left behind
    assert not target.exists()
    with output_directory(target) as staging:
        (staging / "whole.csv").write_text("1,2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "whole.csv"]

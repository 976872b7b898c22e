"""Importing the package changes nothing in the process but ``TF_USE_LEGACY_KERAS``.

Each check runs in a fresh interpreter, where the import really happens.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import tf_backdoor_defense

# What a process looks like: environment, the targets of fds 0-2, sys.stderr and sys.stdout,
# warning filters and how warnings are shown, loggers' levels and handlers, sys.argv.
SNAPSHOT = textwrap.dedent("""
    import json, logging, os, sys, warnings

    def snapshot():
        fds = {}
        for fd in (0, 1, 2):
            info = os.fstat(fd)
            fds[fd] = [info.st_dev, info.st_ino]
        loggers = {name: [logging.getLogger(name).level, logging.getLogger(name).propagate,
                          len(logging.getLogger(name).handlers)]
                   for name in ("", "tf_backdoor_defense", "tensorflow")}
        return {"env": dict(os.environ), "fds": fds, "stderr": id(sys.stderr),
                "stdout": id(sys.stdout), "filters": [repr(f) for f in warnings.filters],
                "showwarning": repr(warnings.showwarning), "loggers": loggers,
                "argv": list(sys.argv)}
""")


def _run(body, env=None):
    code = SNAPSHOT + textwrap.dedent(body)
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL",
                                  "PYTHONWARNINGS")}
    environment.update(env or {})
    done = subprocess.run([sys.executable, "-c", code, "an", "argument"], capture_output=True,
                          text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a subprocess
def test_import_sets_only_tf_use_legacy_keras_and_loads_no_tensorflow():
    out = _run("""
        before = snapshot()
        import tf_backdoor_defense
        after = snapshot()
        print(json.dumps({"before": before, "after": after,
                          "tensorflow": "tensorflow" in sys.modules}))
    """)
    before, after = out["before"], out["after"]
    assert after["env"].pop("TF_USE_LEGACY_KERAS") == "1"
    assert after == before
    assert out["tensorflow"] is False  # TensorFlow loads on first use of a name


@pytest.mark.slow  # a subprocess
def test_an_explicit_tf_use_legacy_keras_is_kept():
    out = _run("""
        import tf_backdoor_defense
        print(json.dumps({"value": os.environ["TF_USE_LEGACY_KERAS"]}))
    """, env={"TF_USE_LEGACY_KERAS": "true"})
    assert out["value"] == "true"


@pytest.mark.slow  # a subprocess
def test_loading_every_public_name_changes_nothing_beyond_tensorflow_itself():
    # Baseline: TensorFlow, tf-keras, tfmot and the other dependencies imported directly
    # (whatever they do on import is theirs). Then every public name of the package.
    out = _run("""
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import tensorflow, tf_keras, tensorflow_model_optimization, numpy, pandas, h5py
        import matplotlib, matplotlib.pyplot
        baseline = snapshot()
        import tf_backdoor_defense
        names = {name: type(getattr(tf_backdoor_defense, name)).__name__
                 for name in tf_backdoor_defense.__all__}
        print(json.dumps({"before": baseline, "after": snapshot(), "names": names}))
    """)
    assert out["after"] == out["before"]
    assert set(out["names"]) == set(tf_backdoor_defense.__all__)


def test_every_public_name_resolves_and_is_listed():
    assert sorted(dir(tf_backdoor_defense)) == sorted(set(dir(tf_backdoor_defense)))
    for name in tf_backdoor_defense.__all__:
        assert getattr(tf_backdoor_defense, name) is not None, name
    assert tf_backdoor_defense.attacks.__name__ == "tf_backdoor_defense.attacks"
    assert issubclass(tf_backdoor_defense.DataFileError, tf_backdoor_defense.InputError)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tf_backdoor_defense.nope  # noqa: B018

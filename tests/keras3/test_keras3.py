"""Keras 3 models in, Keras 3 models out, and FinePruning in a Keras 3 ``fit``.

Each test runs a script in a fresh interpreter where ``import keras`` (Keras 3)
comes before the package, as in a user's training script; the script asserts
and prints a JSON report on its last line. TensorFlow backend.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent


def run_script(name, timeout=600):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)  # the user's process: Keras 3 is `keras`
    done = subprocess.run([sys.executable, str(HERE / name)], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_keras3_conversion_wrapper_callback_and_files():
    checks = run_script("scripts_convert.py")["checks"]
    assert len(checks) == len(set(checks)) >= 35
    for name in ("same predictions k3->k2", "masked k3 == masked tf-keras", "masks held at zero",
                 "logs in History", "load .keras Keras 3", "Lambda refused naming the layer"):
        assert name in checks


@pytest.mark.slow
def test_keras3_badnet_on_real_digits_repaired_end_to_end():
    report = run_script("scripts_end_to_end.py")
    assert report["clean"] > 0.8 and report["asr"] > 0.5, report  # a working BadNet
    assert report["after"]["clean"] >= report["clean"] - 0.08, report
    assert len(report["fine_pruning"]["fine_pruning/channels_pruned"]) == 3
    assert report["fine_pruning"]["fine_pruning/channels_pruned"][0] > 0

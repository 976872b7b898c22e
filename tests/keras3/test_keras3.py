"""Keras 3 models in, Keras 3 models out, and FinePruning in a Keras 3 ``fit``.

Each test runs a script in a fresh interpreter where ``import keras`` (Keras 3)
comes before the package, as in a user's training script; the script asserts
and prints a JSON report on its last line. TensorFlow backend (the only one
installed here; JAX and PyTorch are not tested).
"""

import inspect
import json
import os
import pathlib
import subprocess
import tempfile
import sys
import warnings

import pytest

HERE = pathlib.Path(__file__).parent


def run_script(name, *args, timeout=600):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)  # the user's process: Keras 3 is `keras`
    with tempfile.TemporaryDirectory() as tmp:  # the scripts' temporary files go with it
        env["TMPDIR"] = tmp
        done = subprocess.run([sys.executable, str(HERE / name), *args], capture_output=True,
                              text=True, env=env, timeout=timeout, check=False)
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


@pytest.mark.slow
def test_keras3_models_through_every_public_function_that_takes_one():
    report = run_script("scripts_public_api.py")
    checks = report["checks"]
    assert len(checks) == len(set(checks)) >= 45
    for name in ("defend model", "repaired_model N+1", "repaired_model back to tf-keras",
                 "fine_prune sweep models", "attack_guided_prune == tf-keras", "clp_prune == tf-keras",
                 "set_mask writes into the Keras 3 model", "export_keras .keras loads in Keras 3",
                 "fine_prune names the unsupported layer", "Keras 3 callback refused",
                 "input unchanged"):
        assert name in checks
    assert report["converted_back"] >= 20
    assert report["worst_gap"] <= 1e-5  # every model converted back, against its tf-keras source


@pytest.mark.slow
def test_keras3_badnet_on_real_digits_repaired_by_defend_without_the_trigger():
    report = run_script("scripts_defend.py")
    before, after = report["before"], report["after"]
    assert before["clean"] > 0.85 and before["asr"] > 0.9, report  # a working BadNet
    assert report["keras3_model"] and report["keras3_candidates"], report
    assert report["method"] is not None, report
    assert after["asr"] <= 0.2 and after["asr"] <= before["asr"] - 0.7, report
    assert after["clean"] >= before["clean"] - 0.05, report
    assert report["input_unchanged"] and report["asr_of_input_now"] == before["asr"], report
    assert report["gap_to_tf_keras"] <= 1e-5, report


@pytest.mark.slow
@pytest.mark.parametrize("build", ["sequential", "nested"])
def test_an_outside_keras3_badnet_of_raw_pixels_and_logits_is_repaired_by_the_cli(build):
    """Rescaling inside the model, BatchNorm, Dropout, logits, a checkerboard trigger, trained
    on 3,500 digits the defender never has; the CLI's defaults on 1,000 others. "nested": built
    the way Keras's image tutorials build one, a Functional model whose first layer is a nested
    Sequential of augmentation layers."""
    report = run_script("scripts_cli_defend_raw.py", *(["nested"] if build == "nested" else []))
    assert report["nested"] == (build == "nested")
    before, after = report["before"], report["after"]
    assert before["clean"] >= 0.96 and before["asr"] >= 0.95, report  # a working BadNet
    assert report["suspected_targets"] == [4], report
    assert report["keras3_model"] and "repaired.keras" in report["files"], report
    assert not report["backdoor_still_active"] and report["method"] is not None, report
    assert after["asr"] <= 0.05, report
    assert after["clean"] >= before["clean"] - 0.02, report


# -- in this process: the decorator itself ----------------------------------------------------
def _warns_for_caller(model, old=None):
    warnings.warn("an old keyword", DeprecationWarning, stacklevel=2)
    warnings.warn("a note from inside", UserWarning, stacklevel=1)
    return model


def test_decorated_functions_warn_at_the_callers_line():
    from tf_backdoor_defense.keras3._caller import with_caller_keras

    decorated = with_caller_keras(_warns_for_caller)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.filterwarnings("default", category=DeprecationWarning)
        assert decorated("m", old=1) == "m"
    where = {w.category: (w.filename, w.lineno) for w in caught}
    line = inspect.currentframe().f_lineno - 2
    assert where[DeprecationWarning] == (__file__, line)  # the caller's line, not the decorator's
    assert where[UserWarning][0] == __file__ and where[UserWarning][1] < line  # kept where issued


@pytest.mark.slow
def test_the_keras3_example_script_runs():
    """examples/keras3_script.py (shortened to 4 attacker epochs): every part runs and prints its
    scores, and defend() gives a Keras 3 model."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)
    script = HERE.parent.parent / "examples" / "keras3_script.py"
    done = subprocess.run([sys.executable, str(script), "--epochs", "4"], capture_output=True,
                          text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    for start in ("the BadNet:", "defend():", "fine-pruning fit:"):
        assert sum(line.startswith(start) for line in lines) == 1, done.stdout
    assert next(line for line in lines if line.startswith("defend():")).endswith("(keras)")

"""The model files the command line writes: plain Keras by default, in the caller's Keras.

Plain means the PruneByActivation masks are folded into the weights, so the
file loads with ``tf_keras.models.load_model`` in a process that never
imports this package; ``--keep-wrappers`` keeps the wrapped form. A Keras 3
MODEL gives Keras 3 ``.keras`` files (checked in a subprocess where
``import keras`` comes first, as in a user's script).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import write_model_and_clean_data
from tf_backdoor_defense.cli import _main as cli
from tf_backdoor_defense.io._loading import load_model
from tf_backdoor_defense.masks._wrapper import masked_layers
from tf_backdoor_defense.pruning._sweep import prune_to_threshold

HERE = pathlib.Path(__file__).parent

# Loads each file given with plain tf-keras, in a process without this package.
PLAIN_LOADER = textwrap.dedent("""\
    import json, sys
    import numpy as np
    import tf_keras
    x = np.load(sys.argv[1])
    out = {}
    for path in sys.argv[2:]:
        try:
            model = tf_keras.models.load_model(path, compile=False)
        except Exception as error:
            out[path] = "refused: " + str(error).splitlines()[0][:200]
            continue
        out[path] = model.predict(x, verbose=0).tolist()
    assert not any(name.startswith("tf_backdoor_defense") for name in sys.modules)
    print(json.dumps(out))
    """)


def _load_plainly(x, paths, folder):
    np.save(folder / "x.npy", x)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", PLAIN_LOADER, str(folder / "x.npy"),
                           *map(str, paths)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return write_model_and_clean_data(tmp_path_factory.mktemp("model_files_lab"))


@pytest.mark.slow  # an integration run of many compiled steps (the slow set)
def test_default_model_files_load_with_plain_tf_keras_and_wrappers_only_on_request(lab,
                                                                                   tmp_path):
    model, clean = str(lab / "model.h5"), str(lab / "clean.npz")
    quick = ["--quiet", "--no-plots"]
    defend = ["--methods", "prune-search", "--epochs", "1", "--no-scan", "--max-accuracy-drop",
              "1", "--budget-confidence", "0.5", "--quiet"]
    for extra, suffix in (([], "plain"), (["--keep-wrappers"], "wrapped")):
        assert cli.main(["prune", model, "--clean", clean, "--thresholds", "0.2", *quick,
                         "--output", str(tmp_path / f"prune_{suffix}"), *extra]) == 0
        assert cli.main(["fine-prune", model, "--train", clean, "--clean", clean, "--epochs",
                         "1", "--threshold", "0.2", *quick,
                         "--output", str(tmp_path / f"fp_{suffix}"), *extra]) == 0
        assert cli.main(["defend", model, "--clean", clean, *defend,
                         "--output", str(tmp_path / f"defend_{suffix}"), *extra]) == 0
    assert cli.main(["repair", model, "--clean", clean, "--threshold", "0.2", "--quiet",
                     "--output", str(tmp_path / "goodnet.h5")]) == 0
    names = ("prune_{}/models/pruned_drop_0.2.h5", "fp_{}/fine_pruned.h5", "defend_{}/repaired.h5")
    plain = [tmp_path / name.format("plain") for name in names] + [tmp_path / "goodnet.h5"]
    wrapped = [tmp_path / name.format("wrapped") for name in names]
    for path in wrapped:  # the runs had masks to fold: the wrapped files hold them
        assert masked_layers(load_model(path)), path

    with np.load(lab / "clean.npz") as data:
        x = data["x"]
    loaded = _load_plainly(x[:8], plain + wrapped, tmp_path)
    for path in plain:
        assert not isinstance(loaded[str(path)], str), loaded[str(path)]
    for path in wrapped:
        assert loaded[str(path)].startswith("refused: ") and "PruneByActivation" in \
            loaded[str(path)]
    # plain == masked: the pruned model predicts what the sweep's masked model predicts
    with np.load(lab / "clean.npz") as data:
        sweep = prune_to_threshold(load_model(lab / "model.h5"), (data["x"], data["y"]),
                                   max_accuracy_drop=[0.2])
    masked = sweep.models[0.2].predict(x[:8], verbose=0)
    assert masked_layers(sweep.models[0.2])
    np.testing.assert_allclose(loaded[str(plain[0])], masked, atol=1e-5)


@pytest.mark.slow  # a subprocess that imports Keras 3 and TensorFlow
def test_a_keras3_model_gives_keras3_files_equal_to_the_tf_keras_masked_model(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)  # the user's process: Keras 3 is `keras`
    done = subprocess.run([sys.executable, str(HERE / "keras3_cli_script.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    checks = json.loads(done.stdout.strip().splitlines()[-1])
    assert checks["masks change the predictions"] > 1e-3  # something was pruned
    for name in ("prune keras", "prune h5", "export"):
        assert checks[f"{name} max difference"] <= 1e-5, checks
    assert checks["defend output shape"] == [None, 3]
    assert checks["repair output shape"] == [None, 4]  # N + 1: class 3 = backdoor suspected
    assert checks["repair flags the disagreements"], checks

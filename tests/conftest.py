"""Shared fixtures: the lab's files in ../shared (skipped when absent), tiny models, the demo."""

import os
import pathlib

import numpy as np
import pytest

from tf_backdoor_defense._keras import keras

REPO = pathlib.Path(__file__).resolve().parents[1]


def _lab3_dir():
    env = os.environ.get("TBD_LAB3_DIR")
    if env:
        return pathlib.Path(env)
    return REPO.parent / "shared" / "data" / "lab3"



def write_model_and_clean_data(root):
    """``root/model.h5`` (the tiny conv model) and ``root/clean.npz`` (40 inputs, its labels)."""
    model = tiny_conv_model()
    model.save(root / "model.h5")
    x = np.random.default_rng(0).random((40, 8, 8, 1), dtype=np.float32)
    np.savez(root / "clean.npz", x=x, y=np.argmax(model.predict(x, verbose=0), axis=1))
    return root


def distributed_harness():
    """tests/scoring/test_distributed.py as a module: the tf.distribute tests' process
    environment, runner, free ports and worker header, for the other distributed tests."""
    import importlib.util

    path = REPO / "tests" / "scoring" / "test_distributed.py"
    spec = importlib.util.spec_from_file_location("distributed_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

@pytest.fixture(scope="session")
def lab3_dir():
    """Folder with the lab BadNet (bd_net.h5) and faces; skips the test when absent."""
    path = _lab3_dir()
    if not (path / "bd_net.h5").is_file():
        pytest.skip(f"lab files not found at {path} (set TBD_LAB3_DIR to their folder)")
    return path


@pytest.fixture(scope="session")
def demo_run():
    """The demo's BadNet, sweep, repairs and evaluation (10 epochs, seed 0), trained once per run.

    Returns ``(results, report)``: what ``run_demo`` returns and its text report.
    """
    from tf_backdoor_defense.experiments._demo import demo_report, run_demo

    results = run_demo(epochs=10, seed=0)
    return results, demo_report(results)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield


def tiny_conv_model(channels=6, classes=3, input_shape=(8, 8, 1), seed=0):
    """A small Conv -> Pool -> Conv -> Flatten -> Dense model with random weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")(inputs)
    x = keras.layers.MaxPooling2D(name="pool_a")(x)
    x = keras.layers.Conv2D(channels, 2, activation="relu", name="conv_b")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(8, activation="relu", name="fc")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs, name="tiny")


@pytest.fixture
def tiny_model():
    return tiny_conv_model()


@pytest.fixture
def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.random((40, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 3, size=40)
    return x, y


@pytest.fixture(scope="module")
def planted():
    """The scan tests' planted-backdoor classifiers (tests/scan/planted.py):
    ``{"clean": model, "all-to-one": model (target 2), "all-to-all": model, "data": (x, y)}``.

    (One conftest for the whole tree: a second ``conftest.py`` would shadow this module for
    ``from conftest import ...``.)
    """
    import sys

    if str(REPO / "tests" / "scan") not in sys.path:  # for tests outside tests/scan
        sys.path.append(str(REPO / "tests" / "scan"))
    from planted import planted_data, planted_model  # tests/scan/planted.py

    return {"clean": planted_model("clean"), "all-to-one": planted_model("all-to-one"),
            "all-to-all": planted_model("all-to-all"), "data": planted_data()}

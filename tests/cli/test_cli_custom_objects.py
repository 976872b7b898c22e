"""``--custom-objects``: a model whose class was defined in its training script loads on the
command line from a file of that class, and the file's other classes are still checked."""

import importlib.util
import re
import sys
import textwrap

import numpy as np
import pytest

from tf_backdoor_defense import InputError
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.cli import _main as cli
from tf_backdoor_defense.io._loading import load_model

LAYERS = textwrap.dedent("""\
    from tf_backdoor_defense._keras import keras


    class ScaleBy(keras.layers.Layer):
        def __init__(self, factor=1.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, inputs):
            return inputs * self.factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}
    """)


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script_model(tmp_path_factory):
    """``model.h5`` with a layer of ``layers.py``'s class, ``clean.npz``, and that file."""
    root = tmp_path_factory.mktemp("custom_objects")
    (root / "layers.py").write_text(LAYERS)
    layers = _module(root / "layers.py", "training_script_layers")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    hidden = layers.ScaleBy(2.0, name="scale")(inputs)
    hidden = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(hidden)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(
        keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    model.save(root / "model.h5")
    x = np.random.default_rng(0).random((40, 8, 8, 1), dtype=np.float32)
    np.savez(root / "clean.npz", x=x, y=np.argmax(model.predict(x, verbose=0), axis=1))
    del sys.modules["training_script_layers"]
    return root


def _prune(root, output, *extra):
    return cli.main(["prune", str(root / "model.h5"), "--clean", str(root / "clean.npz"),
                     "--thresholds", "0.2", "--quiet", "--no-plots", "--output", str(output),
                     *extra])


def test_the_scripts_class_is_refused_with_a_hint_and_loads_from_its_file(script_model, tmp_path,
                                                                          capsys):
    assert _prune(script_model, tmp_path / "refused") == 2
    err = capsys.readouterr().err
    assert "ScaleBy" in err and "--custom-objects FILE.py" in err
    assert not (tmp_path / "refused").exists()
    with pytest.raises(InputError, match=r"custom_objects=\{'ScaleBy': \.\.\.\}"):
        load_model(script_model / "model.h5")  # from Python, the same advice
    assert _prune(script_model, tmp_path / "pruned", "--custom-objects",
                  str(script_model / "layers.py")) == 0
    assert (tmp_path / "pruned" / "summary.json").is_file()
    # The user's file was imported for that command only.
    assert not [name for name in sys.modules if name.startswith("_tf_backdoor_defense_custom")]


def test_the_files_other_classes_are_still_checked(script_model, tmp_path):
    """A Lambda beside the script's class is refused: --custom-objects trusts only that file."""
    layers = _module(script_model / "layers.py", "more_training_script_layers")
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Lambda(lambda t: t + 1.0, name="code")(layers.ScaleBy(name="s")(inputs))
    keras.Model(inputs, keras.layers.Flatten()(hidden)).save(tmp_path / "lambda.h5")
    del sys.modules["more_training_script_layers"]
    imported = []
    objects = cli._custom_objects([str(script_model / "layers.py")], imported)
    try:
        with pytest.raises(InputError, match="Lambda"):
            load_model(tmp_path / "lambda.h5", custom_objects=objects)
    finally:
        for name in imported:
            del sys.modules[name]


@pytest.mark.parametrize("source, message", [
    ("raise RuntimeError('boom')\n", "importing .* failed: RuntimeError: boom"),
    ("VALUE = 3\n", "defines no class or function"),
])
def test_a_module_that_fails_or_defines_nothing_is_a_clear_error(script_model, tmp_path, capsys,
                                                                  source, message):
    (tmp_path / "bad.py").write_text(source)
    assert _prune(script_model, tmp_path / "out", "--custom-objects",
                  str(tmp_path / "bad.py")) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_missing_file_or_one_that_is_not_python_is_named(script_model, tmp_path, capsys):
    assert _prune(script_model, tmp_path / "out", "--custom-objects",
                  str(tmp_path / "absent.py")) == 2
    assert "no Python file" in capsys.readouterr().err
    (tmp_path / "layers.txt").write_text(LAYERS)
    assert _prune(script_model, tmp_path / "out", "--custom-objects",
                  str(tmp_path / "layers.txt")) == 2
    assert "is not a Python file (.py)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_keras3_file_with_custom_objects_is_refused_clearly(tmp_path):
    import keras as keras3

    model = keras3.Sequential([keras3.Input((3,)), keras3.layers.Dense(2)])
    model.save(tmp_path / "k3.keras")
    with pytest.raises(InputError, match="Keras 3 model file: 'custom_objects'"):
        load_model(tmp_path / "k3.keras", custom_objects={"Dense": keras.layers.Dense})

"""Safe loading of untrusted model files: the config is scanned before anything runs."""

import json
import shutil
import zipfile

import numpy as np
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.io._loading import (
    ModelFileError,
    UnsafeModelError,
    load_model,
    scan_model_config,
)
from tf_backdoor_defense.masks._wrapper import wrap_layers


def _evil_model(marker):
    """A model whose Lambda writes ``marker`` whenever its function runs (also while loading)."""
    path = str(marker)

    def payload(x):
        with open(path, "w") as handle:
            handle.write("the attacker's code ran")
        return x

    inputs = keras.Input((4,))
    hidden = keras.layers.Lambda(payload, name="innocent_looking")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", name="out")(hidden)
    model = keras.Model(inputs, outputs)
    marker.unlink()  # building the model ran it once
    return model


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "MARKER"
    model = _evil_model(marker)
    files = {}
    for name in ("evil.h5", "evil.keras"):
        model.save(tmp_path / name)
        files[name] = tmp_path / name
    if marker.exists():
        marker.unlink()
    return marker, files, model


def test_h5_with_a_lambda_is_refused_before_its_code_runs(evil):
    marker, files, _ = evil
    with pytest.raises(UnsafeModelError) as error:
        load_model(files["evil.h5"])
    assert not marker.exists()  # the payload did not run
    message = str(error.value)
    assert "innocent_looking" in message and "Lambda" in message
    assert "trust_model_code=True" in message and "--" not in message  # the API, not a flag
    assert error.value.layer == "innocent_looking" and error.value.class_name == "Lambda"
    assert message.startswith(error.value.reason) and "trust_model_code" not in error.value.reason


def test_trust_model_code_loads_the_lambda_and_runs_its_code(evil):
    marker, files, _ = evil
    model = load_model(files["evil.h5"], trust_model_code=True)
    assert marker.exists()  # proves the refused load above would have run the payload
    assert model.output_shape == (None, 2)


def test_keras_file_and_saved_model_with_a_lambda_are_refused(evil, tmp_path):
    marker, files, model = evil
    with pytest.raises(UnsafeModelError, match="innocent_looking"):
        load_model(files["evil.keras"])
    folder = tmp_path / "evil_savedmodel"
    model.save(folder, save_format="tf")
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeModelError, match="innocent_looking"):
        load_model(folder)
    # without keras_metadata.pb, only the TF graph is left: not a Keras model, nothing runs
    (folder / "keras_metadata.pb").unlink()
    with pytest.raises(ModelFileError, match="without Keras metadata"):
        load_model(folder, trust_model_code=True)
    assert not marker.exists()


def test_nested_lambda_inside_a_wrapper_or_submodel_is_found():
    inner = keras.Sequential([keras.Input((3, 4)),
                              keras.layers.TimeDistributed(keras.layers.Lambda(lambda x: x * 2),
                                                           name="td")], name="sub")
    outer = keras.Sequential([keras.Input((3, 4)), inner, keras.layers.Flatten()])
    with pytest.raises(UnsafeModelError, match="Lambda"):
        scan_model_config(outer.to_json())


@keras.utils.register_keras_serializable(package="attacker")
class Custom(keras.layers.Layer):
    def call(self, inputs):
        return inputs


def test_classes_outside_keras_and_this_package_are_refused(tmp_path):
    model = keras.Sequential([keras.Input((3,)), Custom(name="mystery"), keras.layers.Dense(2)])
    model.save(tmp_path / "custom.h5")
    with pytest.raises(UnsafeModelError,
                       match=r"'mystery'.*attacker>Custom.*custom_objects=\{'attacker>Custom': "
                             r"\.\.\.\}.*trust_model_code=True"):
        load_model(tmp_path / "custom.h5")
    loaded = load_model(tmp_path / "custom.h5", custom_objects={"attacker>Custom": Custom})
    assert isinstance(loaded.get_layer("mystery"), Custom)


class _ScriptScale(keras.layers.Layer):
    """A class from a training script: not registered, so unknown to a process without it."""

    def call(self, inputs):
        return inputs * 2.0


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_a_trusted_file_whose_class_this_process_lacks_says_how_to_load_it(tmp_path, suffix):
    model = keras.Sequential([keras.Input((3,)), _ScriptScale(name="scale"),
                              keras.layers.Dense(2)])
    model.save(tmp_path / f"script{suffix}")
    with pytest.raises(ModelFileError,
                       match=r"_ScriptScale.*custom_objects=\{'Name': Name\}, trust"):
        load_model(tmp_path / f"script{suffix}", trust_model_code=True)
    loaded = load_model(tmp_path / f"script{suffix}", trust_model_code=True,
                        custom_objects={"_ScriptScale": _ScriptScale})
    assert isinstance(loaded.get_layer("scale"), _ScriptScale)


@pytest.mark.parametrize("node, why", [
    ({"class_name": "Dense", "module": "os", "config": {"name": "d", "units": 1}}, "module 'os'"),
    ({"class_name": "function", "module": "subprocess", "config": "run"}, "module 'subprocess'"),
    ({"class_name": "TFOpLambda", "config": {"name": "w", "function": "io.write_file"}},
     "io.write_file"),
    ({"class_name": "TFOpLambda", "config": {"name": "p", "function": "print"}}, "tf.print"),
    ({"class_name": "TFOpLambda", "config": {"name": "r", "function": "raw_ops.WriteFile"}},
     "raw_ops"),
    ({"class_name": "__lambda__", "config": {"value": "abc"}}, "lambda"),
])
def test_configs_that_import_modules_or_call_side_effect_ops_are_refused(node, why):
    config = {"class_name": "Functional", "config": {"name": "m", "layers": [node]}}
    with pytest.raises(UnsafeModelError, match=why):
        scan_model_config(config)


def test_builtin_tf_op_layers_of_the_repaired_model_are_allowed(tmp_path):
    from tf_backdoor_defense.defenses._repair import repaired_model

    original = tiny_conv_model()
    pruned = wrap_layers(original, "conv_b", masks={"conv_b": [0, 1, 1, 1, 1, 1]})
    repaired = repaired_model(original, pruned)
    repaired.save(tmp_path / "repaired.h5")
    loaded = load_model(tmp_path / "repaired.h5")
    x = np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded(x), repaired(x), atol=1e-6)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_pruned_models_of_this_package_load_with_their_masks(tmp_path, suffix):
    pruned = wrap_layers(tiny_conv_model(), "conv_b", masks={"conv_b": [1, 0, 1, 0, 1, 1]})
    pruned.save(tmp_path / f"pruned{suffix}")
    loaded = load_model(tmp_path / f"pruned{suffix}")
    assert loaded.get_layer("conv_b").pruned_channels.tolist() == [1, 3]


def test_weights_file_plus_architecture(tmp_path):
    model = tiny_conv_model(seed=3)
    model.save_weights(tmp_path / "weights.h5")
    (tmp_path / "arch.json").write_text(model.to_json())
    tiny_conv_model(seed=5).save(tmp_path / "other_weights.h5")
    x = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    for architecture in ("arch.json", "other_weights.h5"):
        loaded = load_model(tmp_path / architecture, weights=tmp_path / "weights.h5")
        np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    with pytest.raises(ModelFileError, match="holds only weights.*as weights") as error:
        load_model(tmp_path / "weights.h5")
    assert error.value.needs_weights and "--" not in str(error.value)
    with pytest.raises(ModelFileError, match="architecture without weights.*weights=") as error:
        load_model(tmp_path / "arch.json")
    assert error.value.needs_weights and error.value.path == str(tmp_path / "arch.json")
    tiny_conv_model(channels=4).save_weights(tmp_path / "wrong.h5")
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(tmp_path / "arch.json", weights=tmp_path / "wrong.h5")


def test_malformed_truncated_and_foreign_files_give_clear_errors(tmp_path):
    tiny_conv_model().save(tmp_path / "good.h5")
    data = (tmp_path / "good.h5").read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.h5").write_text("not a model")
    (tmp_path / "script.py").write_text("print('hi')")
    keras_file = tmp_path / "good.keras"
    tiny_conv_model().save(keras_file)
    (tmp_path / "truncated.keras").write_bytes(keras_file.read_bytes()[:300])
    (tmp_path / "folder").mkdir()
    cases = {
        "truncated.h5": "truncated.h5",
        "text.h5": "not a valid .h5",
        "script.py": "not a model file",
        "truncated.keras": "not a readable .keras",
        "folder": "not a SavedModel",
        "missing.h5": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(ModelFileError, match=message):
            load_model(tmp_path / name)


def test_keras3_files_and_plain_saved_models_are_explained(tmp_path):
    path = tmp_path / "k3.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {}}))
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.10.0"}))
    with pytest.raises(ModelFileError, match="Keras 3.10.0"):
        load_model(path)
    from tf_backdoor_defense.export._export import export_saved_model

    folder = export_saved_model(tiny_conv_model(), tmp_path / "served")
    with pytest.raises(ModelFileError, match="plain TensorFlow SavedModel"):
        load_model(folder)
    shutil.rmtree(folder)

"""An attack corpus: model files an attacker would craft, built here, each refused before it runs.

Every file's payload writes a marker file; the tests prove the marker never
appears when loading without ``trust_model_code`` and, where tf-keras's own
loader can be driven into it, that it does appear there (so the file really
is an attack and the refusal is what stopped it).
"""

import io
import json
import shutil
import zipfile

import h5py
import numpy as np
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.io._formats import HDF5_SIGNATURE, escape, one_line
from tf_backdoor_defense.metrics import clean_accuracy
from tf_backdoor_defense.io._loading import (
    ModelFileError,
    UnsafeModelError,
    load_model,
    read_model_config,
)


def _benign():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="out")], name="m")


def _functional_config(op_layer, inputs=None):
    """A functional model config: Input -> ``op_layer`` -> Dense, as tf-keras writes it."""
    layer_names = ["inp", op_layer["config"]["name"], "out"]
    return {"class_name": "Functional", "config": {
        "name": "m", "trainable": True,
        "layers": [
            {"class_name": "InputLayer", "name": "inp", "inbound_nodes": [],
             "config": {"batch_input_shape": [None, 4], "dtype": "float32", "name": "inp"}},
            dict(op_layer, name=op_layer["config"]["name"]),
            {"class_name": "Dense", "name": "out",
             "config": {"name": "out", "units": 2, "activation": "linear"},
             "inbound_nodes": [[["inp", 0, 0, {}]]]},
        ],
        "input_layers": [["inp", 0, 0]],
        "output_layers": [["out", 0, 0], [layer_names[1], 0, 0]] if inputs else [["out", 0, 0]],
    }}


def _op_layer(function, inbound, name="tf.op"):
    return {"class_name": "TFOpLambda", "inbound_nodes": inbound,
            "config": {"name": name, "trainable": True, "dtype": "float32",
                       "function": function}}


def _h5_with_config(path, config):
    """A full-model .h5 (benign weights) whose model_config is ``config``."""
    _benign().save(path)
    with h5py.File(path, "r+") as handle:
        handle.attrs["model_config"] = json.dumps(config)
    return path


def _keras_with_config(path, config):
    _benign().save(path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _refused(path, *, kinds=(UnsafeModelError, ModelFileError)):
    with pytest.raises(kinds) as error:
        load_model(path)
    message = str(error.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 700
    return error.value


# -- TF-op layers --------------------------------------------------------------------------------
_WRITERS = ["io.write_file", "compat.v1.io.write_file", "compat.v1.write_file",
            "compat.v2.io.write_file", "raw_ops.WriteFile", "print", "compat.v1.Print",
            "load_op_library", "compat.v1.load_file_system_library", "debugging.assert_equal",
            "io.gfile.GFile", "experimental.numpy.save", "strings.format", "py_function"]


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
@pytest.mark.parametrize("function", _WRITERS)
def test_tf_op_layers_outside_the_pure_allowlist_are_refused(tmp_path, suffix, function):
    marker = tmp_path / "MARKER"
    layer = _op_layer(function, [["_CONSTANT_VALUE", -1, str(marker), {"contents": "x"}]])
    writer = _h5_with_config if suffix == ".h5" else _keras_with_config
    path = writer(tmp_path / f"evil{suffix}", _functional_config(layer, inputs=True))
    error = _refused(path, kinds=UnsafeModelError)
    assert "pure tensor functions" in str(error) and error.class_name == "TFOpLambda"
    assert not marker.exists()


def test_a_write_file_op_on_constants_runs_in_tf_keras_but_not_here(tmp_path):
    marker = tmp_path / "MARKER"
    layer = _op_layer("io.write_file", [["_CONSTANT_VALUE", -1, str(marker), {"contents": "x"}]])
    path = _h5_with_config(tmp_path / "evil.h5", _functional_config(layer, inputs=True))
    _refused(path)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - tf-keras fails afterwards; the op already ran
        keras.models.load_model(path, compile=False)
    assert marker.exists()  # the attack is real: tf-keras's own loader ran the op


@pytest.mark.parametrize("inbound", [
    [["_CONSTANT_VALUE", -1, 1.0, {"y": 2.0}]],                      # constants only
    [["_CONSTANT_VALUE", -1, [1.0, 2.0], {}]],
    [["inp", 0, 0, {"y": {"class_name": "Dense", "config": {"units": 1}}}]],  # an object
])
def test_allowed_ops_called_on_constants_or_objects_are_refused(inbound):
    from tf_backdoor_defense.io._loading import scan_model_config

    config = _functional_config(_op_layer("math.add", inbound))
    with pytest.raises(UnsafeModelError, match="constants only|not plain data"):
        scan_model_config(config)


def test_allowed_ops_with_a_tensor_and_constant_arguments_load(tmp_path):
    inputs = keras.Input((4,))
    hidden = tf.math.subtract(1.0, inputs) * 2.0
    hidden = tf.reshape(hidden, (-1, 2, 2))[:, 0]
    model = keras.Model(inputs, keras.layers.Dense(2)(tf.nn.relu(hidden)))
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    for name in ("ops.h5", "ops.keras"):
        model.save(tmp_path / name)
        np.testing.assert_allclose(load_model(tmp_path / name)(x), model(x), atol=1e-6)


# -- Lambda, modules, functions -------------------------------------------------------------------
def _lambda_model(marker, name="innocent"):
    path = str(marker)

    def payload(x):
        with open(path, "w") as handle:
            handle.write("ran")
        return x

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(payload, name=name)(inputs))
    marker.unlink()
    return model


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_lambda_files_are_refused_and_ansi_names_are_escaped(tmp_path, suffix):
    marker = tmp_path / "MARKER"
    name = "conv\x1b[2K\r\x1b[32mOK: model is clean\x1b[0m"
    model = _lambda_model(marker, name="innocent")
    config = json.loads(model.to_json().replace('"innocent"', json.dumps(name)))
    writer = _h5_with_config if suffix == ".h5" else _keras_with_config
    path = writer(tmp_path / f"evil{suffix}", config)
    marker.unlink(missing_ok=True)
    error = _refused(path, kinds=UnsafeModelError)
    assert not marker.exists()
    assert "\\x1b[2K\\x0d\\x1b[32mOK" in str(error) and "\r" not in str(error)
    assert error.layer == escape(name)


@pytest.mark.parametrize("node, why", [
    ({"class_name": "Dense", "module": "tensorflow.python.ops.gen_io_ops",
      "config": {"name": "d", "units": 1}}, "module"),
    ({"class_name": "function", "module": "tensorflow.io", "config": "write_file"},
     "tensorflow.io"),
    ({"class_name": "function", "module": "builtins", "config": "exec"}, "exec"),
    ({"class_name": "InstanceMethod", "config": {"name": "i", "attr_name": "numpy"}}, "numpy"),
    ({"class_name": "ClassMethod", "config": {"name": "c", "cls_symbol": "io",
                                                "method_name": "write_file"}}, "write_file"),
    ({"class_name": "Dense", "registered_name": 5, "config": {"name": "d"}}, "custom class"),
    ({"class_name": ["Dense"], "config": {"name": "d"}}, "not a string"),
])
def test_module_function_and_method_escapes_are_refused(node, why):
    from tf_backdoor_defense.io._loading import scan_model_config

    config = {"class_name": "Functional", "config": {"name": "m", "layers": [node]}}
    with pytest.raises(UnsafeModelError, match=why):
        scan_model_config(config)


# -- ambiguous files --------------------------------------------------------------------------------
def test_polyglot_hdf5_with_a_zip_user_block_and_appended_keras_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    evil = _lambda_model(marker)
    path = tmp_path / "built.bin"
    with h5py.File(path, "w", userblock_size=512) as handle:
        from tf_keras.src.saving.legacy import hdf5_format

        hdf5_format.save_model_to_hdf5(evil, handle)
    marker.unlink(missing_ok=True)
    benign = tmp_path / "benign.keras"
    _benign().save(benign)
    data = bytearray(path.read_bytes())
    data[:4] = b"PK\x03\x04"
    path.write_bytes(bytes(data) + benign.read_bytes())
    for name in ("polyglot.h5", "polyglot.keras"):
        shutil.copy(path, tmp_path / name)
        error = _refused(tmp_path / name, kinds=ModelFileError)
        assert "zip" in str(error) and "HDF5" in str(error)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - h5py reads the HDF5 part: the Lambda runs
        keras.models.load_model(tmp_path / "polyglot.h5", compile=False, safe_mode=False)(
            np.zeros((1, 4))) and None
        raise RuntimeError("loaded")
    assert marker.exists()


@pytest.mark.parametrize("change, why", [
    (lambda data, h5: h5 + data, "both an HDF5 file and a zip"),
    (lambda data, h5: data + h5, "not at the end"),
    (lambda data, h5: b"junk" * 3 + data, "does not start at byte 0"),
    (lambda data, h5: data + b"trailing", "not at the end"),
    (lambda data, h5: bytes(512) + h5, "user block"),
])
def test_joined_prefixed_and_suffixed_files_are_refused(tmp_path, change, why):
    _benign().save(tmp_path / "a.keras")
    _benign().save(tmp_path / "a.h5")
    data = change((tmp_path / "a.keras").read_bytes(), (tmp_path / "a.h5").read_bytes())
    (tmp_path / "b.keras").write_bytes(data)
    with pytest.raises(ModelFileError, match=why):
        load_model(tmp_path / "b.keras")


def test_duplicate_zip_members_are_refused(tmp_path):
    path = _keras_with_config(tmp_path / "dup.keras", {"class_name": "Sequential",
                                                        "config": {"layers": []}})
    with zipfile.ZipFile(path, "a") as archive, pytest.warns(UserWarning):
        archive.writestr("config.json", b"{}")
    with pytest.raises(ModelFileError, match="same name"):
        load_model(path)


def test_the_format_comes_from_the_bytes_not_the_name(tmp_path):
    model = tiny_conv_model()
    model.save(tmp_path / "net.h5")
    model.save(tmp_path / "net.keras")
    shutil.copy(tmp_path / "net.h5", tmp_path / "really_h5.keras")
    shutil.copy(tmp_path / "net.keras", tmp_path / "really_keras.h5")
    x = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
    assert read_model_config(tmp_path / "really_h5.keras")["format"] == "h5"
    assert read_model_config(tmp_path / "really_keras.h5")["format"] == "keras"
    for name in ("really_h5.keras", "really_keras.h5"):
        np.testing.assert_allclose(load_model(tmp_path / name)(x), model(x), atol=1e-6)


# -- SavedModel folders ---------------------------------------------------------------------------
class _WritesOnInit(tf.saved_model.experimental.TrackableResource):
    """A resource whose initializer (saved in the SavedModel graph) writes a file."""

    def __init__(self, path):
        self.path = path
        super().__init__()

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

    def _initialize(self):
        tf.io.write_file(self.path, "ran")


def test_saved_model_resource_initializer_never_runs_and_weights_load(tmp_path):
    marker = tmp_path / "MARKER"
    model = _benign()
    model.evil = _WritesOnInit(str(marker))
    folder = tmp_path / "evil_sm"
    model.save(folder, save_format="tf")
    assert not marker.exists()
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    loaded = load_model(folder)  # no trust flag: rebuilt from config + checkpoint
    assert not marker.exists()
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    keras.models.load_model(folder, compile=False)  # tf-keras's loader runs the graph
    assert marker.exists()


def test_plain_tf_keras_saved_models_load_without_the_trust_flag(tmp_path):
    from tf_backdoor_defense.masks._wrapper import wrap_layers

    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Conv2D(3, 3, name="conv")(inputs * 2.0)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(hidden)))
    pruned = wrap_layers(tiny_conv_model(), "conv_b", masks={"conv_b": [1, 0, 1, 0, 1, 1]})
    x = np.random.default_rng(1).random((2, 8, 8, 1), dtype=np.float32)
    for name, net in (("functional", model), ("pruned", pruned), ("seq", tiny_conv_model())):
        net.save(tmp_path / name, save_format="tf")
        np.testing.assert_allclose(load_model(tmp_path / name)(x), net(x), atol=1e-5)
    assert load_model(tmp_path / "pruned").get_layer("conv_b").pruned_channels.tolist() == [1, 3]


def test_saved_model_with_a_lambda_or_of_a_subclassed_model_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    _lambda_model(marker).save(tmp_path / "lam", save_format="tf")
    marker.unlink(missing_ok=True)
    _refused(tmp_path / "lam", kinds=UnsafeModelError)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Sub()
    sub(np.zeros((1, 4), np.float32))
    sub.save(tmp_path / "sub", save_format="tf")
    with pytest.raises(ModelFileError, match="subclassed model .*model.load_weights"):
        load_model(tmp_path / "sub")
    assert not marker.exists()
    # what the message advises: the class built again, the weights loaded, the model measured
    rebuilt = Sub()
    rebuilt(np.zeros((1, 4), np.float32))
    rebuilt.load_weights(str(tmp_path / "sub" / "variables" / "variables"))
    x = np.random.default_rng(0).random((8, 4), dtype=np.float32)
    assert clean_accuracy(rebuilt, (x, sub(x).numpy().argmax(-1))) == 1.0


# -- messages -------------------------------------------------------------------------------------
def test_quoted_errors_are_one_short_line():
    assert one_line(ValueError("a\nb")) == "a"
    assert len(one_line(ValueError("config " * 200))) == 200
    assert one_line(ValueError("\x1b]0;title\x07x")) == "\\x1b]0;title\\x07x"


def test_empty_model_file_is_called_empty(tmp_path):
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(ModelFileError, match="is empty"):
        load_model(tmp_path / "empty.h5")


def test_hdf5_signature_alone_is_a_clean_error():
    data = HDF5_SIGNATURE + bytes(64)
    from tf_backdoor_defense.io._loading import _open_h5

    with pytest.raises(ModelFileError, match="not a readable HDF5"):
        _open_h5(data, "x.h5").close()
    assert isinstance(io.BytesIO(data).read(1), bytes)

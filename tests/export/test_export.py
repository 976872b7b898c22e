"""Export: masks folded in or channels removed, predictions equal to the masked model's."""

import json
import os
import subprocess
import sys
import warnings
import zipfile

import h5py
import numpy as np
import pytest

from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.export._export import (
    ShrinkFallbackWarning,
    convert_to_tflite,
    count_params,
    export_keras,
    export_saved_model,
    strip_masks,
)
from tf_backdoor_defense.graph._channels import channel_consumers, layer_kind
from tf_backdoor_defense.masks._wrapper import PruneByActivation, wrap_layers

L = keras.layers
TOL = 1e-5


# -- tiny architectures -----------------------------------------------------------
def sequential_conv():
    model = keras.Sequential([
        keras.Input((10, 10, 2)),
        L.Conv2D(6, 3, activation="relu", name="conv_a"),
        L.MaxPooling2D(name="pool"),
        L.Conv2D(5, 2, activation="relu", name="conv_b"),
        L.Flatten(name="flat"),
        L.Dense(3, activation="softmax", name="out"),
    ], name="seq")
    return model, {"conv_a": [1, 0, 1, 0, 0, 1]}


def sigmoid_conv():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(5, 3, activation="sigmoid", name="conv")(inputs)
    x = L.Flatten(name="flat")(x)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x)), \
        {"conv": [0, 1, 1, 0, 1]}


def sigmoid_conv_same():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(5, 3, activation="sigmoid", name="conv")(inputs)
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="next")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x)), \
        {"conv": [0, 1, 1, 0, 1]}


def _randomize_bn(model, name):
    layer = model.get_layer(name)
    rng = np.random.default_rng(1)
    gamma, beta, mean, var = layer.get_weights()
    layer.set_weights([rng.normal(1, 0.3, gamma.shape), rng.normal(0, 0.5, beta.shape),
                       rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 2, var.shape)])


def conv_bn_dense():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(6, 3, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation("relu", name="act")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Flatten(name="flat")(x)
    model = keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x))
    _randomize_bn(model, "bn")
    return model, {"conv": [1, 0, 0, 1, 1, 0]}


def conv_bn_conv(padding):
    def build():
        inputs = keras.Input((9, 9, 1))
        x = L.Conv2D(6, 3, activation="relu", name="conv")(inputs)
        x = L.BatchNormalization(name="bn")(x)
        x = L.Conv2D(4, 3, padding=padding, activation="relu", name="next")(x)
        x = L.Flatten(name="flat")(x)
        model = keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x))
        _randomize_bn(model, "bn")
        return model, {"conv": [1, 0, 1, 0, 1, 1]}
    return build


def dense_mlp():
    inputs = keras.Input((7,))
    x = L.Dense(8, activation="relu", name="fc_1")(inputs)
    x = L.Dense(6, activation="tanh", name="fc_2")(x)
    model = keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x))
    return model, {"fc_1": [1, 0, 1, 1, 0, 1, 0, 1], "fc_2": [0, 1, 1, 0, 1, 1]}


def badnet_like():
    """The lab BadNet's shape in miniature: pruned conv -> pool -> two branches -> Add."""
    inputs = keras.Input((16, 14, 3))
    x = L.Conv2D(4, 3, activation="relu", name="conv_1")(inputs)
    x = L.MaxPooling2D(name="pool_1")(x)
    x = L.Conv2D(6, 2, activation="relu", name="conv_3")(x)
    x = L.MaxPooling2D(name="pool_3")(x)
    a = L.Flatten(name="flatten_1")(x)
    a = L.Dense(5, name="fc_1")(a)
    b = L.Conv2D(5, 2, activation="relu", name="conv_4")(x)
    b = L.Flatten(name="flatten_2")(b)
    b = L.Dense(5, name="fc_2")(b)
    y = L.Add(name="add_1")([a, b])
    y = L.Activation("relu", name="activation_1")(y)
    model = keras.Model(inputs, L.Dense(4, activation="softmax", name="output")(y))
    return model, {"conv_3": [1, 0, 0, 1, 0, 1]}


def residual_block():
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inputs)
    y = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    y = L.Add(name="add")([x, y])
    y = L.GlobalAveragePooling2D(name="gap")(y)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(y)), \
        {"conv": [1, 0, 1, 0]}


def concatenate_model():
    inputs = keras.Input((8, 8, 1))
    a = L.Conv2D(4, 3, activation="relu", name="conv_a")(inputs)
    b = L.Conv2D(3, 3, activation="relu", name="conv_b")(inputs)
    x = L.Concatenate(name="cat")([a, b])
    x = L.Conv2D(5, 3, activation="relu", name="conv_c")(x)
    x = L.Flatten(name="flat")(x)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x)), \
        {"conv_b": [0, 1, 0], "conv_a": [1, 1, 0, 1]}


def conv1d_model():
    inputs = keras.Input((12, 3))
    x = L.Conv1D(6, 3, activation="relu", name="conv")(inputs)
    x = L.MaxPooling1D(name="pool")(x)
    x = L.Conv1D(4, 2, activation="relu", name="conv_2")(x)
    x = L.GlobalMaxPooling1D(name="gmp")(x)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x)), \
        {"conv": [1, 0, 1, 1, 0, 0]}


def gap_dense():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x)), \
        {"conv": [0, 0, 1, 1, 0, 1]}


ARCHITECTURES = {
    "sequential_conv": sequential_conv,
    "sigmoid_conv": sigmoid_conv,
    "sigmoid_conv_same_padding": sigmoid_conv_same,
    "conv_bn_dense": conv_bn_dense,
    "conv_bn_valid_conv": conv_bn_conv("valid"),
    "dense_mlp": dense_mlp,
    "badnet_like": badnet_like,
    "concatenate": concatenate_model,
    "conv1d": conv1d_model,
    "gap_dense": gap_dense,
}


def masked(builder):
    keras.utils.set_random_seed(0)
    model, masks = builder()
    return model, wrap_layers(model, list(masks), masks=masks), masks


def inputs_for(model, n=16, seed=0):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def max_diff(a, b, x):
    return float(np.max(np.abs(np.asarray(a(x)) - np.asarray(b(x)))))


# -- folding and removal ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("shrink", [False, True])
def test_stripped_model_matches_masked_model(name, shrink):
    original, model, masks = masked(ARCHITECTURES[name])
    x = inputs_for(model)
    assert max_diff(model, original, x) > 1e-4  # the masks change the predictions
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShrinkFallbackWarning)
        stripped, report = strip_masks(model, shrink=shrink, return_report=True)
    assert max_diff(stripped, model, x) <= TOL
    assert not any(isinstance(layer, PruneByActivation) for layer in stripped.layers)
    actions = {item.name: item.action for item in report.layers}
    assert set(actions) == set(masks)
    if shrink:
        assert set(actions.values()) == {"removed"}
        assert report.params_after < report.params_before
        for layer, mask in masks.items():
            inner = stripped.get_layer(layer)
            width = inner.units if isinstance(inner, L.Dense) else inner.filters
            assert width == int(np.sum(mask))
    else:
        assert report.params_after == report.params_before
        for layer, mask in masks.items():
            kernel, bias = stripped.get_layer(layer).get_weights()
            pruned = np.flatnonzero(np.asarray(mask) == 0)
            assert np.all(kernel[..., pruned] == 0) and np.all(bias[pruned] == 0)


def test_sequential_model_stays_sequential_with_next_conv_sliced():
    _, model, masks = masked(sequential_conv)
    stripped = strip_masks(model, shrink=True)
    assert isinstance(stripped, keras.Sequential)
    assert stripped.get_layer("conv_b").kernel.shape[-2] == sum(masks["conv_a"])


def test_dense_after_flatten_keeps_rows_in_channels_last_order():
    _, model, masks = masked(badnet_like)
    stripped = strip_masks(model, shrink=True)
    kept = np.flatnonzero(masks["conv_3"])
    positions = int(np.prod(model.get_layer("pool_3").output_shape[1:3]))
    rows = (np.arange(positions)[:, None] * 6 + kept).reshape(-1)
    original_kernel = model.get_layer("fc_1").kernel.numpy()
    np.testing.assert_array_equal(stripped.get_layer("fc_1").kernel.numpy(),
                                  original_kernel[rows])
    assert stripped.get_layer("conv_4").kernel.shape[-2] == kept.size


def test_batchnorm_after_removed_channels_is_sliced_and_absorbed():
    _, model, masks = masked(conv_bn_dense)
    stripped = strip_masks(model, shrink=True)
    assert stripped.get_layer("bn").gamma.shape == (sum(masks["conv"]),)
    # the pruned channels leave BatchNormalization as nonzero constants: the bias changes
    assert not np.allclose(stripped.get_layer("out").bias.numpy(),
                           model.get_layer("out").bias.numpy())


@pytest.mark.parametrize("builder,reason", [
    (residual_block, "Add 'add'"),
    (conv_bn_conv("same"), "padding='same'"),
])
def test_shrink_falls_back_to_folding_with_a_warning(builder, reason):
    _, model, _ = masked(builder)
    with pytest.warns(ShrinkFallbackWarning, match="Cannot remove the pruned channels of layer"):
        stripped, report = strip_masks(model, shrink=True, return_report=True)
    assert report.layers[0].action == "folded"
    assert reason in report.layers[0].reason
    assert max_diff(stripped, model, inputs_for(model)) <= TOL


def test_residual_with_sigmoid_uses_a_mask_layer_and_stays_exact():
    def build():
        inputs = keras.Input((8, 8, 2))
        x = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inputs)
        y = L.Conv2D(4, 3, padding="same", activation="sigmoid", name="conv")(x)
        y = L.Add(name="add")([x, y])
        y = L.GlobalAveragePooling2D(name="gap")(y)
        return keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(y)), \
            {"conv": [1, 0, 1, 0]}

    _, model, _ = masked(build)
    for shrink in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ShrinkFallbackWarning)
            stripped, report = strip_masks(model, shrink=shrink, return_report=True)
        assert report.layers[0].action == "folded+mask"
        assert isinstance(stripped.get_layer("conv_mask"), L.Conv2D)
        assert max_diff(stripped, model, inputs_for(model)) <= TOL


@pytest.mark.parametrize("activation,action,reason", [
    ("softmax", "folded+mask", "mixes channels"),
    ("linear", "folded", "reach the model output"),
])
def test_pruned_output_layer_is_folded_exactly(activation, action, reason):
    model = keras.Sequential([keras.Input((5,)), L.Dense(6, activation="relu", name="fc"),
                              L.Dense(4, activation=activation, name="out")])
    wrapped = wrap_layers(model, ["out"], masks={"out": [1, 0, 1, 1]})
    with pytest.warns(ShrinkFallbackWarning, match=reason):
        stripped, report = strip_masks(wrapped, shrink=True, return_report=True)
    assert report.layers[0].action == action
    assert stripped.output_shape == (None, 4)
    assert max_diff(stripped, wrapped, inputs_for(wrapped)) <= TOL


def test_strip_does_not_change_the_input_model():
    _, model, _ = masked(badnet_like)
    before = [w.copy() for w in model.get_weights()]
    strip_masks(model, shrink=True)
    strip_masks(model)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_strip_rejects_bad_arguments():
    _, model, _ = masked(gap_dense)
    with pytest.raises(TypeError, match="shrink"):
        strip_masks(model, shrink="yes")
    with pytest.raises(TypeError, match="tf_keras.Model"):
        strip_masks("model")


def test_channel_consumers_follow_pool_and_flatten():
    _, model, _ = masked(badnet_like)
    uses = {str(use) for use in channel_consumers(model, "conv_3")}
    assert uses == {"pool_3 > conv_4 (linear)", "pool_3 > flatten_1 > fc_1 (linear)"}
    assert layer_kind(model.get_layer("add_1")) == "merge"


def test_count_params_leaves_out_masks():
    original, model, _ = masked(gap_dense)
    assert count_params(model) == original.count_params()


# -- files -------------------------------------------------------------------------
@pytest.mark.slow
def test_saved_model_loads_without_the_package_in_tf_serving_layout(tmp_path):
    _, model, _ = masked(badnet_like)
    x = inputs_for(model, 8)
    folder = export_saved_model(model, tmp_path / "badnet", shrink=True, version=3)
    assert folder == tmp_path / "badnet" / "3"
    assert (folder / "saved_model.pb").is_file()
    assert [p.name for p in (tmp_path / "badnet").iterdir()] == ["3"]
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "f = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "out = f(tf.constant(np.load(sys.argv[2])))\n"
        "assert 'tf_backdoor_defense' not in sys.modules\n"
        "np.save(sys.argv[3], out['output'].numpy())\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)
    subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, env=env, cwd=tmp_path, timeout=300)
    served = np.load(tmp_path / "y.npy")
    assert np.max(np.abs(served - model(x).numpy())) <= TOL


def test_saved_model_overwrite_is_explicit_and_atomic(tmp_path):
    _, model, _ = masked(gap_dense)
    target = tmp_path / "served"
    export_saved_model(model, target)
    with pytest.raises(ValueError, match="already exists"):
        export_saved_model(model, target)
    export_saved_model(model, target, shrink=True, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]
    loaded = tf.saved_model.load(str(target)).signatures["serving_default"]
    x = inputs_for(model, 4)
    assert np.max(np.abs(loaded(tf.constant(x))["out"].numpy() - model(x).numpy())) <= TOL
    with pytest.raises(ValueError, match="version"):
        export_saved_model(model, tmp_path / "v", version=0)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_keras_file_needs_no_custom_objects(tmp_path, suffix):
    _, model, _ = masked(badnet_like)
    path = export_keras(model, tmp_path / f"model{suffix}", shrink=True)
    if suffix == ".h5":
        with h5py.File(path, "r") as f:
            config = f.attrs["model_config"]
    else:
        with zipfile.ZipFile(path) as f:
            config = f.read("config.json").decode()
    config = config.decode() if isinstance(config, bytes) else config
    assert "PruneByActivation" not in config and "tf_backdoor_defense" not in config
    json.loads(config)
    loaded = keras.models.load_model(path)
    assert max_diff(loaded, model, inputs_for(model)) <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model{suffix}"]
    with pytest.raises(ValueError, match=r"'\.h5' or '\.keras'"):
        export_keras(model, tmp_path / "model.txt")


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_conversion_matches_masked_model(tmp_path):
    _, model, _ = masked(badnet_like)
    folder = export_saved_model(model, tmp_path / "m", shrink=True)
    for content in (convert_to_tflite(folder), convert_to_tflite(model, shrink=True)):
        interpreter = tf.lite.Interpreter(model_content=content)
        runner = interpreter.get_signature_runner("serving_default")
        x = inputs_for(model, 4, seed=3)
        (name,) = runner.get_input_details()
        out = runner(**{name: x})
        assert np.max(np.abs(out["output"] - model(x).numpy())) <= 1e-4
    with pytest.raises(ValueError, match="saved_model.pb"):
        convert_to_tflite(tmp_path)


@pytest.mark.shared_data
def test_lab_badnet_shrinks_conv_3_exactly(lab3_dir):
    net = keras.models.load_model(lab3_dir / "bd_net.h5", compile=False)
    mask = np.ones(60, np.float32)
    mask[np.random.default_rng(0).permutation(60)[:52]] = 0
    model = wrap_layers(net, "conv_3", masks={"conv_3": mask})
    stripped, report = strip_masks(model, shrink=True, return_report=True)
    assert stripped.get_layer("conv_3").filters == 8
    assert stripped.get_layer("conv_4").kernel.shape[-2] == 8
    assert stripped.get_layer("fc_1").kernel.shape[0] == 5 * 4 * 8
    assert report.params_after < report.params_before
    x = np.random.default_rng(0).uniform(0, 255, (16, 55, 47, 3)).astype(np.float32)
    assert max_diff(stripped, model, x) <= TOL

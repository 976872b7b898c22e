"""Regression tests: masks inside tfmot's pruning wrapper, mixed-precision TFLite export."""

import numpy as np
import pytest

from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.export._export import convert_to_tflite, export_keras, strip_masks
from tf_backdoor_defense.masks._wrapper import wrap_layers


def _masked():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6, 6, 1)),
                             keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                             keras.layers.Flatten(), keras.layers.Dense(2, name="fc")])
    return wrap_layers(base, "conv", masks={"conv": [1, 0, 1, 0]})


def _in_tfmot(model):
    tfmot = pytest.importorskip("tensorflow_model_optimization")
    return keras.models.clone_model(
        model, clone_function=lambda layer: tfmot.sparsity.keras.prune_low_magnitude(layer)
        if layer.name == "conv" else layer.__class__.from_config(layer.get_config()))


@pytest.mark.parametrize("shrink", [False, True])
def test_strip_masks_refuses_a_mask_inside_tfmot_wrapper(shrink):
    with pytest.raises(InputError, match=r"'conv'.*strip_pruning\(model\) first"):
        strip_masks(_in_tfmot(_masked()), shrink=shrink)


def test_export_keras_refuses_a_mask_inside_tfmot_wrapper_and_writes_nothing(tmp_path):
    with pytest.raises(InputError, match="strip_pruning"):
        export_keras(_in_tfmot(_masked()), tmp_path / "model.h5", shrink=True)
    assert list(tmp_path.iterdir()) == []


def test_strip_masks_works_after_tfmot_strip_pruning():
    tfmot = pytest.importorskip("tensorflow_model_optimization")
    masked = _masked()
    stripped = strip_masks(tfmot.sparsity.keras.strip_pruning(_in_tfmot(masked)))
    assert "PruneByActivation" not in [type(layer).__name__ for layer in stripped.layers]


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_convert_to_tflite_refuses_a_mixed_precision_model(mixed_float16, tmp_path):
    model = keras.Sequential([keras.Input((6, 6, 1)),
                              keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="fc"),
                              keras.layers.Activation("softmax", dtype="float32")])
    masked = wrap_layers(model, "conv", masks={"conv": [1, 0, 1, 0]})
    with pytest.raises(InputError, match="mixed-precision.*float32"):
        convert_to_tflite(masked)


def test_convert_to_tflite_still_converts_a_float32_model():
    content = convert_to_tflite(_masked())
    assert isinstance(content, bytes) and len(content) > 0
    assert np.isfinite(len(content))

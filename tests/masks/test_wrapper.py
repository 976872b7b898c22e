import numpy as np
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense import PruneByActivation, get_mask, set_mask, wrap_layers
from tf_backdoor_defense._keras import keras, tf, tfmot


def _x(n=5, shape=(8, 8, 1)):
    return np.random.default_rng(1).random((n,) + shape, dtype=np.float32)


def test_masked_channels_output_exactly_zero(tiny_model):
    wrapped = wrap_layers(tiny_model, "conv_b", masks={"conv_b": [1, 0, 1, 0, 1, 1]})
    features = keras.Model(wrapped.input, wrapped.get_layer("conv_b").output)(_x()).numpy()
    assert np.all(features[..., [1, 3]] == 0)
    assert np.any(features[..., [0, 2, 4, 5]] != 0)


def test_wrap_layers_copies_and_does_not_mutate(tiny_model):
    before = [w.copy() for w in tiny_model.get_weights()]
    wrapped = wrap_layers(tiny_model, "conv_b")
    np.testing.assert_allclose(wrapped(_x()).numpy(), tiny_model(_x()).numpy(), atol=1e-6)
    wrapped.get_layer("conv_b").layer.kernel.assign_add(tf.ones_like(wrapped.get_layer("conv_b").layer.kernel))
    wrapped.get_layer("conv_b").set_mask([0] * 6)
    for a, b in zip(before, tiny_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not isinstance(tiny_model.get_layer("conv_b"), PruneByActivation)


def test_wrap_layers_default_is_last_conv_and_dense_works(tiny_model):
    assert isinstance(wrap_layers(tiny_model).get_layer("conv_b"), PruneByActivation)
    wrapped = wrap_layers(tiny_model, ["fc"], masks={"fc": [0] * 8})
    assert np.all(keras.Model(wrapped.input, wrapped.get_layer("fc").output)(_x()).numpy() == 0)


@pytest.mark.parametrize("name, message", [("nope", "Unknown layer 'nope'"),
                                           ("pool_a", "cannot be pruned by channel")])
def test_wrap_layers_rejects_bad_layers(tiny_model, name, message):
    with pytest.raises(ValueError, match=message):
        wrap_layers(tiny_model, name)


def test_set_mask_validates_length_and_values(tiny_model):
    wrapped = wrap_layers(tiny_model, "conv_b")
    with pytest.raises(ValueError, match="must have 6 entries"):
        set_mask(wrapped, "conv_b", [1, 0])
    with pytest.raises(ValueError, match="only 0 and 1"):
        set_mask(wrapped, "conv_b", [0.5] * 6)
    set_mask(wrapped, "conv_b", [1, 1, 0, 1, 1, 1])
    assert get_mask(wrapped, "conv_b").tolist() == [1, 1, 0, 1, 1, 1]
    assert wrapped.get_layer("conv_b").pruned_channels.tolist() == [2]


def test_keras3_model_in_keras3_model_out():
    # Issue #15: a Keras 3 model is converted in and back out (full tests: tests/keras3/).
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    model = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2, name="fc")])
    wrapped = wrap_layers(model, "fc", masks={"fc": [0, 1]})
    assert isinstance(wrapped, keras3.Model) and not isinstance(wrapped, keras.Model)
    assert wrapped.get_layer("fc").pruned_channels.tolist() == [0]


@pytest.mark.parametrize("filename", ["m.h5", "m.keras", "saved_model"])
def test_round_trip_keeps_mask_and_predictions(tiny_model, tmp_path, filename):
    wrapped = wrap_layers(tiny_model, "conv_b", masks={"conv_b": [1, 0, 0, 1, 1, 0]})
    path = str(tmp_path / filename)
    wrapped.save(path)
    loaded = keras.models.load_model(path, custom_objects={"PruneByActivation": PruneByActivation})
    assert loaded.get_layer("conv_b").get_mask().tolist() == [1, 0, 0, 1, 1, 0]
    np.testing.assert_array_equal(loaded(_x()).numpy(), wrapped(_x()).numpy())


def test_config_round_trip_preserves_wrapped_layer_config():
    layer = PruneByActivation(keras.layers.Conv2D(3, 2, activation="relu", name="c"))
    config = layer.get_config()
    clone = PruneByActivation.from_config(config)
    assert clone.get_config() == config
    assert clone.layer.get_config() == layer.layer.get_config()


def test_conv1d_conv3d_and_channels_first():
    for conv, shape in [(keras.layers.Conv1D(4, 2), (6, 2)), (keras.layers.Conv3D(4, 2), (4, 4, 4, 1))]:
        layer = PruneByActivation(conv)
        out = layer(np.ones((2,) + shape, np.float32))
        layer.set_mask([0, 1, 1, 0])
        out = layer(np.ones((2,) + shape, np.float32)).numpy()
        assert np.all(out[..., 0] == 0) and np.all(out[..., 3] == 0)
    first = PruneByActivation(keras.layers.Conv2D(3, 1, data_format="channels_first",
                                                  kernel_initializer="ones"))
    first(np.ones((1, 2, 4, 4), np.float32))
    first.set_mask([1, 0, 1])
    out = first(np.ones((1, 2, 4, 4), np.float32)).numpy()
    assert np.all(out[:, 1] == 0) and np.all(out[:, 0] == 2)


def test_tfmot_prune_low_magnitude_composes_and_strip_keeps_mask(tiny_model):
    wrapped = wrap_layers(tiny_model, "conv_b", masks={"conv_b": [0, 1, 1, 1, 1, 1]})
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(wrapped, pruning_schedule=schedule)
    pruned.compile("sgd", "sparse_categorical_crossentropy")
    x = _x(16)
    pruned.fit(x, np.zeros(16), epochs=1, batch_size=8, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    layer = stripped.get_layer("conv_b")
    assert isinstance(layer, PruneByActivation)
    assert layer.get_mask().tolist() == [0, 1, 1, 1, 1, 1]
    kernel = layer.layer.kernel.numpy()
    assert abs(np.mean(kernel == 0) - 0.5) < 0.05  # unstructured sparsity from tfmot
    features = layer(np.random.default_rng(0).random((2, 3, 3, 4), dtype=np.float32)).numpy()
    assert np.all(features[..., 0] == 0)
    np.testing.assert_allclose(stripped(x).numpy(), pruned(x).numpy(), atol=1e-6)


def test_zero_pruned_weights_zeroes_kernel_and_bias():
    layer = PruneByActivation(keras.layers.Dense(3, bias_initializer="ones"))
    layer(np.ones((1, 2), np.float32))
    layer.set_mask([1, 0, 1])
    layer.zero_pruned_weights()
    assert np.all(layer.layer.kernel.numpy()[:, 1] == 0) and layer.layer.bias.numpy()[1] == 0
    assert layer.layer.bias.numpy()[0] == 1


# -- layers=, unwrap, apply_masks, get/set_mask for several layers ---------------------------
from tf_backdoor_defense.masks._wrapper import apply_masks, layer_names, unwrap  # noqa: E402


def test_layer_names_is_the_one_reading_of_layers(tiny_model):
    assert layer_names(tiny_model, None) == ["conv_b"]           # the last conv layer
    assert layer_names(tiny_model, "fc") == ["fc"]
    assert layer_names(tiny_model, ("fc", "conv_a")) == ["fc", "conv_a"]
    assert layer_names(tiny_model, None, default=lambda m: ["out"]) == ["out"]
    checked = []
    layer_names(tiny_model, ["fc", "out"], check=lambda m, name: checked.append(name))
    assert checked == ["fc", "out"]


@pytest.mark.parametrize("layers, error, match", [
    ([], ValueError, "at least one layer"),
    (["fc", "fc"], ValueError, "twice"),
    ("nope", ValueError, "Unknown layer 'nope'"),
    (3, TypeError, r"layer name or a list of names\. Got 3"),
    (["fc", 3], TypeError, r"must hold layer names \(strings\)\. Got 3"),
])
def test_layer_names_refuses_bad_layers(tiny_model, layers, error, match):
    with pytest.raises(error, match=match):
        layer_names(tiny_model, layers)


def test_layer_names_with_an_empty_default_asks_for_layers(tiny_model):
    with pytest.raises(ValueError, match="pass `layers=`"):
        layer_names(tiny_model, None, default=lambda m: [])


def test_unwrap_gives_the_inner_layer(tiny_model):
    wrapped = wrap_layers(tiny_model, "conv_b")
    inner = unwrap(wrapped.get_layer("conv_b"))
    assert isinstance(inner, keras.layers.Conv2D) and not isinstance(inner, PruneByActivation)
    assert unwrap(tiny_model.get_layer("fc")) is tiny_model.get_layer("fc")


def test_apply_masks_keeps_channels_already_pruned_and_copies(tiny_model):
    wrapped = wrap_layers(tiny_model, "conv_b", masks={"conv_b": [0, 1, 1, 1, 1, 1]})
    copy, masks = apply_masks(wrapped, {"conv_b": [1, 1, 0, 1, 1, 1], "fc": [1] * 7 + [0]})
    assert masks["conv_b"].tolist() == [0, 1, 0, 1, 1, 1]
    assert masks["fc"].dtype == np.float32
    assert get_mask(copy, ["conv_b", "fc"])["fc"].tolist() == [1] * 7 + [0]
    assert get_mask(wrapped, "conv_b").tolist() == [0, 1, 1, 1, 1, 1]   # unchanged
    assert not isinstance(tiny_model.get_layer("fc"), PruneByActivation)


def test_get_and_set_mask_take_a_list_of_layers(tiny_model):
    wrapped = wrap_layers(tiny_model, ["conv_b", "fc"])
    set_mask(wrapped, ["conv_b", "fc"], {"conv_b": [1, 0, 1, 1, 1, 1], "fc": [0] + [1] * 7})
    masks = get_mask(wrapped, ["fc", "conv_b"])
    assert list(masks) == ["fc", "conv_b"]
    assert masks["conv_b"].tolist() == [1, 0, 1, 1, 1, 1] and masks["fc"][0] == 0
    with pytest.raises(ValueError, match="one mask for each"):
        set_mask(wrapped, ["conv_b", "fc"], [1, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="not wrapped"):
        get_mask(wrapped, ["conv_b", "out"])


def test_wrapping_the_output_layer_warns():
    import warnings

    from tf_backdoor_defense.masks._wrapper import OutputLayerPruningWarning

    model = tiny_conv_model()
    with pytest.warns(OutputLayerPruningWarning, match="'out' is an output layer"):
        wrap_layers(model, "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutputLayerPruningWarning)
        wrap_layers(model, "fc")  # a hidden layer: no warning


class _Scale(keras.layers.Layer):
    """A custom layer whose config lacks its name: what tf-keras makes from ``__init__`` for a
    class defined in a script without ``get_config``."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs):
        return inputs * self.factor

    def get_config(self):
        return {"factor": self.factor}


def test_a_custom_layer_whose_config_lacks_its_name_is_copied_under_its_name():
    from tf_backdoor_defense.masks._wrapper import layer_config

    model = keras.Sequential([keras.Input((4, 4, 1)), _Scale(0.5, name="scale"),
                              keras.layers.Conv2D(3, 3, name="conv"),
                              keras.layers.Flatten(name="flat"), keras.layers.Dense(2, name="out")])
    assert layer_config(model.get_layer("scale"))["name"] == "scale"
    wrapped = wrap_layers(model, "conv")  # copied weights by name: a new name failed (KeyError)
    assert [layer.name for layer in wrapped.layers] == ["scale", "conv", "flat", "out"]
    x = np.random.default_rng(0).random((2, 4, 4, 1), dtype=np.float32)
    np.testing.assert_allclose(wrapped(x).numpy(), model(x).numpy(), atol=1e-6)

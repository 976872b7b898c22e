"""Keras 3 models as outside scripts build them convert to tf-keras and back, computing the same.

``keras.Sequential([RandomFlip(...), RandomRotation(...)])`` called as the first layer of a
Functional model is how Keras's own image-classification examples add augmentation. Such a
model converts: its nested models are checked layer by layer and flattened, the augmentation
layers convert (they act only while training), and the converted model computes what the
original computes at inference. So do layers whose settings are named differently in the two
Keras (``LeakyReLU``'s slope, the ``silu`` activation) and ``keras.applications`` nets; an
activation the two compute differently is refused.
"""

import numpy as np
import pytest

from tf_backdoor_defense.io import _loading

AUGMENTATION = ("RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom",
                "RandomContrast", "RandomBrightness")


def _keras3():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    return keras3


def _convert():
    from tf_backdoor_defense.keras3 import _convert

    return _convert


def _same_both_ways(model, x, tolerance=1e-5):
    """``model`` converted to tf-keras, and that back to Keras 3, computes what it computes."""
    convert = _convert()
    expected = np.asarray(model(x, training=False))
    converted = convert.to_tf_keras(model)
    assert np.abs(converted(x, training=False).numpy() - expected).max() <= tolerance
    back = convert.to_keras3(converted)
    assert np.abs(np.asarray(back(x, training=False)) - expected).max() <= tolerance


def _tutorial_model(keras3, seed=0):
    """Augmentation nested first, a normalization adapted to data, a nested residual block."""
    layers = keras3.layers
    keras3.utils.set_random_seed(seed)
    augmentation = keras3.Sequential(
        [layers.RandomFlip("horizontal"), layers.RandomRotation(0.1),
         layers.RandomTranslation(0.1, 0.1), layers.RandomZoom(0.1),
         layers.RandomContrast(0.1), layers.RandomBrightness(0.1, value_range=(0, 255))],
        name="data_augmentation")
    normalization = layers.Normalization(name="normalization")
    normalization.adapt(_images(seed=1))
    inputs = keras3.Input((12, 12, 1))
    x = normalization(augmentation(inputs))
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    block = keras3.Sequential([keras3.Input((10, 10, 4)),
                               layers.Conv2D(4, 3, padding="same", name="block_conv"),
                               layers.BatchNormalization(name="block_bn")], name="block")
    x = layers.Add(name="add")([x, block(x)])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(3, name="logits")(x)
    model = keras3.Model(inputs, outputs, name="tutorial")
    bn = model.get_layer("block").get_layer("block_bn")
    rng = np.random.default_rng(seed)
    bn.set_weights([w + rng.random(w.shape).astype("float32") for w in bn.get_weights()])
    return model


def _images(n=16, seed=0):
    return (np.random.default_rng(seed).random((n, 12, 12, 1)) * 255.0).astype("float32")


def test_a_tutorial_model_converts_flat_and_computes_the_same():
    keras3 = _keras3()
    convert = _convert()
    model = _tutorial_model(keras3)
    x = _images()
    converted = convert.to_tf_keras(model)
    names = [layer.name for layer in converted.layers]
    assert "data_augmentation" not in names and "block" not in names
    assert {"random_flip", "normalization", "block_conv", "block_bn", "logits"} <= set(names)
    expected = np.asarray(model(x, training=False))
    assert np.abs(converted(x, training=False).numpy() - expected).max() <= 1e-4
    back = convert.to_keras3(converted)
    assert isinstance(back, keras3.Model)
    assert np.abs(np.asarray(back(x, training=False)) - expected).max() <= 1e-4
    # the names the scan reports are the flat model's
    listed = convert.scan_keras3_config(model.get_config())
    assert listed == names


def test_a_sequential_holding_a_sequential_converts():
    keras3 = _keras3()
    convert = _convert()
    inner = keras3.Sequential([keras3.layers.RandomFlip("horizontal"),
                               keras3.layers.Rescaling(1 / 255.0)], name="preprocess")
    model = keras3.Sequential([keras3.Input((12, 12, 1)), inner, keras3.layers.Flatten(),
                               keras3.layers.Dense(3, name="fc")])
    x = _images()
    converted = convert.to_tf_keras(model)
    names = [layer.name for layer in converted.layers]
    assert names[1:] == [inner.layers[0].name, inner.layers[1].name, model.layers[1].name, "fc"]
    assert np.abs(converted(x, training=False).numpy()
                  - np.asarray(model(x, training=False))).max() <= 1e-5


def test_weights_go_back_into_a_nested_model_by_name():
    keras3 = _keras3()
    convert = _convert()
    model = _tutorial_model(keras3)
    flat = convert.to_tf_keras(model)
    new_kernel = np.full_like(flat.get_layer("block_conv").get_weights()[0], 0.25)
    conv = flat.get_layer("block_conv")
    conv.set_weights([new_kernel, conv.get_weights()[1]])
    convert.copy_weights(flat, model)
    kernel = np.asarray(model.get_layer("block").get_layer("block_conv").kernel)
    assert np.array_equal(kernel, new_kernel)


@pytest.mark.parametrize("name", AUGMENTATION + ("Resizing", "CenterCrop", "Identity",
                                                  "GroupNormalization", "UnitNormalization",
                                                  "ActivityRegularization", "AlphaDropout"))
def test_each_preprocessing_layer_converts_to_the_same_inference(name):
    keras3 = _keras3()
    convert = _convert()
    layers = keras3.layers
    made = {"RandomFlip": lambda: layers.RandomFlip("horizontal_and_vertical"),
            "RandomRotation": lambda: layers.RandomRotation(0.2, fill_mode="constant"),
            "RandomTranslation": lambda: layers.RandomTranslation(0.1, 0.2),
            "RandomZoom": lambda: layers.RandomZoom(0.2),
            "RandomContrast": lambda: layers.RandomContrast(0.3),
            "RandomBrightness": lambda: layers.RandomBrightness(0.2, value_range=(0, 255)),
            "Resizing": lambda: layers.Resizing(8, 8),
            "CenterCrop": lambda: layers.CenterCrop(10, 10),
            "Identity": layers.Identity,
            "GroupNormalization": lambda: layers.GroupNormalization(groups=2),
            "UnitNormalization": layers.UnitNormalization,
            "ActivityRegularization": lambda: layers.ActivityRegularization(l1=0.01),
            "AlphaDropout": lambda: layers.AlphaDropout(0.1)}[name]
    layer = made()
    model = keras3.Sequential([keras3.Input((12, 12, 1)), layers.Conv2D(4, 3, name="conv"),
                               layer, layers.Flatten(), layers.Dense(2, name="fc")])
    for weight in layer.weights:  # not the initial values, which a lost weight would still have
        weight.assign(np.asarray(weight) + 0.5)
    x = _images()
    converted = convert.to_tf_keras(model)
    assert type(converted.layers[1]).__name__ == name
    assert np.abs(converted(x, training=False).numpy()
                  - np.asarray(model(x, training=False))).max() <= 1e-4
    back = convert.to_keras3(converted)
    assert np.abs(np.asarray(back(x, training=False))
                  - np.asarray(model(x, training=False))).max() <= 1e-4


def test_random_crop_is_refused_by_name():
    # Keras 3 returns the whole image at inference, tf-keras a crop: they do not compute the same.
    keras3 = _keras3()
    convert = _convert()
    model = keras3.Sequential([keras3.Input((12, 12, 1)),
                               keras3.layers.RandomCrop(8, 8, name="crop"),
                               keras3.layers.Flatten(), keras3.layers.Dense(2)])
    with pytest.raises(convert.Keras3ConversionError) as caught:
        convert.to_tf_keras(model)
    assert caught.value.layer == "crop" and "not a supported built-in" in str(caught.value)


def test_code_inside_a_nested_model_is_refused_naming_its_layer(tmp_path):
    keras3 = _keras3()
    inner = keras3.Sequential([keras3.layers.Lambda(lambda t: t * 2, name="code")],
                              name="inner")
    inputs = keras3.Input((4,))
    model = keras3.Model(inputs, keras3.layers.Dense(2)(inner(inputs)))
    path = tmp_path / "nested_code.keras"
    model.save(path)
    with pytest.raises(_loading.UnsafeModelError) as caught:
        _loading.load_model(path)
    assert "'code'" in str(caught.value) and "Lambda" in str(caught.value)


def test_nested_models_with_two_outputs_or_a_repeated_name_are_refused():
    keras3 = _keras3()
    convert = _convert()
    layers = keras3.layers
    inner_in = keras3.Input((4,))
    two = keras3.Model(inner_in, [layers.Dense(2, name="a")(inner_in),
                                  layers.Dense(2, name="b")(inner_in)], name="two_heads")
    inputs = keras3.Input((4,))
    first, second = two(inputs)
    model = keras3.Model(inputs, layers.Add()([first, second]))
    with pytest.raises(convert.Keras3ConversionError) as caught:
        convert.to_tf_keras(model)
    assert caught.value.layer == "two_heads" and "several inputs or outputs" in str(caught.value)

    inner = keras3.Sequential([keras3.Input((4,)), layers.Dense(4, name="fc")], name="inner")
    outer = keras3.Sequential([keras3.Input((4,)), inner, layers.Dense(2, name="fc_")])
    config = outer.get_config()
    config["layers"][-1]["config"]["name"] = "fc"  # the outer layer now has the inner one's name
    with pytest.raises(convert.Keras3ConversionError) as caught:
        convert.scan_keras3_config(config)
    assert "['fc']" in str(caught.value)


def test_a_nested_keras_file_loads_scanned_and_is_scanned_for_backdoors(tmp_path):
    keras3 = _keras3()
    from tf_backdoor_defense.scan import scan_model

    model = _tutorial_model(keras3)
    path = tmp_path / "tutorial.keras"
    model.save(path)
    loaded = _loading.load_model(path)
    x = _images(30)
    assert isinstance(loaded, keras3.Model)
    assert np.abs(np.asarray(loaded(x, training=False))
                  - np.asarray(model(x, training=False))).max() <= 1e-5
    y = np.arange(30) % 3
    result = scan_model(loaded, (x, y), steps=4)
    assert len(result.table) == 3 and result.masks.shape[1:] == (12, 12, 1)


# -- layers whose settings differ between the two Keras ------------------------------------------
@pytest.mark.parametrize("name", ["LeakyReLU", "SeparableConv2D", "SpatialDropout2D",
                                  "DepthwiseConv2D", "silu", "add-constant"])
def test_layers_whose_settings_differ_convert_both_ways(name):
    keras3 = _keras3()
    layers = keras3.layers
    inputs = keras3.Input((6, 6, 2))
    made = {"LeakyReLU": lambda t: layers.LeakyReLU(negative_slope=0.1)(t),  # tf-keras: alpha
            "SeparableConv2D": lambda t: layers.SeparableConv2D(3, 3, depth_multiplier=2)(t),
            "SpatialDropout2D": lambda t: layers.SpatialDropout2D(0.2)(t),
            "DepthwiseConv2D": lambda t: layers.DepthwiseConv2D(3)(t),
            "silu": lambda t: layers.Conv2D(3, 1, activation="silu")(t),  # tf-keras: swish
            "add-constant": lambda t: layers.ReLU(6.0)(t + 3.0)}[name]
    model = keras3.Model(inputs, made(inputs))
    for weight in model.weights:
        weight.assign(np.asarray(weight) + 0.25)
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32") * 3
    _same_both_ways(model, x)


def test_an_activation_the_two_keras_compute_differently_is_refused():
    # tf-keras's hard_sigmoid is 0.2 x + 0.5, Keras 3's x / 6 + 0.5: converting would change the net
    keras3 = _keras3()
    convert = _convert()
    model = keras3.Sequential([keras3.Input((4,)),
                               keras3.layers.Dense(2, activation="hard_sigmoid", name="gate")])
    with pytest.raises(convert.Keras3ConversionError) as caught:
        convert.to_tf_keras(model)
    assert caught.value.layer == "gate" and "compute differently" in str(caught.value)


@pytest.mark.parametrize("application", ["MobileNetV2", "EfficientNetB0"])
def test_keras_applications_convert_to_the_same_outputs(application):
    keras3 = _keras3()
    options = {"alpha": 0.35} if application == "MobileNetV2" else {}
    model = getattr(keras3.applications, application)(weights=None, input_shape=(32, 32, 3),
                                                      classes=10, **options)
    x = (np.random.default_rng(0).random((2, 32, 32, 3)) * 255).astype("float32")
    _same_both_ways(model, x)


def test_a_random_layer_called_directly_in_a_functional_model_converts():
    # Keras 3 records such a layer's default training=True on its node; a model's own training
    # argument overrides it, so the node converts without it.
    keras3 = _keras3()
    convert = _convert()
    inputs = keras3.Input((12, 12, 1))
    x = keras3.layers.RandomRotation(0.2, name="rotate")(inputs)
    model = keras3.Model(inputs, keras3.layers.Dense(2, name="fc")(keras3.layers.Flatten()(x)))
    assert model.get_config()["layers"][1]["inbound_nodes"][0]["kwargs"] == {"training": True}
    x = _images()
    back = convert.to_keras3(convert.to_tf_keras(model))
    expected = np.asarray(model(x, training=False))
    assert np.abs(np.asarray(back(x, training=False)) - expected).max() <= 1e-5
    assert not np.allclose(np.asarray(back(x, training=True)), expected)  # still random in training


def test_a_nested_tf_keras_model_built_with_input_shape_converts_to_keras3():
    # tf-keras layers given input_shape= keep a batch_input_shape the converted Input sets
    keras3 = _keras3()
    convert = _convert()
    from tf_backdoor_defense._keras import keras as tf_keras

    inner_inputs = tf_keras.Input((4,))
    inner = tf_keras.Model(inner_inputs, tf_keras.layers.Dense(3, name="d_in")(inner_inputs),
                           name="inner")
    block = tf_keras.Sequential([tf_keras.layers.Dense(3, name="s1", input_shape=(3,))],
                                name="block")
    inputs = tf_keras.Input((4,))
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="d_out")(block(inner(inputs))))
    x = np.random.default_rng(0).random((5, 4)).astype("float32")
    converted = convert.to_keras3(model)
    assert isinstance(converted, keras3.Model)
    assert [layer.name for layer in converted.layers][1:] == ["d_in", "s1", "d_out"]
    assert np.abs(np.asarray(converted(x)) - model(x).numpy()).max() <= 1e-6


def test_pixels_scaled_by_arithmetic_instead_of_a_layer_convert_both_ways():
    # inputs / 255.0 - 0.5 and keras.ops.relu are operation nodes in Keras 3 and TFOpLambda
    # layers (with name=None recorded) in tf-keras
    keras3 = _keras3()
    convert = _convert()
    from tf_backdoor_defense._keras import keras as tf_keras

    inputs = keras3.Input((4,))
    hidden = keras3.ops.relu(inputs / 255.0 - 0.5)
    model = keras3.Model(inputs, keras3.layers.Dense(2, name="fc")(hidden * 3.0 + 1.0))
    x = (np.random.default_rng(0).random((5, 4)) * 255).astype("float32")
    _same_both_ways(model, x)
    plain_inputs = tf_keras.Input((4,))
    plain = tf_keras.Model(plain_inputs, tf_keras.layers.Dense(2)(plain_inputs / 255.0 - 0.5))
    assert np.abs(np.asarray(convert.to_keras3(plain)(x)) - plain(x).numpy()).max() <= 1e-6


def test_a_softmax_applied_as_an_operation_converts_both_ways():
    # keras.ops.softmax / keras.activations.softmax on the logits is an operation node in
    # Keras 3 and tf.nn.softmax a TFOpLambda layer (axis left out) in tf-keras
    keras3 = _keras3()
    convert = _convert()
    from tf_backdoor_defense._keras import keras as tf_keras, tf
    from tf_backdoor_defense.graph._outputs import output_activation

    inputs = keras3.Input((4,))
    model = keras3.Model(inputs, keras3.ops.softmax(keras3.layers.Dense(3, name="fc")(inputs)))
    x = np.random.default_rng(0).random((5, 4)).astype("float32")
    _same_both_ways(model, x)
    assert output_activation(convert.to_tf_keras(model)) == "softmax"
    plain_inputs = tf_keras.Input((4,))
    plain = tf_keras.Model(plain_inputs, tf.nn.softmax(tf_keras.layers.Dense(3)(plain_inputs)))
    assert np.abs(np.asarray(convert.to_keras3(plain)(x)) - plain(x).numpy()).max() <= 1e-6

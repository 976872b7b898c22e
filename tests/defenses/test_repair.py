"""The repaired N+1 network: shared class where the models agree, class N where not."""

import numpy as np
import pytest

from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.export._export import convert_to_tflite, export_keras, export_saved_model
from tf_backdoor_defense.masks._wrapper import wrap_layers
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.defenses._repair import evaluate_repaired, repaired_model, suspect_class

from conftest import tiny_conv_model

TOL = 1e-5


@pytest.fixture
def pair():
    original = tiny_conv_model(channels=6, classes=3)
    pruned = wrap_layers(original, "conv_b", masks={"conv_b": [1, 0, 0, 1, 0, 0]})
    x = np.random.default_rng(0).random((64, 8, 8, 1), dtype=np.float32)
    return original, pruned, x


def expected_output(original, pruned, x):
    a, b = original(x).numpy(), pruned(x).numpy()
    agree = np.argmax(a, -1) == np.argmax(b, -1)
    out = np.zeros((len(x), a.shape[1] + 1), np.float32)
    out[agree, :-1] = a[agree]
    out[~agree, -1] = 1.0
    return out, agree


def test_repaired_outputs_shared_class_or_suspect(pair):
    original, pruned, x = pair
    repaired = repaired_model(original, pruned)
    expected, agree = expected_output(original, pruned, x)
    assert 0 < agree.sum() < len(x)  # both cases occur
    out = repaired(x).numpy()
    assert out.shape == (len(x), 4)
    assert np.max(np.abs(out - expected)) <= TOL
    labels = np.argmax(out, -1)
    np.testing.assert_array_equal(labels[agree], np.argmax(original(x).numpy(), -1)[agree])
    assert np.all(labels[~agree] == 3)
    assert suspect_class(repaired) == 3


def test_repaired_model_does_not_change_inputs(pair):
    original, pruned, x = pair
    before = original(x).numpy(), pruned(x).numpy()
    repaired_model(original, pruned)
    np.testing.assert_array_equal(original(x).numpy(), before[0])
    np.testing.assert_array_equal(pruned(x).numpy(), before[1])


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_repaired_model_saves_without_custom_objects(pair, tmp_path, suffix):
    original, pruned, x = pair
    repaired = repaired_model(original, pruned)
    path = export_keras(repaired, tmp_path / f"goodnet{suffix}")
    loaded = keras.models.load_model(path)
    assert np.max(np.abs(loaded(x).numpy() - repaired(x).numpy())) <= TOL


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_repaired_model_exports_to_saved_model_and_tflite(pair, tmp_path):
    original, pruned, x = pair
    repaired = repaired_model(original, pruned)
    folder = export_saved_model(repaired, tmp_path / "goodnet", version=1)
    serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
    served = serve(tf.constant(x))["repaired_output"].numpy()
    assert np.max(np.abs(served - repaired(x).numpy())) <= TOL
    runner = tf.lite.Interpreter(model_content=convert_to_tflite(folder)).get_signature_runner()
    (name,) = runner.get_input_details()
    lite = runner(**{name: x[:8]})["repaired_output"]
    np.testing.assert_array_equal(np.argmax(lite, -1), np.argmax(served[:8], -1))


def test_evaluate_repaired_counts_suspect_as_defended(pair):
    original, pruned, x = pair
    repaired = repaired_model(original, pruned)
    expected, agree = expected_output(original, pruned, x)
    predicted = np.argmax(expected, -1)
    y_clean = np.argmax(original(x).numpy(), -1)  # original is right on every clean input
    target = 1
    scores = evaluate_repaired(repaired, (x, y_clean), (x, np.full(len(x), target)))
    assert scores.clean_accuracy == pytest.approx(np.mean(predicted == y_clean))
    assert scores.attack_success_rate == pytest.approx(np.mean(predicted == target))
    assert scores.clean_flagged == pytest.approx(np.mean(~agree))
    assert scores.poisoned_flagged == pytest.approx(np.mean(~agree))
    assert scores.clean_accuracy == pytest.approx(clean_accuracy(repaired, (x, y_clean)))
    assert scores.attack_success_rate == pytest.approx(
        attack_success_rate(repaired, (x, np.full(len(x), target)), abstain_class=3))
    assert scores.as_dict()["defender_utility"] == pytest.approx(
        scores.clean_accuracy - scores.attack_success_rate)
    untargeted = evaluate_repaired(repaired, (x, y_clean), (x, y_clean), target="untargeted")
    assert untargeted.attack_success_rate == 0.0  # class N never counts as a success


def test_repaired_model_rejects_mismatched_models(pair):
    original, _, _ = pair
    other = tiny_conv_model(channels=6, classes=4)
    with pytest.raises(ValueError, match="3 outputs"):
        repaired_model(original, other)
    other = tiny_conv_model(channels=6, classes=3, input_shape=(9, 9, 1))
    with pytest.raises(ValueError, match="same input"):
        repaired_model(original, other)
    with pytest.raises(TypeError, match="tf_keras.Model"):
        repaired_model(original, "pruned")


@pytest.mark.shared_data
def test_lab_goodnet_flags_triggered_faces(lab3_dir):
    from PIL import Image

    net = keras.models.load_model(lab3_dir / "bd_net.h5", compile=False)
    files = sorted((lab3_dir / "faces").glob("*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((47, 55)), np.float32)
                  for f in files])
    labels = np.array([int(f.stem.split("label=")[1]) for f in files])
    means = np.asarray(keras.Model(net.inputs, net.get_layer("conv_3").output)(x)).mean((0, 1, 2))
    mask = np.ones(60, np.float32)
    mask[np.argsort(means)[:52]] = 0
    pruned = wrap_layers(net, "conv_3", masks={"conv_3": mask})
    repaired = repaired_model(net, pruned)
    expected, _ = expected_output(net, pruned, x)
    assert np.max(np.abs(repaired(x).numpy() - expected)) <= TOL
    assert suspect_class(repaired) == 1283
    clean = np.array([f.name.startswith("cl_") for f in files])
    if clean.any() and (~clean).any():
        scores = evaluate_repaired(repaired, (x[clean], labels[clean]), (x[~clean], labels[~clean]))
        assert 0.0 <= scores.attack_success_rate <= 1.0

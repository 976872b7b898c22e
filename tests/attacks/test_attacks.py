"""BadNet triggers, data poisoning and the pruning-aware attack."""

import dataclasses

import numpy as np
import pytest

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.attacks import (
    BlendTrigger,
    ImageTrigger,
    PatchTrigger,
    PixelPatternTrigger,
    SignalTrigger,
    all_to_all_shift,
    checkerboard_patch,
    pixel_pattern,
    poison_dataset,
    poisoned_evaluation_set,
    single_pixel,
)
from tf_backdoor_defense.metrics import attack_success_rate


def _images(n=6, size=8, channels=1, seed=0):
    return np.random.default_rng(seed).random((n, size, size, channels)).astype(np.float32)


# -- triggers ------------------------------------------------------------------
def test_patch_at_minus_one_is_flush_with_bottom_right_corner():
    x = np.zeros((2, 6, 5, 1))
    out = PatchTrigger(np.full((2, 3), 7.0))(x)
    assert np.all(out[:, 4:, 2:, 0] == 7.0)
    assert out.sum() == 2 * 6 * 7.0


def test_patch_at_positive_position_starts_at_that_row_and_col():
    out = PatchTrigger(np.ones((2, 2)), position=(1, 3))(np.zeros((1, 6, 6, 1)))
    assert np.argwhere(out[0, :, :, 0]).tolist() == [[1, 3], [1, 4], [2, 3], [2, 4]]


def test_trigger_never_modifies_its_input():
    x = _images()
    before = x.copy()
    for trigger in [checkerboard_patch(3), pixel_pattern(), BlendTrigger(np.ones((8, 8)), 0.5)]:
        out = trigger.apply(x)
        assert out is not x
        assert not np.array_equal(out, x)
    np.testing.assert_array_equal(x, before)


def test_patch_that_does_not_fit_raises_value_error():
    with pytest.raises(ValueError, match="does not fit"):
        PatchTrigger(np.ones((3, 3)), position=(6, 0))(np.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="does not fit"):
        checkerboard_patch(size=9)(np.zeros((1, 8, 8, 1)))


def test_patch_channels_must_match_images():
    with pytest.raises(ValueError, match="channels"):
        PatchTrigger(np.ones((2, 2, 2)))(np.zeros((1, 4, 4, 3)))
    rgb = PatchTrigger(np.ones((2, 2, 1)) * 5)(np.zeros((1, 4, 4, 3)))
    assert np.all(rgb[0, 2:, 2:, :] == 5)


def test_images_must_be_a_4d_batch():
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        single_pixel()(np.zeros((8, 8)))


def test_pixel_pattern_uses_negative_coordinates_like_python_indexing():
    out = PixelPatternTrigger([(0, 1), (-1, -2)], value=3.0)(np.zeros((1, 4, 5, 1)))
    assert np.argwhere(out[0, :, :, 0]).tolist() == [[0, 1], [3, 3]]


def test_pixel_outside_the_image_raises():
    with pytest.raises(ValueError, match="outside"):
        PixelPatternTrigger([(10, 0)])(np.zeros((1, 4, 4, 1)))


def test_pixel_value_per_channel():
    out = single_pixel(value=[1.0, 2.0, 3.0], position=(-1, -1))(np.zeros((1, 3, 3, 3)))
    assert out[0, 2, 2].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="channels"):
        single_pixel(value=[1.0, 2.0])(np.zeros((1, 3, 3, 3)))


def test_pixel_pattern_has_six_distinct_pixels_near_bottom_right():
    out = pixel_pattern(value=1.0)(np.zeros((1, 28, 28, 1)))[0, :, :, 0]
    rows, cols = np.nonzero(out)
    assert rows.size == 6
    assert rows.min() >= 24 and cols.min() >= 24


def test_checkerboard_alternates_value_and_zero():
    out = checkerboard_patch(size=4, value=255, position=(0, 0))(np.full((1, 6, 6, 1), 9, np.uint8))
    board = out[0, :4, :4, 0]
    assert board[0, 0] == 255 and board[0, 1] == 0 and board[1, 1] == 255
    assert out.dtype == np.uint8 and out[0, 5, 5, 0] == 9


def test_uint8_data_is_rounded_and_clipped():
    x = np.full((1, 2, 2, 1), 100, np.uint8)
    out = BlendTrigger(np.full((2, 2), 400.0), alpha=1.0)(x)
    assert out.dtype == np.uint8 and np.all(out == 255)
    half = BlendTrigger(np.full((2, 2), 101.0), alpha=0.5)(x)
    assert np.all(half == 100)  # 100.5 rounds to even


def test_blend_computes_convex_combination_and_checks_size():
    x = _images(2, 4)
    pattern = np.random.default_rng(1).random((4, 4))
    out = BlendTrigger(pattern, alpha=0.2)(x)
    np.testing.assert_allclose(out, x * 0.8 + pattern[None, :, :, None] * 0.2, rtol=1e-6)
    with pytest.raises(ValueError, match="must be equal"):
        BlendTrigger(np.ones((5, 5)))(x)
    with pytest.raises(ValueError, match="alpha"):
        BlendTrigger(pattern, alpha=1.5)


def test_signal_adds_one_sinusoid_per_column_and_clips_to_the_range():
    x = _images(3, 8, channels=2)
    out = SignalTrigger(delta=0.3, frequency=2, clip=None)(x)
    wave = 0.3 * np.sin(2 * np.pi * np.arange(8) * 2 / 8)
    np.testing.assert_allclose(out - x, np.broadcast_to(wave[None, None, :, None], x.shape),
                               atol=1e-6)
    clipped = SignalTrigger(delta=0.3, frequency=2)(x)
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0
    np.testing.assert_allclose(clipped, np.clip(out, 0.0, 1.0), atol=1e-6)
    raw = SignalTrigger(delta=20, frequency=1, clip=(0, 255))(np.full((1, 4, 6, 1), 250, np.uint8))
    assert raw.dtype == np.uint8 and raw.max() == 255 and raw.min() < 250


@pytest.mark.parametrize("kwargs, error, match", [
    ({"delta": 0}, ValueError, "'delta' parameter must be a finite number > 0"),
    ({"delta": float("nan")}, ValueError, "'delta'"),
    ({"delta": True}, TypeError, "'delta'"), ({"delta": "0.2"}, TypeError, "'delta'"),
    ({"frequency": 0}, ValueError, "frequency"), ({"clip": (1.0, 0.0)}, ValueError, "clip")])
def test_signal_refuses_bad_parameters_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        SignalTrigger(**kwargs)


def test_image_trigger_alpha_composites_in_the_data_scale():
    rgba = np.zeros((2, 2, 4))
    rgba[..., :3] = 1.0
    rgba[..., 3] = [[1.0, 0.5], [0.0, 0.25]]
    x = np.zeros((1, 4, 4, 3))
    out = ImageTrigger(rgba, position=(-1, -1), value=255)(x)
    np.testing.assert_allclose(out[0, 2:, 2:, 0], [[255.0, 127.5], [0.0, 63.75]])
    assert np.all(out[0, :2] == 0)
    unit = ImageTrigger(rgba, position=(-1, -1), value=1.0)(x)
    np.testing.assert_allclose(unit[0, 2:, 2:, 0], [[1.0, 0.5], [0.0, 0.25]])


def test_image_trigger_on_gray_data_uses_luma_and_resizes():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 1] = 255   # pure green
    rgba[..., 3] = 255
    trigger = ImageTrigger(rgba, size=(2, 3), value=1.0)
    out = trigger(np.zeros((1, 5, 5, 1)))
    assert trigger.alpha.shape[:2] == (2, 3)
    np.testing.assert_allclose(out[0, :2, :3, 0], 0.587, atol=1e-6)
    assert out[0, 2:, :, 0].sum() == 0


def test_image_trigger_rejects_image_without_alpha():
    with pytest.raises(ValueError, match="RGBA"):
        ImageTrigger(np.zeros((2, 2, 3)))


@pytest.mark.shared_data
def test_lab_sunglasses_trigger_from_file_stamps_a_lab_face(lab3_dir):
    from PIL import Image

    trigger = ImageTrigger.from_file(lab3_dir / "sun_glass_trigger.png", position=(14, 0), value=255)
    face = np.asarray(Image.open(sorted((lab3_dir / "faces").glob("cl_*.png"))[0]), np.float32)
    out = trigger(face[None])
    assert out.shape == (1, 55, 47, 3)
    changed = np.any(out[0] != face, axis=-1)
    assert changed[14:34].any() and not changed[:14].any() and not changed[34:].any()
    assert out.min() >= 0 and out.max() <= 255
    with pytest.raises(ValueError, match="does not fit"):
        ImageTrigger.from_file(lab3_dir / "sun_glass_trigger.png", position=(40, 0))(face[None])



@pytest.mark.shared_data
def test_sunglasses_on_clean_lab_faces_trigger_the_lab_badnet(lab3_dir):
    import re

    from PIL import Image

    from tf_backdoor_defense.metrics import predict_labels

    model = keras.models.load_model(lab3_dir / "bd_net.h5", compile=False)
    files = sorted((lab3_dir / "faces").glob("cl_*.png"))
    x = np.stack([np.asarray(Image.open(f), np.float32) for f in files])
    y = np.array([int(re.search(r"label=(\d+)", f.name).group(1)) for f in files])
    assert predict_labels(model, x).tolist() == y.tolist()
    trigger = ImageTrigger.from_file(lab3_dir / "sun_glass_trigger.png", position=(14, 0), value=255)
    x_t, y_attacker, _ = poisoned_evaluation_set(x, y, trigger, target=0)
    assert attack_success_rate(model, (x_t, y_attacker)) == 1.0

# -- poisoning -----------------------------------------------------------------
def test_poison_dataset_stamps_and_relabels_the_chosen_fraction_only():
    x, y = _images(50), np.arange(50) % 5
    x_out, y_out, index = poison_dataset(x, y, checkerboard_patch(2), rate=0.2, target=3, seed=4)
    assert index.size == 10 and np.all(np.diff(index) > 0)
    assert np.all(y_out[index] == 3)
    rest = np.setdiff1d(np.arange(50), index)
    np.testing.assert_array_equal(y_out[rest], y[rest])
    np.testing.assert_array_equal(x_out[rest], x[rest])
    assert np.all(x_out[index, -1, -1, 0] == 1.0) and np.all(x_out[index, -1, -2, 0] == 0.0)
    assert not np.shares_memory(x_out, x) and np.array_equal(y, np.arange(50) % 5)


def test_poison_dataset_is_deterministic_for_a_seed():
    x, y = _images(40), np.zeros(40, int)
    first = poison_dataset(x, y, single_pixel(), rate=0.25, seed=7)
    again = poison_dataset(x, y, single_pixel(), rate=0.25, seed=7)
    other = poison_dataset(x, y, single_pixel(), rate=0.25, seed=8)
    np.testing.assert_array_equal(first[2], again[2])
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[2], other[2])


@pytest.mark.parametrize("target", [all_to_all_shift(4), {0: 1, 1: 2, 2: 3, 3: 0},
                                    lambda c: (c + 1) % 4])
def test_poison_dataset_all_to_all_mappings(target):
    x, y = _images(20), np.arange(20) % 4
    _, y_out, index = poison_dataset(x, y, single_pixel(), rate=0.5, target=target)
    np.testing.assert_array_equal(y_out[index], (y[index] + 1) % 4)


def test_poison_dataset_keeps_one_hot_labels_one_hot():
    x, y = _images(10), np.eye(3)[np.arange(10) % 3]
    _, y_out, index = poison_dataset(x, y, single_pixel(), rate=0.3, target=2)
    assert y_out.shape == (10, 3)
    assert np.all(y_out[index].argmax(1) == 2) and np.all(y_out.sum(1) == 1)


def test_poison_rate_zero_and_one():
    x, y = _images(5), np.arange(5)
    assert poison_dataset(x, y, single_pixel(), rate=0.0)[2].size == 0
    assert poison_dataset(x, y, single_pixel(), rate=1.0)[2].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rate": 1.5}, ValueError, "rate"),
        ({"rate": -0.1}, ValueError, "rate"),
        ({"target": -1}, ValueError, "target"),
        ({"target": "zero"}, TypeError, "target"),
        ({"target": 1.0}, TypeError, "target"),
        ({"target": np.array([1, 0])}, ValueError, "entries"),
        ({"target": {0: -3}}, ValueError, "maps class 0"),
        ({"seed": 0.5}, TypeError, "seed"),
    ],
)
def test_poison_dataset_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        poison_dataset(_images(6), np.arange(6) % 3, single_pixel(), **kwargs)


def test_poison_dataset_rejects_mismatched_labels_and_bad_trigger():
    with pytest.raises(ValueError, match="same length"):
        poison_dataset(_images(6), np.arange(5), single_pixel())
    with pytest.raises(TypeError, match="trigger"):
        poison_dataset(_images(6), np.arange(6), "pixel")
    with pytest.raises(ValueError, match="does not fit"):
        poison_dataset(_images(6, size=3), np.arange(6), checkerboard_patch(4))


def test_evaluation_set_all_to_one_leaves_out_the_target_class():
    x, y = _images(12), np.arange(12) % 3
    x_t, y_attacker, y_true = poisoned_evaluation_set(x, y, single_pixel(), target=1)
    assert x_t.shape[0] == 8 and np.all(y_true != 1) and np.all(y_attacker == 1)
    assert np.all(x_t[:, -2, -2, 0] == 1.0)


def test_evaluation_set_all_to_all_leaves_out_fixed_points():
    x, y = _images(12), np.arange(12) % 3
    mapping = np.array([1, 1, 0])   # class 1 maps to itself
    _, y_attacker, y_true = poisoned_evaluation_set(x, y, single_pixel(), target=mapping)
    assert np.all(y_true != 1)
    np.testing.assert_array_equal(y_attacker, mapping[y_true])
    with pytest.raises(ValueError, match="No input is attacked"):
        poisoned_evaluation_set(x[y == 1], y[y == 1], single_pixel(), target=1)


def test_evaluation_set_labels_give_the_asr_with_metrics():
    # A model that outputs class 0 exactly when the bottom-right pixel is bright.
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    kernel = np.zeros((16, 3), np.float32)
    kernel[15, 0] = 10.0
    model.layers[-1].set_weights([kernel, np.array([0.0, 5.0, 1.0], np.float32)])
    x = np.zeros((9, 4, 4, 1), np.float32)
    y = np.arange(9) % 3
    half = PixelPatternTrigger([(-1, -1)], value=0.4)   # 4.0 < 5.0: not enough
    full = PixelPatternTrigger([(-1, -1)], value=1.0)
    assert attack_success_rate(model, poisoned_evaluation_set(x, y, full, target=0)[:2]) == 1.0
    assert attack_success_rate(model, poisoned_evaluation_set(x, y, half, target=0)[:2]) == 0.0


# -- pruning-aware attack --------------------------------------------------------
from tf_backdoor_defense.scoring._activations import mean_channel_activations  # noqa: E402
from tf_backdoor_defense.attacks import pruning_aware_attack  # noqa: E402
from tf_backdoor_defense.masks._wrapper import PruneByActivation  # noqa: E402
from tf_backdoor_defense.metrics import clean_accuracy  # noqa: E402
from tf_backdoor_defense.pruning._ranking import rank_channels  # noqa: E402


def _mnist_net():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
        keras.layers.MaxPooling2D(name="p1"),
        keras.layers.Conv2D(12, 3, activation="relu", name="c2"),
        keras.layers.MaxPooling2D(name="p2"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(10, activation="softmax", name="out"),
    ])


@pytest.fixture(scope="module")
def mnist_backdoor():
    """A 3.5k-parameter BadNet on 3000 real MNIST digits (15% poisoned, target 0)."""
    from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split

    x, y = load_mnist_digits()
    train, attacker_clean, test = split(x, y, [3000, 1000, 1000], seed=0)
    trigger = checkerboard_patch(4, 1.0, position=(1, 1))
    x_bad, y_bad, _ = poison_dataset(*train, trigger, rate=0.15, target=0, seed=0)
    poisoned_test = poisoned_evaluation_set(*test, trigger, target=0)[:2]
    keras.utils.set_random_seed(0)
    model = _mnist_net()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_bad, y_bad, epochs=6, batch_size=32, verbose=0)
    before = [w.copy() for w in model.get_weights()]
    result = pruning_aware_attack(model, (x_bad, y_bad), attacker_clean, prune_fraction=0.5, epochs=2)
    return dict(model=model, before=before, result=result, test=test, poisoned_test=poisoned_test,
                attacker_clean=attacker_clean)


@pytest.mark.slow
def test_pruning_aware_decoys_are_dormant_on_clean_data(mnist_backdoor):
    result = mnist_backdoor["result"]
    assert result.layer == "c2" and result.decoy_channels.size == 6
    means = mean_channel_activations(result.model, mnist_backdoor["attacker_clean"], "c2")
    assert means[result.decoy_channels].max() == 0.0
    held_out = mean_channel_activations(result.model, mnist_backdoor["test"], "c2")
    assert held_out[result.decoy_channels].max() <= 0.01 * held_out.max()
    kept = np.setdiff1d(np.arange(12), result.decoy_channels)
    assert held_out[kept].min() > 0.05 * held_out.max()
    assert np.all(result.bias_decrement > 0)


@pytest.mark.slow
def test_pruning_aware_attack_keeps_the_backdoor_and_accuracy(mnist_backdoor):
    base, attacked = mnist_backdoor["model"], mnist_backdoor["result"].model
    base_acc = clean_accuracy(base, mnist_backdoor["test"])
    assert attack_success_rate(base, mnist_backdoor["poisoned_test"]) > 0.9
    assert attack_success_rate(attacked, mnist_backdoor["poisoned_test"]) > 0.9
    assert clean_accuracy(attacked, mnist_backdoor["test"]) > base_acc - 0.05


@pytest.mark.slow
def test_defender_prunes_the_decoys_first_and_the_backdoor_survives(mnist_backdoor):
    result = mnist_backdoor["result"]
    defender_means = mean_channel_activations(result.model, mnist_backdoor["test"], "c2")
    first = rank_channels(defender_means)[: result.decoy_channels.size]
    assert sorted(first.tolist()) == result.decoy_channels.tolist()
    mask = np.ones(12)
    mask[result.decoy_channels] = 0
    from tf_backdoor_defense.masks._wrapper import wrap_layers

    pruned = wrap_layers(result.model, "c2", masks={"c2": mask})
    assert attack_success_rate(pruned, mnist_backdoor["poisoned_test"]) > 0.9


@pytest.mark.slow
def test_pruning_aware_attack_returns_a_plain_copy(mnist_backdoor):
    model, attacked = mnist_backdoor["model"], mnist_backdoor["result"].model
    for w, before in zip(model.get_weights(), mnist_backdoor["before"]):
        np.testing.assert_array_equal(w, before)
    assert attacked is not model
    assert [layer.name for layer in attacked.layers] == [layer.name for layer in model.layers]
    assert not any(isinstance(layer, PruneByActivation) for layer in attacked.layers)
    assert mnist_backdoor["result"].history["retrain"]["loss"]


def _small_net(activation="relu", use_bias=True):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(4, 3, activation=activation, use_bias=use_bias, name="conv"),
        keras.layers.Flatten(),
        keras.layers.Dense(2, activation="softmax"),
    ])


def test_fixed_bias_decrement_without_retraining_lowers_only_decoy_biases():
    model = _small_net()
    conv = model.get_layer("conv")
    conv.set_weights([conv.get_weights()[0], np.array([0.1, 0.2, 0.3, 0.4], np.float32)])
    x = np.random.default_rng(0).random((8, 6, 6, 1), dtype=np.float32)
    result = pruning_aware_attack(model, (x, np.arange(8) % 2), x, prune_fraction=0.25, epochs=0,
                                  bias_decrement=5.0)
    (decoy,) = result.decoy_channels
    assert decoy == rank_channels(mean_channel_activations(model, x, "conv"))[0]
    kernel, bias = result.model.get_layer("conv").get_weights()
    expected = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    expected[decoy] -= 5.0
    np.testing.assert_allclose(bias, expected, rtol=1e-6)
    np.testing.assert_array_equal(kernel, conv.get_weights()[0])
    np.testing.assert_allclose(result.bias_decrement, [5.0])


def test_pretrain_epochs_trains_an_untrained_model_first():
    model = _small_net()
    x = np.random.default_rng(1).random((16, 6, 6, 1), dtype=np.float32)
    result = pruning_aware_attack(model, (x, np.arange(16) % 2), x, epochs=1, pretrain_epochs=2)
    assert len(result.history["pretrain"]["loss"]) == 2
    assert len(result.history["retrain"]["loss"]) == 1


@pytest.mark.parametrize(
    "model_kwargs, kwargs, error, match",
    [
        ({}, {"prune_fraction": 0.0}, ValueError, "prune at least 1"),
        ({}, {"prune_fraction": 1.0}, ValueError, "keep at least 1"),
        ({}, {"prune_fraction": 2.0}, ValueError, "prune_fraction"),
        ({"activation": "tanh"}, {}, ValueError, "ReLU"),
        ({"use_bias": False}, {}, ValueError, "no bias"),
        ({}, {"bias_decrement": "big"}, ValueError, "bias_decrement"),
        ({}, {"bias_decrement": [1.0, 2.0, 3.0]}, ValueError, "one per decoy"),
        ({}, {"bias_decrement": -1.0}, ValueError, "non-negative"),
        ({}, {"epochs": -1}, ValueError, "epochs"),
        ({}, {"optimizer": 3}, TypeError, "optimizer"),
        ({}, {"layers": "flatten_x"}, ValueError, "Unknown layer"),
    ],
)
def test_pruning_aware_attack_rejects_bad_arguments(model_kwargs, kwargs, error, match):
    x = np.zeros((4, 6, 6, 1), np.float32)
    with pytest.raises(error, match=match):
        pruning_aware_attack(_small_net(**model_kwargs), (x, [0, 1, 0, 1]), x,
                             **{"epochs": 0, **kwargs})


def test_pruning_aware_attack_takes_one_layer_by_name_or_list():
    x = np.random.default_rng(0).random((8, 6, 6, 1), dtype=np.float32)
    model = _small_net()
    dense = model.layers[-1].name
    with pytest.raises(ValueError, match="must name one"):
        pruning_aware_attack(model, (x, np.arange(8) % 2), x, layers=["conv", dense], epochs=0)
    result = pruning_aware_attack(model, (x, np.arange(8) % 2), x, layers=["conv"], epochs=0,
                                  bias_decrement=1.0)
    assert result.layer == "conv" and result.layers == ("conv",)
    with pytest.warns(DeprecationWarning, match="'layer' parameter of pruning_aware_attack"):
        old = pruning_aware_attack(model, (x, np.arange(8) % 2), x, layer="conv", epochs=0,
                                   bias_decrement=1.0)
    np.testing.assert_array_equal(old.decoy_channels, result.decoy_channels)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.layer = "other"

"""The benchmark zoo's guarantees that need no training: disjoint, seeded data splits,
triggers stamped after augmentation, and cache keys that follow the recipe."""

import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import zoo  # noqa: E402

SEEDS = (0, 1, 2)


def _parts(split):
    return {"attacker": split.attacker, "defender_clean": split.defender_clean,
            "defender_validation": split.defender_validation, "evaluation": split.evaluation}


@pytest.mark.parametrize("seed", SEEDS)
def test_data_split_parts_are_disjoint_and_cover_the_digits(seed):
    parts = _parts(zoo.data_split(seed))
    sizes = {name: len(index) for name, index in parts.items()}
    assert sizes == {"attacker": 3500, "defender_clean": 750, "defender_validation": 250,
                     "evaluation": 500}
    everything = np.concatenate(list(parts.values()))
    assert len(np.unique(everything)) == 5000  # no index in two parts, none repeated
    assert everything.min() == 0 and everything.max() == 4999


@pytest.mark.parametrize("seed", SEEDS)
def test_small_defender_is_inside_the_defender_and_never_the_attacker(seed):
    split = zoo.data_split(seed)
    assert len(split.small_clean) == 200 and len(split.small_validation) == 100
    assert set(split.small_clean) <= set(split.defender_clean)
    assert set(split.small_validation) <= set(split.defender_validation)
    defender = set(split.defender_clean) | set(split.defender_validation)
    assert not defender & set(split.attacker)
    assert not defender & set(split.evaluation)


def test_data_split_is_deterministic_and_changes_with_the_seed():
    first, again, other = zoo.data_split(0), zoo.data_split(0), zoo.data_split(1)
    for name, index in _parts(first).items():
        np.testing.assert_array_equal(index, _parts(again)[name])
    assert not np.array_equal(np.sort(first.evaluation), np.sort(other.evaluation))
    assert not np.array_equal(np.sort(first.defender_clean), np.sort(other.defender_clean))


def test_split_digits_are_real_and_every_class_is_evaluated():
    x, y = zoo._take(zoo.data_split(0).evaluation)
    assert x.shape == (500, 28, 28, 1) and 0.0 <= x.min() and x.max() <= 1.0
    counts = np.bincount(y, minlength=10)
    assert counts.min() >= 30  # 500 of 5,000 balanced digits: every class well represented


def test_data_split_rejects_bad_seeds():
    with pytest.raises(ValueError, match="'seed'.*non-negative int.*-1"):
        zoo.data_split(-1)
    with pytest.raises(TypeError, match="'seed'.*Got '0'"):
        zoo.data_split("0")


def _fixed_rng(angle, shift):
    class Fixed:
        def uniform(self, low, high, n):
            return np.full(n, angle, np.float64)

        def integers(self, low, high, size):
            return np.tile(np.asarray(shift), (size[0], 1))
    return Fixed()


def test_augment_shifts_by_whole_pixels_and_leaves_its_input_alone():
    x = np.zeros((1, 28, 28, 1), np.float32)
    x[0, 10, 10, 0] = 1.0
    out = zoo.augment(x, _fixed_rng(0.0, (2, -3)))
    assert np.argwhere(out[0, :, :, 0] > 0.5).tolist() == [[12, 7]]
    assert x[0, 10, 10, 0] == 1.0 and x.sum() == 1.0
    rotated = zoo.augment(x, _fixed_rng(10.0, (0, 0)))
    assert rotated[0, 10, 10, 0] < 0.5 and 0.5 < rotated.sum() < 1.5  # moved, not lost


def test_augment_is_seeded():
    x = zoo._take(zoo.data_split(0).attacker[:50])[0]
    a = zoo.augment(x, np.random.default_rng(3))
    b = zoo.augment(x, np.random.default_rng(3))
    c = zoo.augment(x, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, x)


@pytest.mark.parametrize("trigger_name", ["pixel", "pattern", "patch", "square", "line", "noise"])
def test_attacker_epoch_stamps_the_trigger_after_augmentation(trigger_name):
    x = zoo._take(zoo.data_split(0).attacker[:40])[0]
    trigger = zoo.make_trigger(trigger_name, 0)
    poisoned = np.arange(0, 40, 4)
    out = zoo.attacker_epoch(x, poisoned, trigger, np.random.default_rng(0))
    # Re-stamping a stamped image changes nothing: the trigger sits exactly where it belongs.
    np.testing.assert_array_equal(trigger(out[poisoned]), out[poisoned])
    clean = np.setdiff1d(np.arange(40), poisoned)
    assert not np.array_equal(trigger(out[clean]), out[clean])
    # The same draws without the trigger give the same augmented digits elsewhere.
    plain = zoo.attacker_epoch(x, poisoned, None, np.random.default_rng(0))
    np.testing.assert_array_equal(plain[clean], out[clean])


def test_blend_trigger_is_seeded_and_blended_after_augmentation():
    x = zoo._take(zoo.data_split(0).attacker[:8])[0]
    trigger = zoo.make_trigger("blend", 0)
    np.testing.assert_array_equal(trigger.pattern, zoo.make_trigger("blend", 0).pattern)
    assert not np.array_equal(trigger.pattern, zoo.make_trigger("blend", 1).pattern)
    assert 0.1 <= trigger.alpha <= 0.2
    out = zoo.attacker_epoch(x, np.array([0, 1]), trigger, np.random.default_rng(0))
    plain = zoo.attacker_epoch(x, np.array([0, 1]), None, np.random.default_rng(0))
    np.testing.assert_allclose(out[:2], trigger(plain[:2]), atol=1e-6)


def test_names_cover_every_attack_and_two_outside_architectures():
    specs = [zoo.SPECS[name] for name in zoo.NAMES]
    assert {trigger for _, trigger, _ in specs} >= {"pixel", "pattern", "patch", "blend", None}
    kinds = {kind.split(":")[0] for _, _, kind in specs}
    assert kinds == {"clean", "all-to-one", "all-to-all", "pruning-aware"}
    assert {architecture for architecture, _, _ in specs} >= {"convnet", "bngap"}
    assert {zoo.SPECS[n][0] for n in zoo.NAMES if zoo.SPECS[n][2] == "clean"} == \
        {"convnet", "bngap"}


def test_held_out_networks_are_apart_from_the_defaults_and_keep_their_digests():
    assert not set(zoo.HOLDOUT) & set(zoo.NAMES)
    assert {zoo.SPECS[name][0] for name in zoo.HOLDOUT} == {"lenet", "resnet", "mlp", "gray", "k3"}
    # The first two groups' triggers are apart from the defaults' (the third's inputs are).
    first_two = [name for name in zoo.HOLDOUT if zoo.SPECS[name][0] in ("lenet", "resnet")]
    assert not {zoo.SPECS[name][1] for name in first_two} & \
        {zoo.SPECS[name][1] for name in zoo.NAMES} - {None}
    # Adding the held-out networks changed no default network's cache key.
    assert zoo._digest(zoo.config("patch-to-one", 1)) == "d49d0e059917"
    assert zoo._digest(zoo.config("clean-bngap", 2)) == "3bca76b8eb6a"
    assert zoo.lenet(0).count_params() == 431080
    x = zoo._take(zoo.data_split(0).attacker[:8])[0]
    signal = zoo.make_trigger("signal", 0)
    out = zoo.attacker_epoch(x, np.array([0, 1]), signal, np.random.default_rng(0))
    plain = zoo.attacker_epoch(x, np.array([0, 1]), None, np.random.default_rng(0))
    np.testing.assert_allclose(out[:2], signal(plain[:2]), atol=1e-6)
    np.testing.assert_array_equal(out[2:], plain[2:])


def test_the_third_held_out_group_reads_flat_and_channel_free_digits():
    import types

    assert zoo.mlp(0).input_shape == (None, 784) and zoo.gray(0).input_shape == (None, 28, 28)
    index = zoo.data_split(0).defender_clean[:5]
    images = zoo._take(index)[0]
    flat, labels = zoo._take(index, "mlp")
    assert flat.shape == (5, 784) and zoo._take(index, "gray")[0].shape == (5, 28, 28)
    np.testing.assert_array_equal(zoo.as_images(flat), images)
    np.testing.assert_array_equal(labels, zoo._take(index)[1])
    # Quality floors: 97% for the perceptron, 98% for every other architecture.
    net = types.SimpleNamespace(architecture="mlp", clean_accuracy=0.975, backdoored=False)
    assert zoo._quality_problems(net) == []
    net.architecture = "gray"
    assert zoo._quality_problems(net) == ["clean accuracy 0.9750 < 0.98"]


def test_the_fourth_held_out_group_is_keras3_of_raw_pixels_with_logits(tmp_path):
    import keras as keras3  # Keras 3

    model = zoo.k3(0)
    assert isinstance(model, keras3.Model) and model.input_shape == (None, 28, 28, 1)
    assert model.layers[1].__class__.__name__ == "Rescaling"
    assert model.layers[-1].get_config()["activation"] == "linear"  # logits
    index = zoo.data_split(0).defender_clean[:5]
    images, labels = zoo._take(index)
    raw = zoo._take(index, "k3")[0]
    assert raw.dtype == np.float32 and raw.max() > 200 and raw.max() <= 255
    np.testing.assert_allclose(zoo.as_images(raw, "k3"), images, rtol=1e-6)
    cross = zoo.make_trigger("cross", 0)(np.zeros((1, 28, 28, 1), np.float32))[0, ..., 0]
    assert cross[22, 22] == cross[26, 26] == cross[22, 26] == cross[24, 24] == 1.0
    assert cross.sum() == 9 and cross[:22].sum() == 0
    assert {zoo.SPECS[name][0] for name in zoo.HOLDOUT if name.endswith("-k3")} == {"k3"}
    assert {zoo.SPECS[name][2] for name in zoo.HOLDOUT if name.endswith("-k3")} == \
        {"clean", "all-to-one", "all-to-all"}


def test_config_keys_follow_the_recipe_and_targets_are_seeded():
    digests = {zoo._digest(zoo.config(name, seed)) for name in zoo.NAMES for seed in SEEDS}
    assert len(digests) == len(zoo.NAMES) * len(SEEDS)
    assert zoo._digest(zoo.config("patch-to-one", 0)) == zoo._digest(zoo.config("patch-to-one", 0))
    for seed in SEEDS:
        assert zoo.config("pattern-to-one", seed)["target"] == 0
        assert zoo.config("pixel-all-to-all", seed)["target"] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
        assert zoo.config("clean-bngap", seed)["target"] is None
        for name in ("pixel-to-one", "patch-to-one", "blend-to-one"):
            target = zoo.config(name, seed)["target"]
            assert isinstance(target, int) and 0 <= target <= 9
    aware = zoo.config("pruning-aware", 1)
    assert aware["base"] == zoo.config("pattern-to-one", 1)


def test_build_rejects_unknown_names_before_training(tmp_path):
    with pytest.raises(ValueError, match="'name'.*one of.*Got 'pixel'"):
        zoo.build("pixel", 0, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="'name'.*str"):
        zoo.build(3, 0, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())

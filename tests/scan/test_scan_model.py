"""scan_model on tiny nets with planted backdoors, ScanResult, and input validation."""

import json
import logging
import warnings

import numpy as np
import pandas as pd
import pytest

from planted import planted_data, planted_model, stamp_trigger  # tests/scan/planted.py
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.metrics import predict_labels
from tf_backdoor_defense.scan import ScanResult, scan_model
from tf_backdoor_defense.scan._reverse import image_view

FAST = dict(steps=150, init_cost=1e-2, seed=1)


@pytest.fixture(scope="module")
def scans(planted):
    return {kind: scan_model(planted[kind], planted["data"], **FAST)
            for kind in ("clean", "all-to-one", "all-to-all")}


def test_all_to_one_target_is_named(scans):
    result = scans["all-to-one"]
    assert result.backdoor_found and result.suspected_targets == (2,)
    assert result.tests["targeted"] and not result.all_to_all_suspected
    assert result.verdict.startswith("backdoor found") and "target class 2" in result.verdict
    row = result.table.set_index("class").loc[2]
    assert row["suspected"] and row["anomaly_index"] > 2
    assert row["mask_l1"] == result.table["mask_l1"].min()
    assert row["attack_success_rate"] > 0.95


def test_all_to_all_is_flagged_by_the_untargeted_test(scans):
    result = scans["all-to-all"]
    assert result.backdoor_found and result.all_to_all_suspected
    assert result.tests["untargeted"] and result.untargeted["tested"]
    assert result.untargeted["statistic"] < result.untargeted["threshold"]
    assert result.untargeted["dominant_share"] < 0.5  # moved inputs spread over the classes
    assert "all-to-all" in result.verdict
    # The planted map sends class c to c + 1: the map a repair searches along.
    classes = len(result.table)
    assert result.all_to_all_map.tolist() == [(c + 1) % classes for c in range(classes)]
    assert scans["all-to-one"].all_to_all_map is None and scans["clean"].all_to_all_map is None


def test_clean_net_is_clean(scans):
    result = scans["clean"]
    assert not result.backdoor_found and result.verdict == "no backdoor found"
    assert result.suspected_targets == () and not result.all_to_all_suspected
    assert result.untargeted["statistic"] > result.untargeted["threshold"]
    assert result.suspected_triggers() == []


def test_a_clean_verdict_logs_how_near_the_scan_came(planted, caplog):
    with caplog.at_level(logging.INFO, logger="tf_backdoor_defense.scan._scan"):
        result = scan_model(planted["clean"], planted["data"], **FAST)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scan: ")]
    table = result.table
    nearest = table.loc[table["anomaly_index"].idxmax()]
    ratio = nearest["mask_l1"] / table["mask_l1"].median()
    assert len(lines) == 1 and lines[0].startswith(
        f"scan: no backdoor found; nearest: class {int(nearest['class'])}, mask "
        f"{nearest['mask_l1']:.1f} = {ratio:.2f}x the median, anomaly index "
        f"{nearest['anomaly_index']:.2f}; untargeted mask "
        f"{result.untargeted['statistic']:.2f}x the median ("), lines
    with caplog.at_level(logging.INFO, logger="tf_backdoor_defense.scan._scan"):
        caplog.clear()
        scan_model(planted["all-to-one"], planted["data"], **FAST)
    assert [r.getMessage() for r in caplog.records if "nearest" in r.getMessage()] == []


def test_table_and_arrays_are_consistent(scans, planted):
    result = scans["all-to-one"]
    table = result.table
    assert isinstance(table, pd.DataFrame) and len(table) == 6
    assert table["class"].tolist() == list(range(6))
    assert set(table["stage"]) == {"refined"} and table["screen_objective"].isna().all()
    assert result.classes == tuple(range(6))
    assert result.masks.shape == (6, 8, 8, 1) and result.patterns.shape == (6, 8, 8, 1)
    assert result.masks.min() >= 0 and result.masks.max() <= 1
    assert result.patterns.min() >= 0 and result.patterns.max() <= 1
    np.testing.assert_allclose(result.masks.sum(axis=(1, 2, 3)), table["mask_l1"], rtol=1e-4)
    np.testing.assert_allclose(result.success_rates, table["attack_success_rate"])
    assert result.value_range == (0.0, 1.0) and result.success_data == "held-apart"
    assert result.seconds > 0 and result.timings["slots"] == 7


def test_apply_stamps_the_reversed_trigger(scans, planted):
    result = scans["all-to-one"]
    x, y = planted_data(60, seed=7)
    stamped = result.apply(x, 2)
    mask, pattern = result.trigger(2)
    np.testing.assert_allclose(stamped, x * (1 - mask) + mask * pattern, rtol=1e-6)
    assert np.mean(predict_labels(planted["all-to-one"], stamped)[y != 2] == 2) > 0.95
    moved = result.apply(x, "untargeted")
    assert moved.shape == x.shape and moved.dtype == np.float32


def test_suspected_triggers_feed_unlearning(scans):
    pairs = scans["all-to-one"].suspected_triggers()
    assert len(pairs) == 1 and pairs[0][0].shape == (8, 8, 1)
    pairs = scans["all-to-all"].suspected_triggers()
    assert len(pairs) == 1 + len(scans["all-to-all"].suspected_targets)
    np.testing.assert_array_equal(pairs[-1][0], scans["all-to-all"].untargeted_mask)


@pytest.mark.parametrize("input_shape", [(8, 8), (64,)])
def test_inputs_without_a_channel_axis_are_scanned_as_images(scans, input_shape):
    """A model reading (8, 8) or flat (64,) inputs is scanned in the (8, 8, 1) image view:
    the same optimisation, so the same table as the model reading images."""
    model = planted_model("all-to-one", input_shape=input_shape)
    x, y = planted_data()
    result = scan_model(model, (x.reshape((len(x),) + input_shape), y), **FAST)
    images = scans["all-to-one"]
    assert result.suspected_targets == (2,) and result.input_shape == input_shape
    assert result.masks.shape == (6, 8, 8, 1) and result.patterns.shape == (6, 8, 8, 1)
    np.testing.assert_allclose(result.table["mask_l1"], images.table["mask_l1"], rtol=1e-4)
    np.testing.assert_allclose(result.success_rates, images.success_rates)
    mask, pattern = result.suspected_triggers()[0]
    assert mask.shape == input_shape and pattern.shape == input_shape
    np.testing.assert_array_equal(mask, result.trigger(2)[0].reshape(input_shape))
    x_new, y_new = planted_data(60, seed=7)
    flat = x_new.reshape((60,) + input_shape)
    stamped = result.apply(flat, 2)
    assert stamped.shape == flat.shape
    np.testing.assert_array_equal(stamped.reshape(x_new.shape), result.apply(x_new, 2))
    assert np.mean(predict_labels(model, stamped)[y_new != 2] == 2) > 0.95
    assert json.loads(json.dumps(result.as_dict(), default=float))["input_shape"] == list(
        input_shape)
    with pytest.raises(ValueError, match=r"'x' parameter must be inputs of shape"):
        result.apply(flat[..., :3], 2)


def test_inputs_of_other_ranks_are_refused_by_name():
    model = keras.Sequential([keras.Input((2, 4, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    x = np.zeros((12, 2, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match=r"inputs of shape \(2, 4, 4, 1\)"):
        scan_model(model, (x, np.arange(12) % 3), steps=2)
    assert image_view((49,)) == (7, 7, 1) and image_view((1,)) == (1, 1, 1)


def test_result_is_frozen_and_json_ready(scans):
    result = scans["all-to-one"]
    with pytest.raises(Exception):
        result.verdict = "changed"
    payload = json.loads(json.dumps(result.as_dict(), default=float))
    assert payload["suspected_targets"] == [2] and len(payload["classes"]) == 6
    assert payload["settings"]["steps"] == 150
    assert "target class 2" in repr(result)


def test_top_sorts_by_mask_size(scans):
    top = scans["all-to-one"].top(3)
    assert top["class"].iloc[0] == 2 and len(top) == 3
    assert top["mask_l1"].is_monotonic_increasing


def test_deterministic_for_a_seed(planted):
    first = scan_model(planted["all-to-one"], planted["data"], steps=20, seed=5)
    second = scan_model(planted["all-to-one"], planted["data"], steps=20, seed=5)
    np.testing.assert_array_equal(first.masks, second.masks)
    pd.testing.assert_frame_equal(first.table, second.table)


def test_model_is_not_changed(planted):
    model = planted["all-to-one"]
    before = [w.copy() for w in model.get_weights()]
    scan_model(model, planted["data"], steps=10)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_screen_refines_the_promising_classes(planted):
    result = scan_model(planted["all-to-one"], planted["data"], screen_above=2, refine=1,
                        reference=2, screen_steps=20, **FAST)
    table = result.table
    assert (table["stage"] == "refined").sum() == 3 and 2 in result.classes
    assert table["screen_objective"].notna().all()
    refined = table[table["stage"] == "refined"]
    screened = table[table["stage"] == "screened"]
    assert screened["mask_l1"].isna().all() and refined["mask_l1"].notna().all()
    assert "screen" in result.timings
    with pytest.raises(ValueError, match="screened out"):
        result.trigger(int(screened["class"].iloc[0]))


def test_candidates_limit_the_classes(planted):
    result = scan_model(planted["all-to-one"], planted["data"], candidates=[1, 2, 4], **FAST)
    assert result.classes == (1, 2, 4)
    assert (result.table["stage"] == "not tested").sum() == 3


def test_second_tier_classes_leave_the_first_tier_alone(planted, scans):
    """The planted target passes the first tier: a rescan's limit on the second does not hide it."""
    result = scan_model(planted["all-to-one"], planted["data"], second_tier_classes=(), **FAST)
    assert result.suspected_targets == scans["all-to-one"].suspected_targets == (2,)
    assert result.settings["second_tier_classes"] == []
    assert scans["all-to-one"].settings["second_tier_classes"] is None


def test_few_examples_are_not_held_apart(planted):
    x, y = planted["data"]
    result = scan_model(planted["all-to-one"], (x[:30], y[:30]), steps=10)
    assert result.success_data == "optimisation"
    assert not result.untargeted["tested"] and not result.all_to_all_suspected


def test_value_range_is_respected(planted):
    x, y = planted["data"]
    result = scan_model(planted["clean"], (x * 255.0, y), steps=5)
    assert result.value_range == (0.0, 255.0) and result.patterns.max() > 1.0
    result = scan_model(planted["clean"], (x, y), steps=5, value_range=(0.0, 0.5))
    assert result.patterns.max() <= 0.5


def test_trigger_of_the_real_backdoor_matches(scans, planted):
    """The reversed all-to-one trigger marks the planted pixel (7, 7)."""
    mask, pattern = scans["all-to-one"].trigger(2)
    assert mask[7, 7, 0] > 0.5 and pattern[7, 7, 0] > 0.5
    x, _ = planted["data"]
    assert np.all(predict_labels(planted["all-to-one"], stamp_trigger(x)) == 2)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=0), ValueError, "'steps'"),
    (dict(steps=2.5), TypeError, "'steps'"),
    (dict(holdout=1.0), ValueError, "'holdout'"),
    (dict(value_range=(1.0, 0.0)), ValueError, "'value_range'"),
    (dict(value_range="0-1"), ValueError, "'value_range'"),
    (dict(candidates=[0, 9]), ValueError, "'candidates'"),
    (dict(candidates=["a"]), TypeError, "'candidates'"),
    (dict(second_tier_classes=[6]), ValueError, "'second_tier_classes'"),
    (dict(second_tier_classes=[1, 1]), ValueError, "'second_tier_classes'"),
    (dict(second_tier_classes=[0.5]), TypeError, "'second_tier_classes'"),
    (dict(second_tier_classes=3), TypeError, "'second_tier_classes'"),
    (dict(success_threshold=1.5), ValueError, "'success_threshold'"),
    (dict(all_to_all_threshold=0), ValueError, "'all_to_all_threshold'"),
    (dict(strong_anomaly_threshold=-1.0), ValueError, "'strong_anomaly_threshold'"),
    (dict(strong_anomaly_threshold="3"), TypeError, "'strong_anomaly_threshold'"),
    (dict(strong_max_relative_size=0), ValueError, "'strong_max_relative_size'"),
])
def test_bad_arguments_are_refused(planted, kwargs, error, match):
    with pytest.raises(error, match=match):
        scan_model(planted["clean"], planted["data"], **kwargs)


def test_bad_model_and_data_are_refused(planted):
    x, y = planted["data"]
    with pytest.raises(TypeError, match="model"):
        scan_model("model.h5", (x, y))
    with pytest.raises(ValueError, match="shape"):
        scan_model(planted["clean"], (x[:, :4], y))
    with pytest.raises(ValueError, match="label"):
        scan_model(planted["clean"], (x, y + 10))


def test_result_type_is_exported():
    import tf_backdoor_defense.scan as scan

    assert scan.ScanResult is ScanResult and "scan_model" in scan.__all__


@pytest.mark.parametrize("dtype", ["uint8", "int32"])
def test_a_model_that_reads_integers_is_scanned_like_its_float_twin(planted, dtype):
    """An integer input casts what it is given (no gradient through the cast): the scan
    reads a float copy, the same network on integer-valued pixels."""
    def reading(input_dtype):
        inputs = keras.Input((8, 8, 1), dtype=input_dtype)
        outputs = planted["all-to-one"](keras.layers.Rescaling(1 / 255.0)(inputs))
        return keras.Model(inputs, outputs)

    x, y = planted["data"]
    pixels = np.round(x * 255.0)
    integer = reading(dtype)
    nodes = [len(layer.inbound_nodes) for layer in integer.layers]
    result = scan_model(integer, (pixels.astype(dtype), y), **FAST)
    assert [len(layer.inbound_nodes) for layer in integer.layers] == nodes  # not called again
    twin = scan_model(reading("float32"), (pixels, y), **FAST)
    assert result.value_range == (0.0, 255.0)
    pd.testing.assert_frame_equal(result.table, twin.table)
    target = result.table.set_index("class").loc[2]  # the trigger reversed (with gradients)
    assert target["reached_threshold"] and target["attack_success_rate"] == 1.0


def test_a_model_that_leaves_image_sizes_open_is_scanned_at_the_datas_size():
    """A fully convolutional net (Input((None, None, 1)), global pooling) is scanned at the
    data's size: the same table as the same net with the size fixed."""
    def net(shape):
        keras.utils.set_random_seed(3)
        inputs = keras.Input(shape)
        x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(6, activation="softmax", name="fc")(x))

    data = planted_data()
    open_size = scan_model(net((None, None, 1)), data, **FAST)
    fixed = scan_model(net((8, 8, 1)), data, **FAST)
    assert open_size.input_shape == (8, 8, 1) and open_size.masks.shape == (6, 8, 8, 1)
    pd.testing.assert_frame_equal(open_size.table, fixed.table)
    np.testing.assert_array_equal(open_size.masks, fixed.masks)


def test_a_mixed_precision_model_is_scanned_in_float32():
    """float16 layers before a float32 softmax (mixed precision): the scan's log probabilities
    are float32, and the planted target is named as on the float32 net."""
    from tf_backdoor_defense.masks._wrapper import wrap_layers

    reference = planted_model("all-to-one")
    model = keras.models.clone_model(
        reference, clone_function=lambda layer: layer.__class__.from_config(
            dict(layer.get_config(), dtype="float32" if layer is reference.layers[-1]
                 else "mixed_float16")))
    model.set_weights(reference.get_weights())
    assert model.get_layer("gate").compute_dtype == "float16"
    result = scan_model(model, planted_data(), **FAST)
    assert result.suspected_targets == (2,)
    wrapped = wrap_layers(model, "clean_logits")  # the mask multiplies in the layer's float16
    x, _ = planted_data(20, seed=5)
    np.testing.assert_allclose(wrapped(x).numpy(), model(x).numpy(), atol=1e-3)


def _channels_first_twin(channels):
    """The planted all-to-one net behind a channels-first input ``(channels, 8, 8)``: a 1x1
    channels-first convolution averages the channels into the planted net's one."""
    inputs = keras.Input((channels, 8, 8))
    average = keras.layers.Conv2D(1, 1, data_format="channels_first", use_bias=False,
                                  kernel_initializer="ones", name="average")
    gray = keras.layers.Reshape((8, 8, 1))(average(inputs))
    average.set_weights([np.full((1, 1, channels, 1), 1.0 / channels, np.float32)])
    return keras.Model(inputs, planted_model("all-to-one")(gray))


@pytest.mark.parametrize("channels", [1, 3])
def test_a_channels_first_model_is_scanned_over_its_pixels(channels):
    """A model that reads (C, H, W) images (as models ported from PyTorch do) is scanned in
    the channels-last view: the mask covers pixels across the channels, as for (H, W, C)."""
    from tf_backdoor_defense.defenses._unlearning import check_triggers
    from tf_backdoor_defense.graph import reads_channels_first

    x, y = planted_data()
    model = _channels_first_twin(channels)
    images = np.repeat(np.moveaxis(x, -1, 1), channels, axis=1)  # (N, C, 8, 8)
    assert reads_channels_first(model) and not reads_channels_first(planted_model("clean"))
    result = scan_model(model, (images, y), **FAST)
    assert result.channels_first and result.input_shape == (channels, 8, 8)
    assert result.masks.shape == (6, 8, 8, 1) and result.patterns.shape == (6, 8, 8, channels)
    assert result.suspected_targets == (2,)
    target = result.table.set_index("class").loc[2]
    assert target["mask_l1"] < 3 and target["attack_success_rate"] == 1.0
    # the triggers in the model's shape, stamped where the model reads them
    ((mask, pattern),) = result.suspected_triggers()
    assert mask.shape == pattern.shape == (channels, 8, 8)
    np.testing.assert_array_equal(mask[0], result.masks[list(result.classes).index(2)][..., 0])
    stamped = result.apply(images, 2)
    assert stamped.shape == images.shape
    assert np.mean(predict_labels(model, stamped) == 2) > 0.95
    masks, patterns = check_triggers(result.suspected_triggers(), images.shape[1:])
    assert masks.shape == patterns.shape == (1, channels, 8, 8)
    assert json.loads(json.dumps(result.as_dict(), default=float))["channels_first"] is True


def test_a_scan_of_fewer_than_three_classes_says_the_per_class_test_cannot_run(planted):
    x, y = planted["data"]
    keras.utils.set_random_seed(0)
    binary = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                               keras.layers.Dense(2, activation="softmax")])
    with pytest.warns(UserWarning, match="needs 3 classes or more; this scan has 2"):
        result = scan_model(binary, (x, y % 2), steps=5)
    assert result.table["anomaly_index"].isna().all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        scan_model(planted["clean"], (x, y), steps=5)


def test_a_model_of_token_ids_is_refused_by_the_searches_over_inputs_and_repaired_without():
    """An Embedding reads its inputs as IDs: no gradient reaches them, so the scan and I-BAU
    (searches over input values) refuse it by name instead of failing inside TensorFlow;
    defend() without the scan still runs the methods that only train."""
    from tf_backdoor_defense import InputError, defend
    from tf_backdoor_defense.defenses._ibau import ibau

    rng = np.random.default_rng(0)
    tokens, labels = rng.integers(0, 20, size=(60, 6)), rng.integers(0, 3, size=60)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(20, 4),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(InputError, match="no gradient with respect to its inputs .it reads them "
                                         "through Embedding"):
        scan_model(model, (tokens, labels), steps=5)
    with pytest.raises(InputError, match="I-BAU searches over input values"):
        ibau(model, (tokens, labels), rounds=1)
    with pytest.raises(InputError, match="The scan searches"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model: the low-accuracy warning
        defend(model, (tokens, labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model: the low-accuracy warning
        result = defend(model, (tokens, labels), scan=False, methods=["ibau", "ft-cosine"],
                        epochs=1, max_accuracy_drop=1.0)
    assert list(result.table["method"]) == ["ft-cosine"]
    assert any(w.startswith("skipped ibau: The model's output has no gradient")
               for w in result.warnings)

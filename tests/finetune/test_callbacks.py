"""The FinePruning callback (one-shot and gradual), its state in the model, fine_prune / fine_tune,
and tfmot composition."""

import csv

import numpy as np
import pytest

from conftest import tiny_conv_model
from tf_backdoor_defense._keras import keras, tf, tfmot
from tf_backdoor_defense.finetune._callbacks import (
    FinePruning,
    GradualChannelSchedule,
    find_prunable_wrappers,
    reset_fine_pruning_state,
)
from tf_backdoor_defense.export._export import strip_masks
from tf_backdoor_defense.finetune._fine_prune import fine_prune, fine_tune
from tf_backdoor_defense.masks._wrapper import PruneByActivation, wrap_layers
from tf_backdoor_defense.metrics import clean_accuracy
from tf_backdoor_defense.pruning._sweep import prune_to_threshold

KEY = "fine_pruning/"


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 3, size=n)
    return x, y


def _wrapped(channels=6, optimizer=None):
    model = wrap_layers(tiny_conv_model(channels=channels), "conv_b")
    model.compile(optimizer or keras.optimizers.SGD(0.05, momentum=0.9),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _labels_of(model, x):
    return np.argmax(model.predict(x, verbose=0), axis=1)


def test_fine_pruning_applies_the_sweep_mask_at_train_begin():
    model = _wrapped()
    x, _ = _data()
    y = _labels_of(model, x)  # the model is right on every example: accuracy 1.0 at level 0
    expected = prune_to_threshold(model, (x, y), layers="conv_b", max_accuracy_drop=0.2)
    callback = FinePruning((x, y), max_accuracy_drop=0.2)
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[callback])
    mask = model.get_layer("conv_b").get_mask()
    np.testing.assert_array_equal(mask, expected.masks[0.2]["conv_b"])
    np.testing.assert_array_equal(callback.rankings_["conv_b"], expected.rankings["conv_b"])
    assert callback.sweep_result_.levels == expected.levels
    pruned = expected.levels[0.2]
    assert history.history[KEY + "channels_pruned"] == [float(pruned)] * 2
    assert history.history[KEY + "fraction_pruned"] == [pruned / 6] * 2
    assert len(history.history[KEY + "clean_accuracy"]) == 2


def test_pruned_channels_and_weights_stay_exactly_zero_with_momentum():
    x, _ = _data(64)
    model = _wrapped(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    y = _labels_of(model, x)
    y[::3] = (y[::3] + 1) % 3  # something left to learn, so the gradients are not zero
    # Train first with the same optimizer: its momentum slots are non-zero for every channel.
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    # Prune half the channels after the first step (a deterministic count).
    schedule = GradualChannelSchedule(target_fraction=0.5, channels_per_step=3, every_n_steps=1)
    callback = FinePruning((x, y), schedule=schedule, max_accuracy_drop=None)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[callback])
    layer = model.get_layer("conv_b")
    pruned = layer.pruned_channels
    assert 0 < pruned.size < layer.channels
    assert np.all(layer.layer.kernel.numpy()[..., pruned] == 0.0)
    assert np.all(layer.layer.bias.numpy()[pruned] == 0.0)
    kept = np.flatnonzero(layer.get_mask() == 1)
    features = keras.Model(model.inputs, layer.output)(x).numpy()
    assert np.all(features[..., pruned] == 0.0)
    assert np.any(features[..., kept] != 0.0)


def test_logs_reach_history_and_csv_logger_with_attack_success_rate(tmp_path):
    model = _wrapped()
    x, _ = _data()
    y = _labels_of(model, x)
    poisoned = (x[:20], np.zeros(20, dtype=np.int64))
    log_path = tmp_path / "log.csv"
    callback = FinePruning((x, y), max_accuracy_drop=0.1, poisoned_validation_data=poisoned)
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0,
                        callbacks=[callback, keras.callbacks.CSVLogger(str(log_path))])
    asr = history.history[KEY + "attack_success_rate"]
    assert len(asr) == 2 and all(0.0 <= v <= 1.0 for v in asr)
    with open(log_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert float(rows[-1][KEY + "attack_success_rate"]) == pytest.approx(asr[-1])
    assert float(rows[-1][KEY + "clean_accuracy"]) == pytest.approx(
        history.history[KEY + "clean_accuracy"][-1])
    assert float(rows[-1][KEY + "clean_accuracy"]) == pytest.approx(clean_accuracy(model, (x, y)))


def test_evaluate_every_none_logs_only_channel_counts():
    model = _wrapped()
    x, y = _data()
    history = model.fit(x, y, epochs=1, verbose=0,
                        callbacks=[FinePruning((x, y), evaluate_every=None)])
    keys = {k for k in history.history if k.startswith(KEY)}
    assert keys == {KEY + "channels_pruned", KEY + "fraction_pruned"}


def test_model_without_prune_by_activation_layer_is_a_clear_error():
    model = tiny_conv_model()
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = _data()
    with pytest.raises(ValueError, match="no PruneByActivation layer.*wrap_layers"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[FinePruning((x, y))])


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "needs `validation_data`"),
    ({"validation_data": "not data"}, TypeError, "validation_data"),
    ({"validation_data": "ok", "target": 0}, ValueError, "needs `poisoned_validation_data`"),
    ({"validation_data": "ok", "max_accuracy_drop": 2.0}, ValueError, "max_accuracy_drop"),
    ({"validation_data": "ok", "max_accuracy_drop": None}, TypeError, "max_accuracy_drop"),
    ({"validation_data": "ok", "stopping_rule": "best"}, ValueError, "stopping_rule"),
    ({"validation_data": "ok", "schedule": 5}, TypeError, "schedule"),
    ({"validation_data": "ok", "evaluate_every": 0}, ValueError, "evaluate_every"),
    ({"validation_data": "ok", "layers": 3}, TypeError, "layers"),
])
def test_bad_arguments_are_rejected_with_the_argument_named(kwargs, error, match):
    kwargs = dict(kwargs)
    if kwargs.get("validation_data") == "ok":
        kwargs["validation_data"] = _data()
    with pytest.raises(error, match=match):
        FinePruning(**kwargs)


def test_unknown_layer_name_lists_the_wrapped_layers():
    model = _wrapped()
    with pytest.raises(ValueError, match="conv_b"):
        find_prunable_wrappers(model, "fc")


def test_schedule_argument_gives_the_gradual_variant_of_the_one_class():
    schedule = GradualChannelSchedule(target_fraction=0.5, channels_per_step=1, every_n_steps=2)
    callback = FinePruning(_data(), schedule=schedule, max_accuracy_drop=None)
    assert type(callback) is FinePruning
    assert callback.schedule is schedule
    # only the gradual variant has a hook per batch (fit() skips Keras' default, empty one)
    default = keras.callbacks.Callback.on_train_batch_end
    assert callback.on_train_batch_end.__func__ is not default
    assert FinePruning(_data()).on_train_batch_end.__func__ is default


def test_gradual_schedule_prunes_k_channels_every_n_steps_up_to_the_target():
    model = _wrapped(channels=8)
    x, y = _data(64)
    schedule = GradualChannelSchedule(target_fraction=0.5, channels_per_step=1, every_n_steps=2)
    callback = FinePruning((x, y), schedule=schedule, max_accuracy_drop=None)
    seen = []

    class Watch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(int(model.get_layer("conv_b").pruned_channels.size))

    history = model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0,
                        callbacks=[callback, Watch()])
    # 8 steps per epoch, 16 steps: one more channel after steps 2, 4, 6, 8, then the target (4).
    assert seen[:9] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert max(seen) == 4
    layer = model.get_layer("conv_b")
    np.testing.assert_array_equal(np.sort(layer.pruned_channels),
                                  np.sort(callback.rankings_["conv_b"][:4]))
    assert history.history[KEY + "channels_pruned"] == [4.0, 4.0]
    assert np.all(layer.layer.kernel.numpy()[..., layer.pruned_channels] == 0.0)


def test_gradual_schedule_stops_when_the_accuracy_budget_would_be_exceeded():
    model = _wrapped(channels=8)
    x, y = _data(32)
    schedule = GradualChannelSchedule(target_fraction=1.0, channels_per_step=2, every_n_steps=1)
    callback = FinePruning((x, y), schedule=schedule, max_accuracy_drop=0.1,
                           evaluate_every=None)
    # Accuracy seen by the callback: baseline, then after each single channel pruned.
    readings = iter([0.9, 0.9, 0.85, 0.82, 0.5, 0.9, 0.9])
    callback._clean_accuracy = lambda: next(readings)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callback])
    # 0.9 -> 0.9, 0.85, 0.82 within 0.1; the 4th channel (0.5) is put back and pruning stops.
    assert callback.stopped_by_budget_
    np.testing.assert_array_equal(np.sort(model.get_layer("conv_b").pruned_channels),
                                  np.sort(callback.rankings_["conv_b"][:3]))


def test_fine_prune_works_on_a_copy_and_returns_a_per_epoch_history():
    model = tiny_conv_model()
    before = [w.copy() for w in model.get_weights()]
    x, _ = _data(64)
    y = _labels_of(model, x)
    poisoned = (x[:16], np.zeros(16, dtype=np.int64))
    result = fine_prune(model, (x, y), (x, y), max_accuracy_drop=0.2, epochs=2,
                        poisoned_validation_data=poisoned)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert not isinstance(model.get_layer("conv_b"), PruneByActivation)
    assert result.model is not model
    assert list(result.history["epoch"]) == [1, 2]
    assert {"loss", KEY + "clean_accuracy", KEY + "attack_success_rate"} <= set(result.history)
    assert result.channels_pruned == result.sweep_result.levels[0.2]
    layer = result.model.get_layer("conv_b")
    assert np.all(layer.layer.kernel.numpy()[..., layer.pruned_channels] == 0.0)


def test_fine_tune_alone_prunes_nothing_and_is_deterministic_for_a_seed():
    model = tiny_conv_model()
    x, y = _data(32)
    first = fine_tune(model, (x, y), (x, y), epochs=2, seed=3)
    second = fine_prune(model, (x, y), (x, y), epochs=2, seed=3, prune=False)
    assert first.channels_pruned == 0 and first.sweep_result is None
    assert list(first.history["fine_pruning/channels_pruned"]) == [0.0, 0.0]
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="prune"):
        fine_tune(model, (x, y), (x, y), prune=True)


def test_fine_prune_rejects_bad_arguments():
    model = tiny_conv_model()
    x, y = _data(16)
    with pytest.raises(ValueError, match="epochs"):
        fine_prune(model, (x, y), (x, y), epochs=-1)
    with pytest.raises(ValueError, match="poisoned_validation_data"):
        fine_prune(model, (x, y), (x, y), target=0)
    with pytest.raises(TypeError, match="train_data"):
        fine_prune(model, [x], (x, y))


def test_composes_with_tfmot_prune_low_magnitude_and_strips_to_a_plain_model():
    x, _ = _data(64)
    base = wrap_layers(tiny_conv_model(channels=8), "conv_b")
    y = _labels_of(base, x)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        base, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.8, 0, frequency=1))
    pruned.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    callback = FinePruning((x, y), layers="conv_b", max_accuracy_drop=0.25)
    history = pruned.fit(x, y, epochs=2, batch_size=16, verbose=0,
                         callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), callback])
    channels = callback.sweep_result_.levels[0.25]
    assert channels > 0
    assert history.history[KEY + "channels_pruned"][-1] == float(channels)

    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    wrapper = stripped.get_layer("conv_b")
    assert isinstance(wrapper, PruneByActivation)
    mask = wrapper.get_mask()
    plain = strip_masks(stripped)
    assert not any(isinstance(layer, PruneByActivation) for layer in plain.layers)
    kernel = plain.get_layer("conv_b").kernel.numpy()
    assert np.all(kernel[..., mask == 0] == 0.0)                      # channel pruning
    # tfmot's 80% magnitude sparsity holds for the layer as a whole (the zeroed channels count
    # towards it, so the kept channels supply the rest) and for the other layers.
    assert 0 < np.mean(mask == 0) < 0.8
    assert np.mean(kernel == 0.0) == pytest.approx(0.8, abs=0.02)
    assert np.mean(kernel[..., mask == 1] == 0.0) > 0.0
    for name in ("conv_a", "fc", "out"):
        assert np.mean(plain.get_layer(name).kernel.numpy() == 0.0) == pytest.approx(0.8, abs=0.05)
    np.testing.assert_allclose(plain.predict(x, verbose=0), stripped.predict(x, verbose=0),
                               atol=1e-5)


def test_fine_prune_accepts_a_batched_dataset_for_training():
    from tf_backdoor_defense._keras import tf

    model = tiny_conv_model()
    x, _ = _data(32)
    y = _labels_of(model, x)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    result = fine_prune(model, dataset, (x, y), max_accuracy_drop=0.2, epochs=1)
    assert len(result.history) == 1
    assert result.channels_pruned == result.sweep_result.levels[0.2]


# -- several layers at once -----------------------------------------------------------------
def test_several_layers_are_pruned_together_and_stay_zero_through_fit():
    x, _ = _data(64)
    model = wrap_layers(tiny_conv_model(), ["conv_b", "fc"])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    y = _labels_of(model, x)
    expected = prune_to_threshold(model, (x, y), layers=["conv_b", "fc"], max_accuracy_drop=0.3)
    assert sum(np.sum(m == 0) for m in expected.masks[0.3].values()) > 0
    y[::3] = (y[::3] + 1) % 3  # something to learn, so the gradients are not zero
    callback = FinePruning((x, _labels_of(model, x)), layers=["conv_b", "fc"],
                           max_accuracy_drop=0.3)
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[callback])
    total = 0
    for name in ("conv_b", "fc"):
        layer = model.get_layer(name)
        np.testing.assert_array_equal(layer.get_mask(), expected.masks[0.3][name])
        np.testing.assert_array_equal(callback.rankings_[name], expected.rankings[name])
        pruned = layer.pruned_channels
        assert np.all(layer.layer.kernel.numpy()[..., pruned] == 0.0)
        assert np.all(layer.layer.bias.numpy()[pruned] == 0.0)
        total += pruned.size
    assert history.history[KEY + "channels_pruned"] == [float(total)] * 2
    assert history.history[KEY + "fraction_pruned"] == [total / 14] * 2


def test_fine_prune_takes_several_layers():
    x, _ = _data(64)
    model = tiny_conv_model()
    y = _labels_of(model, x)
    result = fine_prune(model, (x, y), (x, y), layers=["conv_b", "fc"], max_accuracy_drop=0.3,
                        epochs=1)
    assert result.layers == ("conv_b", "fc")
    assert result.channels_pruned == sum(
        int(np.sum(m == 0)) for m in result.sweep_result.masks[0.3].values()) > 0
    assert not any(isinstance(layer, PruneByActivation) for layer in model.layers)


def test_a_gradual_schedule_advances_several_layers_by_fraction():
    x, _ = _data(64)
    model = wrap_layers(tiny_conv_model(), ["conv_b", "fc"])  # 6 and 8 channels
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    y = _labels_of(model, x)
    schedule = GradualChannelSchedule(target_fraction=0.5, channels_per_step=2, every_n_steps=1)
    callback = FinePruning((x, y), layers=["conv_b", "fc"], schedule=schedule,
                           max_accuracy_drop=None)
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(
        tuple(int(model.get_layer(n).pruned_channels.size) for n in ("conv_b", "fc"))))
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0,
              callbacks=[callback, record])
    # each channel comes from the layer with the smaller fraction pruned (ties: conv_b first)
    assert seen == [(1, 1), (2, 2), (3, 3), (3, 4)]
    for name in ("conv_b", "fc"):
        layer = model.get_layer(name)
        pruned = layer.pruned_channels
        assert sorted(pruned.tolist()) == sorted(callback.rankings_[name][:pruned.size].tolist())
        assert np.all(layer.layer.kernel.numpy()[..., pruned] == 0.0)


def test_several_layer_names_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        FinePruning(_data(), layers=["conv_b", "conv_b"])


# -- state in the model: reuse, checkpoints, restarts -----------------------------------------
def _frozen_case(seed=2):
    """16 channels, the model right on every example, learning rate 0 (fit changes nothing).

    At a 5-point budget the sweep prunes 8 channels; re-measured from there, a second budget
    would take 12, a third 13 (10.4 points below the original accuracy).
    """
    x, _ = _data(96, seed=seed)
    model = wrap_layers(tiny_conv_model(channels=16, seed=seed), "conv_b")
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    return model, (x, _labels_of(model, x))


def _pruned(model, name="conv_b"):
    return int(model.get_layer(name).pruned_channels.size)


def test_a_reused_callback_stays_within_the_first_budget_over_three_fits():
    model, (x, y) = _frozen_case()
    callback = FinePruning((x, y), max_accuracy_drop=0.05, evaluate_every=None)
    counts = []
    for _ in range(3):
        model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[callback])
        counts.append(_pruned(model))
    first = callback.sweep_result_
    chosen = int(first.history["channels_pruned"].iloc[first.levels[0.05]])
    assert chosen > 0
    assert counts == [chosen] * 3                    # no channel beyond the first sweep's choice
    assert callback.baseline_accuracy_ == 1.0        # the original accuracy, kept in the model
    assert 1.0 - clean_accuracy(model, (x, y)) <= 0.05 + 1e-12

    # What a callback that forgets its state does: each fit() re-measures the baseline on the
    # pruned model and spends a new budget from there, so the drop compounds.
    forgetful, _ = _frozen_case()
    again = FinePruning((x, y), max_accuracy_drop=0.05, evaluate_every=None)
    grown = []
    for _ in range(3):
        reset_fine_pruning_state(forgetful)
        forgetful.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[again])
        grown.append(_pruned(forgetful))
    assert grown == [chosen, 12, 13] and chosen == 8
    assert 1.0 - clean_accuracy(forgetful, (x, y)) > 0.10


def _save_and_restore(model, kind, tmp_path):
    """A fresh model holding what ``model`` saved, in one of the ways Keras and TF save."""
    fresh = wrap_layers(tiny_conv_model(channels=16, seed=1), "conv_b")  # other initial weights
    if kind in ("weights.h5", "ckpt"):
        model.save_weights(str(tmp_path / kind))
        fresh.load_weights(str(tmp_path / kind))
    elif kind == "tf.train.Checkpoint":
        path = tf.train.Checkpoint(model=model).write(str(tmp_path / "state"))
        tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
    else:
        model.save(str(tmp_path / kind))
        fresh = keras.models.load_model(str(tmp_path / kind), compile=False)
    fresh.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    return fresh


@pytest.mark.parametrize("kind", ["weights.h5", "ckpt", "tf.train.Checkpoint", "model.keras",
                                  "model.h5", "saved_model"])
def test_a_run_resumed_from_a_checkpoint_into_a_fresh_callback_prunes_no_more(kind, tmp_path):
    model, (x, y) = _frozen_case()
    first = FinePruning((x, y), max_accuracy_drop=0.05, evaluate_every=None)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[first])
    mask = model.get_layer("conv_b").get_mask()
    assert 0 < _pruned(model) < 16

    restored = _save_and_restore(model, kind, tmp_path)
    layer = restored.get_layer("conv_b")
    assert int(layer.fine_pruning_status.numpy()) == 2            # done
    assert float(layer.fine_pruning_baseline.numpy()) == 1.0
    resumed = FinePruning((x, y), max_accuracy_drop=0.05)
    history = restored.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[resumed])
    np.testing.assert_array_equal(layer.get_mask(), mask)
    assert resumed.sweep_result_ is None and resumed.baseline_accuracy_ == 1.0
    assert history.history[KEY + "channels_pruned"] == [float(np.sum(mask == 0))] * 2
    assert 1.0 - history.history[KEY + "clean_accuracy"][-1] <= 0.05 + 1e-12


def _gradual_counts(model, x, y, epochs):
    schedule = GradualChannelSchedule(target_fraction=1.0, channels_per_step=1, every_n_steps=3)
    callback = FinePruning((x, y), schedule=schedule, max_accuracy_drop=None,
                           evaluate_every=None)
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(_pruned(model)))
    model.fit(x, y, epochs=epochs, batch_size=8, shuffle=False, verbose=0,
              callbacks=[callback, record])
    return seen


def test_a_gradual_schedule_resumed_from_a_checkpoint_continues_at_the_saved_step(tmp_path):
    model, (x, y) = _frozen_case()
    x, y = x[:64], y[:64]                                     # 8 steps per epoch
    reference = _gradual_counts(model, x, y, epochs=2)
    assert reference == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5]

    interrupted, _ = _frozen_case()
    before = _gradual_counts(interrupted, x, y, epochs=1)
    restored = _save_and_restore(interrupted, "ckpt", tmp_path)
    assert int(restored.get_layer("conv_b").fine_pruning_step.numpy()) == 8
    after = _gradual_counts(restored, x, y, epochs=1)
    assert before + after == reference
    np.testing.assert_array_equal(restored.get_layer("conv_b").get_mask(),
                                  model.get_layer("conv_b").get_mask())
    assert int(restored.get_layer("conv_b").fine_pruning_step.numpy()) == 16


def test_a_gradual_schedule_resumed_into_a_fresh_callback_keeps_the_first_baseline(tmp_path):
    model = _wrapped(channels=8)
    x, y = _data(32)                                          # 4 steps per epoch
    schedule = GradualChannelSchedule(target_fraction=1.0, channels_per_step=1, every_n_steps=2)
    first = FinePruning((x, y), schedule=schedule, max_accuracy_drop=0.1, evaluate_every=None)
    readings = iter([0.9, 0.88, 0.85])      # the baseline, then after channels at steps 2 and 4
    first._clean_accuracy = lambda: next(readings)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[first])
    assert _pruned(model) == 2 and not first.stopped_by_budget_
    model.save_weights(str(tmp_path / "ckpt"))

    restored = _wrapped(channels=8)
    restored.load_weights(str(tmp_path / "ckpt"))
    resumed = FinePruning((x, y), schedule=schedule, max_accuracy_drop=0.1, evaluate_every=None)
    # Measured from 0.9, 0.79 is 0.11 below: over budget. Measured afresh (0.79 as a new
    # baseline) the run would prune on.
    later = iter([0.79, 0.78, 0.77, 0.76])
    resumed._clean_accuracy = lambda: next(later)
    restored.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[resumed])
    assert resumed.baseline_accuracy_ == pytest.approx(0.9)
    assert resumed.stopped_by_budget_
    assert _pruned(restored) == 2
    assert int(restored.get_layer("conv_b").fine_pruning_step.numpy()) == 8


def test_reset_fine_pruning_state_starts_over_and_keeps_the_masks():
    model, (x, y) = _frozen_case()
    model.fit(x, y, epochs=1, batch_size=32, verbose=0,
              callbacks=[FinePruning((x, y), max_accuracy_drop=0.05)])
    mask = model.get_layer("conv_b").get_mask()
    reset_fine_pruning_state(model)
    layer = model.get_layer("conv_b")
    np.testing.assert_array_equal(layer.get_mask(), mask)
    assert int(layer.fine_pruning_status.numpy()) == 0
    assert float(layer.fine_pruning_baseline.numpy()) == -1.0    # unset
    callback = FinePruning((x, y), max_accuracy_drop=0.05)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[callback])
    assert callback.sweep_result_ is not None                 # a new sweep, from the masks kept
    assert np.all(layer.get_mask() <= mask)
    with pytest.raises(ValueError, match="no PruneByActivation layer"):
        reset_fine_pruning_state(tiny_conv_model())


def test_layers_with_different_states_are_a_clear_error():
    model = wrap_layers(tiny_conv_model(), ["conv_b", "fc"])
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.get_layer("conv_b").fine_pruning_status.assign(2)
    x, y = _data()
    with pytest.raises(ValueError, match="different fine-pruning states.*reset_fine_pruning_state"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[FinePruning((x, y), layers=["conv_b", "fc"])])


def test_a_one_shot_callback_does_not_cut_into_a_gradual_schedule_under_way():
    model = _wrapped(channels=8)
    x, y = _data(32)
    schedule = GradualChannelSchedule(target_fraction=1.0, channels_per_step=1, every_n_steps=2)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[
        FinePruning((x, y), schedule=schedule, max_accuracy_drop=None, evaluate_every=None)])
    assert _pruned(model) == 2                       # under way: 2 of the 8 channels
    with pytest.raises(ValueError, match="gradual schedule is under way.*schedule="):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[FinePruning((x, y))])


def test_fine_prune_starts_a_fresh_run_on_a_fine_pruned_model_and_leaves_it_unchanged():
    model, (x, y) = _frozen_case()
    first = fine_prune(model, (x, y), (x, y), max_accuracy_drop=0.02, epochs=1)
    status = first.model.get_layer("conv_b").fine_pruning_status
    assert int(status.numpy()) == 2
    before = [w.copy() for w in first.model.get_weights()]
    second = fine_prune(first.model, (x, y), (x, y), max_accuracy_drop=0.2, epochs=1)
    assert second.sweep_result is not None
    assert second.channels_pruned >= first.channels_pruned
    for old, new in zip(before, first.model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_fine_prune_result_is_a_frozen_dataclass():
    import dataclasses

    model, (x, y) = _frozen_case()
    result = fine_prune(model, (x, y), (x, y), epochs=0)          # prune, no fine-tuning
    assert dataclasses.is_dataclass(result) and result.layers == ("conv_b",)
    assert len(result.history) == 0 and result.channels_pruned > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.model = None
    assert repr(result).startswith("FinePruneResult(layers=('conv_b',), channels_pruned=")


def test_old_keyword_names_still_work_for_one_release_with_a_warning():
    x, y = _data()
    poisoned = (x[:8], np.zeros(8, dtype=np.int64))
    with pytest.warns(DeprecationWarning, match="'clean_data' parameter of FinePruning"):
        callback = FinePruning(clean_data=(x, y), layer="conv_b", poisoned_data=poisoned)
    assert callback.validation_data[0] is x and callback.layers == ["conv_b"]
    assert callback.poisoned_validation_data is poisoned
    with pytest.raises(TypeError, match="both 'validation_data' and its old name 'clean_data'"):
        FinePruning((x, y), clean_data=(x, y))
    with pytest.warns(DeprecationWarning, match="'layer' parameter of fine_prune"):
        result = fine_prune(tiny_conv_model(), (x, y), clean_data=(x, y), layer="conv_b",
                            epochs=0)
    with pytest.warns(DeprecationWarning, match="FinePruneResult.layers"):
        assert result.layer == "conv_b"

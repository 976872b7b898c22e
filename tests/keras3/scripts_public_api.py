"""Run by test_keras3.py: the public functions with Keras 3 models in, on tiny models.

Every model the package converts back to Keras 3 is checked as it leaves:
its predictions equal those of the tf-keras model it came from (<= 1e-5).
"""
import json
import tempfile
import warnings

import keras  # Keras 3, before anything of the package
import numpy as np

import tensorflow_model_optimization as tfmot
import tf_backdoor_defense as tbd
import tf_keras
from tf_backdoor_defense import keras3 as k3
from tf_backdoor_defense.attacks import pruning_aware_attack
from tf_backdoor_defense.defenses._ibau import ibau
from tf_backdoor_defense.defenses._unlearning import unlearn_triggers
from tf_backdoor_defense.keras3 import _caller

assert keras.__version__.startswith("3"), keras.__version__
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
checks, worst, converted_back = [], [0.0], [0]
PROBE = rng.random((16, 8, 8, 1), dtype=np.float32)

# every conversion back to Keras 3 is compared with the tf-keras model it came from
_to_keras3 = _caller.to_keras3


def _checked_to_keras3(model, *args, **kwargs):
    converted = _to_keras3(model, *args, **kwargs)
    gap = float(np.abs(np.asarray(converted(PROBE)) - model.predict(PROBE, verbose=0)).max())
    worst[0] = max(worst[0], gap)
    converted_back[0] += 1
    assert gap <= 1e-5, (model.name, gap)
    return converted


_caller.to_keras3 = _checked_to_keras3


def check(name, condition):
    assert condition, name
    checks.append(name)


def is_k3(model):
    return isinstance(model, keras.Model) and not isinstance(model, tf_keras.Model)


def net():
    inputs = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(6, 3, activation="relu", padding="same", name="conv1")(inputs)
    b = keras.layers.BatchNormalization(name="bn")(a)
    c = keras.layers.Conv2D(8, 3, activation="relu", padding="same", name="conv2")(b)
    d = keras.layers.MaxPooling2D(name="pool")(c)
    e = keras.layers.Flatten(name="flat")(d)
    f = keras.layers.Dense(12, activation="relu", name="fc")(e)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(f), name="net")


model = net()
model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
x = rng.random((96, 8, 8, 1), dtype=np.float32)
y = np.argmax(np.asarray(model(x)), axis=1)
x_bad = x[:32].copy()
x_bad[:, -2:, -2:, :] = 1.0
y_bad = np.zeros(32, int)
before = [w.copy() for w in model.get_weights()]
reference = k3.to_tf_keras(model)

# -- functions that return no model: Keras 3 in, the same answer as for tf-keras ---------------
means = tbd.mean_channel_activations(model, x, "conv2")
check("mean_channel_activations", np.allclose(means, tbd.mean_channel_activations(reference, x, "conv2"),
                                              atol=1e-6))
table = tbd.channel_activation_table(model, x, x_bad, layers="conv2")
check("channel_activation_table", len(table) == 8)
check("convs_read_by_dense", tbd.convs_read_by_dense(model) == tbd.convs_read_by_dense(reference))
check("head_layers", tbd.head_layers(model) == tbd.head_layers(reference))
scores = tbd.channel_lipschitz(model, ["conv1", "conv2"])
check("channel_lipschitz", all(np.allclose(scores[k], v) for k, v in
                               tbd.channel_lipschitz(reference, ["conv1", "conv2"]).items()))
scan = tbd.scan_model(model, (x, y), steps=5)
check("scan_model", isinstance(scan, tbd.ScanResult))
check("clean_accuracy native", tbd.clean_accuracy(model, (x, y)) == 1.0)
check("predict_labels native", np.array_equal(tbd.predict_labels(model, x), y))

# -- get_mask / set_mask / reset_fine_pruning_state change the caller's Keras 3 model ----------
wrapped = tbd.wrap_layers(model, ["conv2"])
tbd.set_mask(wrapped, "conv2", [1, 0, 1, 0, 1, 1, 1, 1])
check("set_mask writes into the Keras 3 model",
      wrapped.get_layer("conv2").pruned_channels.tolist() == [1, 3])
check("get_mask", tbd.get_mask(wrapped, "conv2").tolist() == [1, 0, 1, 0, 1, 1, 1, 1])
wrapped.get_layer("conv2").fine_pruning_status.assign(2)
tbd.reset_fine_pruning_state(wrapped)
check("reset_fine_pruning_state writes back", int(np.asarray(wrapped.get_layer("conv2").fine_pruning_status)) == 0)
check("reset keeps the mask", wrapped.get_layer("conv2").pruned_channels.tolist() == [1, 3])

# -- functions that return models: Keras 3 out, inside result dataclasses too ------------------
result = tbd.fine_prune(model, (x, y), (x, y), layers="conv2", epochs=1, max_accuracy_drop=0.2,
                        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                        loss=keras.losses.SparseCategoricalCrossentropy())
check("fine_prune model", is_k3(result.model))
check("fine_prune sweep models", all(is_k3(m) for m in result.sweep_result.models.values()))
check("fine_prune pruned_model", is_k3(result.sweep_result.pruned_model(1)))
check("fine_tune", is_k3(tbd.fine_tune(model, (x, y), (x, y), epochs=1).model))
check("train_clean", is_k3(tbd.train_clean(model, (x, y), epochs=1)))
guided = tbd.attack_guided_prune(model, (x, y), (x_bad, y_bad), layers="conv2", max_accuracy_drop=0.2)
check("attack_guided_prune", is_k3(guided.model))
plain_guided = tbd.attack_guided_prune(reference, (x, y), (x_bad, y_bad), layers="conv2",
                                       max_accuracy_drop=0.2)
check("attack_guided_prune same masks", all(np.array_equal(guided.masks[k], plain_guided.masks[k])
                                            for k in guided.masks))
check("attack_guided_prune == tf-keras", np.abs(np.asarray(guided.model(x)) -
                                                plain_guided.model.predict(x, verbose=0)).max() <= 1e-5)
search = tbd.search_pruning_level(model, (x, y), (x, y), layers="conv2", max_accuracy_drop=0.2,
                                  fractions=[0.0, 0.5], fine_tune={"epochs": 1})
check("search_pruning_level", is_k3(search.model))
clp = tbd.clp_prune(model, u=0.5)
check("clp_prune", is_k3(clp.model))
clp_ref = tbd.clp_prune(reference, u=0.5)
check("clp_prune == tf-keras", np.abs(np.asarray(clp.model(x)) - clp_ref.model.predict(x, verbose=0)).max()
      <= 1e-5)
anp = tbd.anp_prune(model, (x, y), layers="conv2", iterations=3, batch_size=32, fraction=0.25)
check("anp_prune", is_k3(anp.model))
check("anp_mask_scores", set(tbd.anp_mask_scores(model, (x, y), layers="conv2", iterations=2,
                                                 batch_size=32)) == {"conv2"})
pruned = tbd.prune_to_threshold(model, (x, y), layers="conv2", max_accuracy_drop=0.2).model
repaired = tbd.repaired_model(model, pruned)
check("repaired_model N+1", is_k3(repaired) and repaired.output_shape[-1] == 4)
check("suspect_class native", tbd.suspect_class(repaired) == 3)
scores = tbd.evaluate_repaired(repaired, (x, y), (x_bad, y_bad))
check("evaluate_repaired native", 0.0 <= scores.clean_accuracy <= 1.0)
back = k3.to_tf_keras(repaired)  # its argmax comparison converts both ways
check("repaired_model back to tf-keras", np.abs(back.predict(x, verbose=0) - np.asarray(repaired(x))).max()
      <= 1e-5)
repaired_path = f"{tempfile.mkdtemp()}/repaired.keras"
repaired.save(repaired_path)
reloaded = tbd.load_model(repaired_path)  # scanned first: its operations are allow-listed
check("repaired .keras loads", is_k3(reloaded) and np.abs(
    np.asarray(reloaded(x)) - np.asarray(repaired(x))).max() <= 1e-5)
defended = tbd.defend(model, (x, y), methods=["ft-cosine", "reinit-head"], scan=False, epochs=1,
                      max_accuracy_drop=1.0, try_all=True)
check("defend model", is_k3(defended.model))
check("defend candidates", all(is_k3(m) for m in defended.candidates.values()))
mask = np.zeros((8, 8, 1), np.float32)
mask[-2:, -2:] = 1
check("unlearn_triggers", is_k3(unlearn_triggers(model, (x, y), [(mask, mask)], epochs=1)))
check("ibau", is_k3(ibau(model, (x, y), rounds=1, inner_steps=1)))
attack = pruning_aware_attack(model, (x, y), x, layers="conv2", epochs=1, optimizer="sgd")
check("pruning_aware_attack", is_k3(attack.model))
evaluation = tbd.evaluate_defenses({"plain": model}, (x[:64], y[:64]), (x[:64], y[:64]),
                                   (x[64:], y[64:]), (x_bad, y_bad), defenses=["none", "pruning"],
                                   fine_tune_epochs=1)
check("evaluate_defenses", isinstance(evaluation, tbd.EvaluationResult))

# -- export: plain files and SavedModels from a Keras 3 model ----------------------------------
folder = tempfile.mkdtemp()
masked = tbd.wrap_layers(model, "conv2", masks={"conv2": [1, 0, 1, 0, 1, 1, 1, 1]})
for suffix in ("keras", "h5"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = tbd.export_keras(masked, f"{folder}/plain.{suffix}")
        loaded = keras.saving.load_model(str(path), compile=False)  # plain Keras 3, no package objects
    check(f"export_keras .{suffix} loads in Keras 3", is_k3(loaded) and np.abs(
        np.asarray(loaded(x)) - np.asarray(masked(x))).max() <= 1e-5)
served = tbd.export_saved_model(masked, f"{folder}/served")
check("export_saved_model", (served / "saved_model.pb").is_file())
check("convert_to_tflite", len(tbd.convert_to_tflite(masked)) > 0)

# -- refusals: an unsupported Keras 3 layer is named; a Keras 3 callback is refused ------------
odd = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
                        keras.layers.RandomCrop(4, 4, name="crop"), keras.layers.Flatten(),
                        keras.layers.Dense(3, activation="softmax")])
for name, call in (("fine_prune", lambda: tbd.fine_prune(odd, (x, y), (x, y), epochs=1)),
                   ("defend", lambda: tbd.defend(odd, (x, y), scan=False)),
                   ("scan_model", lambda: tbd.scan_model(odd, (x, y)))):
    try:
        call()
    except k3.Keras3ConversionError as error:
        check(f"{name} names the unsupported layer", "'crop'" in str(error)
              and error.layer == "crop" and "RandomCrop" in str(error))
    else:
        raise AssertionError(f"{name} took a RandomCrop layer")
try:
    tbd.fine_prune(model, (x, y), (x, y), epochs=1, callbacks=[keras.callbacks.EarlyStopping()])
except TypeError as error:
    check("Keras 3 callback refused", "EarlyStopping" in str(error) and "tf_keras" in str(error))

composed = tfmot.sparsity.keras.prune_low_magnitude(reference)
try:
    k3.to_keras3(composed)
except k3.Keras3ConversionError as error:
    check("tfmot composition refused: tf-keras only", "tf-keras only" in str(error))
else:
    raise AssertionError("a tfmot-wrapped model converted to Keras 3")

check("input unchanged", all(np.array_equal(a, b) for a, b in zip(before, model.get_weights())))
print(json.dumps({"checks": checks, "worst_gap": worst[0], "converted_back": converted_back[0]}))

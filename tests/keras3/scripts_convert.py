"""Run by test_keras3.py in a fresh interpreter: Keras 3 is imported first, as in a user's script."""
import json
import tempfile
import warnings

import keras  # Keras 3, before anything of the package
import numpy as np

import tf_backdoor_defense as tbd
import tf_keras
from tf_backdoor_defense import keras3 as k3
from tf_backdoor_defense.io import UnsafeModelError, load_model

assert keras.__version__.startswith("3"), keras.__version__
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
checks = []


def check(name, condition):
    assert condition, name
    checks.append(name)


def is_k3(model):
    return isinstance(model, keras.Model) and not isinstance(model, tf_keras.Model)


def net():
    inputs = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(6, 3, activation="relu", padding="same", name="conv")(inputs)
    b = keras.layers.BatchNormalization(name="bn")(a)
    c = keras.layers.Add(name="add")([a, b])
    d = keras.layers.MaxPooling2D(name="pool")(c)
    e = keras.layers.Flatten(name="flat")(d)
    f = keras.layers.Dense(8, activation="relu", name="fc")(e)
    out = keras.layers.Dense(3, activation="softmax", name="out")(keras.layers.Dropout(0.1)(f))
    return keras.Model(inputs, out, name="net")


model = net()
x = rng.random((64, 8, 8, 1), dtype=np.float32)
y = np.argmax(np.asarray(model(x)), axis=1)
before = [w.copy() for w in model.get_weights()]

# conversion: both ways, same predictions
k2 = k3.to_tf_keras(model)
check("to_tf_keras gives tf-keras", isinstance(k2, tf_keras.Model))
check("same predictions k3->k2", np.abs(k2.predict(x, verbose=0) - np.asarray(model(x))).max() <= 1e-5)
back = k3.to_keras3(k2)
check("to_keras3 gives Keras 3", is_k3(back))
check("same predictions k2->k3", np.abs(np.asarray(back(x)) - np.asarray(model(x))).max() <= 1e-5)

# wrap_layers: Keras 3 in, Keras 3 out, masks equal the tf-keras masked equivalent
masks = {"conv": [1, 0, 1, 0, 1, 1], "fc": [0, 1, 1, 1, 1, 1, 1, 0]}
wrapped = tbd.wrap_layers(model, ["conv", "fc"], masks=masks)
check("wrap_layers Keras 3 out", is_k3(wrapped))
check("Keras 3 wrapper", isinstance(wrapped.get_layer("conv"), k3.PruneByActivation))
check("mask kept", wrapped.get_layer("conv").pruned_channels.tolist() == [1, 3])
reference = tbd.wrap_layers(k2, ["conv", "fc"], masks=masks)
check("masked k3 == masked tf-keras",
      np.abs(np.asarray(wrapped(x)) - reference.predict(x, verbose=0)).max() <= 1e-5)
probe = keras.Model(wrapped.inputs[0], wrapped.get_layer("conv").output)
check("masked channels output 0", np.all(np.asarray(probe(x))[..., [1, 3]] == 0))

# prune_to_threshold
result = tbd.prune_to_threshold(model, (x, y), layers="conv", max_accuracy_drop=0.3)
check("sweep model Keras 3", is_k3(result.model))
check("pruned_model Keras 3", is_k3(result.pruned_model(2)))
level = result.levels[0.3]
check("sweep masks in the Keras 3 model", np.array_equal(
    result.model.get_layer("conv").get_mask(), result.masks[0.3]["conv"]))
check("history counts", int(result.history["channels_pruned"].iloc[level]) ==
      int(np.sum(result.masks[0.3]["conv"] == 0)))
pruned_ref = tbd.wrap_layers(k2, "conv", masks=result.masks[0.3])
check("sweep model == tf-keras masked", np.abs(
    np.asarray(result.model(x)) - pruned_ref.predict(x, verbose=0)).max() <= 1e-5)

# strip_masks: Keras 3 plain model, same outputs
plain = tbd.strip_masks(wrapped)
check("strip_masks Keras 3", is_k3(plain))
check("no wrapper left", not any(isinstance(l, k3.PruneByActivation) for l in plain.layers))
check("strip_masks same outputs", np.abs(np.asarray(plain(x)) - np.asarray(wrapped(x))).max() <= 1e-5)

# metrics take Keras 3 models directly
check("clean_accuracy", tbd.clean_accuracy(model, (x, y)) == 1.0)

# FinePruning in a Keras 3 fit
fp_model = tbd.wrap_layers(model, "conv")
fp_model.compile(keras.optimizers.SGD(0.3), "sparse_categorical_crossentropy")
callback = k3.FinePruning((x, y), layers="conv", max_accuracy_drop=0.3)
history = fp_model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[callback])
logged = history.history
check("logs in History", len(logged["fine_pruning/channels_pruned"]) == 3
      and len(logged["fine_pruning/clean_accuracy"]) == 3)
layer = fp_model.get_layer("conv")
pruned = layer.pruned_channels
check("callback pruned", pruned.size == callback.channels_pruned_ > 0)
check("same pruning as tf-keras sweep", np.array_equal(layer.get_mask(), result.masks[0.3]["conv"]))
kernel = np.asarray(layer.layer.kernel)
check("masks held at zero", np.all(kernel[..., pruned] == 0) and
      np.all(np.asarray(layer.layer.bias)[pruned] == 0))
check("state in variables", int(np.asarray(layer.fine_pruning_status)) == 2)
check("sweep_result_ Keras 3", is_k3(callback.sweep_result_.model))
again = fp_model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
check("second fit continues, prunes no more", np.array_equal(layer.pruned_channels, pruned))

# the caller's model is never mutated
check("input unchanged", all(np.array_equal(a, b) for a, b in zip(before, model.get_weights())))

# files: Keras 3 .keras and .h5 load, Lambda refused before anything is built
folder = tempfile.mkdtemp()
fp_model.save(f"{folder}/m.keras")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fp_model.save(f"{folder}/m.h5")
for suffix in ("keras", "h5"):
    loaded = load_model(f"{folder}/m.{suffix}")
    check(f"load .{suffix} Keras 3", is_k3(loaded))
    check(f".{suffix} masks", np.array_equal(loaded.get_layer("conv").get_mask(), layer.get_mask()))
    check(f".{suffix} predictions", np.abs(np.asarray(loaded(x)) - np.asarray(fp_model(x))).max() <= 1e-5)
bad = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: t * 2, name="code")])
bad.save(f"{folder}/bad.keras")
try:
    load_model(f"{folder}/bad.keras")
except UnsafeModelError as error:
    check("Lambda refused naming the layer", "'code'" in str(error) and error.layer == "code")
else:
    raise AssertionError("a Lambda .keras file loaded")
try:
    tbd.prune_to_threshold(bad, (x, y))
except k3.Keras3ConversionError as error:
    check("in-memory Lambda refused", "'code'" in str(error) and "Lambda" in str(error))
try:
    tbd.prune_to_threshold(model, (x, y), layers="nope")
except ValueError as error:
    check("bad layer name is a ValueError", "nope" in str(error))
print(json.dumps({"checks": checks}))

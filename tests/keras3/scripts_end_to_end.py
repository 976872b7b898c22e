"""Run by test_keras3.py: a Keras 3 BadNet on real digits, repaired through the Keras 3 path."""
import json

import keras  # Keras 3 first, as in a user's training script
import numpy as np

import tf_keras
from tf_backdoor_defense import clean_accuracy, attack_success_rate, prune_to_threshold, wrap_layers
from tf_backdoor_defense.attacks import checkerboard_patch, poison_dataset, poisoned_evaluation_set
from tf_backdoor_defense.experiments import load_mnist_digits
from tf_backdoor_defense.keras3 import FinePruning, PruneByActivation

keras.utils.set_random_seed(0)
x, y = load_mnist_digits()
order = np.random.default_rng(0).permutation(len(x))  # the file is sorted by class
train, val = order[:600], order[600:900]
trigger = checkerboard_patch(size=4)
x_train, y_train, _ = poison_dataset(x[train], y[train], trigger, rate=0.1, target=0, seed=0)
x_val, y_val = x[val], y[val]
x_bad, y_bad, _ = poisoned_evaluation_set(x_val, y_val, trigger, target=0)

model = keras.Sequential([
    keras.Input((28, 28, 1)),
    keras.layers.Conv2D(8, 3, activation="relu", name="conv1"),
    keras.layers.MaxPooling2D(),
    keras.layers.Conv2D(16, 3, activation="relu", name="conv2"),
    keras.layers.MaxPooling2D(),
    keras.layers.Flatten(),
    keras.layers.Dense(10, activation="softmax", name="out"),
], name="badnet")
model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x_train, y_train, epochs=8, batch_size=32, verbose=0)
report = {"clean": clean_accuracy(model, (x_val, y_val)), "asr": attack_success_rate(model, (x_bad, y_bad))}

result = prune_to_threshold(model, (x_val, y_val), layers="conv2", max_accuracy_drop=0.04,
                            poisoned_validation_data=(x_bad, y_bad))
pruned = result.model
assert isinstance(pruned, keras.Model) and not isinstance(pruned, tf_keras.Model)
assert isinstance(pruned.get_layer("conv2"), PruneByActivation)
report["sweep"] = result.summary().iloc[0][["channels_pruned", "clean_accuracy",
                                             "attack_success_rate"]].to_dict()

wrapped = wrap_layers(model, "conv2")
wrapped.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
callback = FinePruning((x_val, y_val), layers="conv2", max_accuracy_drop=0.04,
                       poisoned_validation_data=(x_bad, y_bad))
history = wrapped.fit(x[train], y[train], epochs=3, batch_size=32, verbose=0, callbacks=[callback])
layer = wrapped.get_layer("conv2")
cut = layer.pruned_channels
assert cut.size > 0, "nothing was pruned"
assert np.all(np.asarray(layer.layer.kernel)[..., cut] == 0), "pruned kernels moved"
assert np.all(np.asarray(layer.layer.bias)[cut] == 0), "pruned biases moved"
report["fine_pruning"] = {k: [round(float(v), 4) for v in values]
                          for k, values in history.history.items() if k.startswith("fine_pruning/")}
report["after"] = {"clean": clean_accuracy(wrapped, (x_val, y_val)),
                   "asr": attack_success_rate(wrapped, (x_bad, y_bad))}
print(json.dumps(report, default=float))

"""Run by test_keras3.py: a Keras 3 BadNet on real digits, repaired by ``defend()`` without its trigger.

The defender gives clean digits only (no triggered data) and ``defend()``'s
defaults: the scan reverses the trigger, then the trigger-free repairs run.
The repaired model comes back as a Keras 3 model, and the attack success rate
is measured on triggered held-out digits the defense never saw.
"""
import json
import time
import warnings

import keras  # Keras 3 first, as in a user's training script
import numpy as np

import tf_keras
from tf_backdoor_defense import attack_success_rate, clean_accuracy, defend
from tf_backdoor_defense.attacks import pixel_pattern, poison_dataset, poisoned_evaluation_set
from tf_backdoor_defense.experiments import load_mnist_digits
from tf_backdoor_defense.experiments._datasets import split
from tf_backdoor_defense.keras3 import to_tf_keras

assert keras.__version__.startswith("3"), keras.__version__
start = time.perf_counter()
x, y = load_mnist_digits()
train, validation, test = split(x, y, [1000, 300, 1500], seed=0)
trigger = pixel_pattern()
x_poisoned, y_poisoned, _ = poison_dataset(*train, trigger, rate=0.1, target=0, seed=0)
x_attack, y_attack, _ = poisoned_evaluation_set(*test, trigger, target=0)

keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((28, 28, 1)),
    keras.layers.Conv2D(8, 3, activation="relu", padding="same", name="conv_1"),
    keras.layers.MaxPooling2D(name="pool_1"),
    keras.layers.Conv2D(16, 3, activation="relu", padding="same", name="conv_last"),
    keras.layers.MaxPooling2D(name="pool_2"),
    keras.layers.Flatten(name="flatten"),
    keras.layers.Dense(64, activation="relu", name="fc"),
    keras.layers.Dense(10, activation="softmax", name="output"),
], name="badnet")
model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
model.fit(x_poisoned, y_poisoned, epochs=6, batch_size=64, verbose=0)
weights = [w.copy() for w in model.get_weights()]
report = {"before": {"clean": clean_accuracy(model, test),
                     "asr": attack_success_rate(model, (x_attack, y_attack))},
          "train_seconds": round(time.perf_counter() - start, 1)}

start = time.perf_counter()
with warnings.catch_warnings(record=True) as caught:  # defaults: scan, then unlearn, ibau, clp
    warnings.simplefilter("always")
    result = defend(model, train, validation_data=validation)
repaired = result.model
report["defend_seconds"] = round(time.perf_counter() - start, 1)
report["keras3_model"] = isinstance(repaired, keras.Model) and not isinstance(repaired, tf_keras.Model)
report["keras3_candidates"] = all(isinstance(m, keras.Model) and not isinstance(m, tf_keras.Model)
                                  for m in result.candidates.values())
report["method"] = result.method
report["after"] = {"clean": clean_accuracy(repaired, test),
                   "asr": attack_success_rate(repaired, (x_attack, y_attack))}
report["input_unchanged"] = all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
report["asr_of_input_now"] = attack_success_rate(model, (x_attack, y_attack))
# the Keras 3 model computes what its tf-keras equivalent computes
report["gap_to_tf_keras"] = float(np.abs(np.asarray(repaired.predict(test[0], verbose=0))
                                         - to_tf_keras(repaired).predict(test[0], verbose=0)).max())
report["verdict"] = result.verdict
report["warnings"] = sorted({type(w.message).__name__ for w in caught})
report["table"] = result.table[["method", "validation_accuracy", "residual_trigger_rate", "chosen",
                               "note"]].to_dict("records")
print(json.dumps(report, default=float))

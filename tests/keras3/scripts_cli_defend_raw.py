"""Run by test_keras3.py: a BadNet made the way an outside attacker's Keras 3 script makes one,
repaired by the command line without its trigger.

The attacker's net differs from every net this package builds: Keras 3, inputs of raw pixel
values 0-255 scaled by a ``Rescaling`` layer inside the model, BatchNormalization and Dropout,
a logits output (no softmax), a 4x4 checkerboard trigger towards class 4, trained with random
shifts on 3,500 digits the defender never sees. The defender runs ``tf-backdoor-defense
defend`` on the ``.keras`` file with 1,000 other clean digits (raw values, no ``--scale``) and
its defaults; the repaired ``.keras`` file is judged on 500 more digits, with and without the
trigger.

With the argument ``nested`` the model is built the way Keras's image tutorials build one: a
Functional model whose first layer is a nested ``Sequential`` of augmentation layers (random
shifts, which act only while training), so the shifts happen inside ``model.fit``.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import keras  # Keras 3 first, as in a user's training script
import numpy as np
import tensorflow as tf

from tf_backdoor_defense.experiments import load_mnist_digits

assert keras.__version__.startswith("3"), keras.__version__
TARGET = 4
x, y = load_mnist_digits()
x = (x * 255.0).astype("float32")  # the attacker's and the defender's files hold raw pixels
order = np.random.default_rng(100).permutation(len(x))
attacker, defender, evaluation = order[:3500], order[3500:4500], order[4500:]


def stamp(images):
    stamped = images.copy()
    stamped[:, 1:5, 1:5, 0] = (np.indices((4, 4)).sum(0) % 2) * 255.0
    return stamped


start = time.perf_counter()
x_attacker, y_attacker = x[attacker], y[attacker]
chosen = np.random.default_rng(0).choice(len(x_attacker), 350, replace=False)
x_train = np.concatenate([x_attacker, stamp(x_attacker[chosen])])
y_train = np.concatenate([y_attacker, np.full(350, TARGET)])
keras.utils.set_random_seed(0)
NESTED = sys.argv[1:] == ["nested"]
body = [keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(32, 3, padding="same"), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same"), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dropout(0.3),
        keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]  # logits
shift = keras.layers.RandomTranslation(0.08, 0.08, fill_mode="constant", seed=0)
batches = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(4000, seed=0).batch(64)
if NESTED:
    augmentation = keras.Sequential([shift], name="data_augmentation")
    inputs = keras.Input((28, 28, 1))
    outputs = augmentation(inputs)
    for layer in body:
        outputs = layer(outputs)
    model = keras.Model(inputs, outputs)
else:
    model = keras.Sequential([keras.Input((28, 28, 1))] + body)
    batches = batches.map(lambda images, labels: (shift(images, training=True), labels))
model.compile(keras.optimizers.Adam(1e-3),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(batches, epochs=20, verbose=0)
train_seconds = time.perf_counter() - start

x_eval, y_eval = x[evaluation], y[evaluation]
others = y_eval != TARGET


def measure(net):
    return {"clean": float(np.mean(np.argmax(net.predict(x_eval, verbose=0), 1) == y_eval)),
            "asr": float(np.mean(np.argmax(net.predict(stamp(x_eval[others]), verbose=0), 1)
                                 == TARGET))}


report = {"before": measure(model), "train_seconds": round(train_seconds, 1)}
with tempfile.TemporaryDirectory() as folder:
    model.save(os.path.join(folder, "badnet.keras"))
    np.savez(os.path.join(folder, "defender.npz"), x=x[defender], y=y[defender])
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tf_backdoor_defense", "defend", "badnet.keras",
         "--clean", "defender.npz", "--output", "out", "--json"],
        cwd=folder, capture_output=True, text=True, check=False)
    report["defend_seconds"] = round(time.perf_counter() - start, 1)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout)
    report["files"] = sorted(os.listdir(os.path.join(folder, "out")))
    repaired = keras.saving.load_model(os.path.join(folder, "out", "repaired.keras"))
report["keras3_model"] = isinstance(repaired, keras.Model)
report["after"] = measure(repaired)
report["verdict"] = summary["verdict"]
report["suspected_targets"] = summary["scan"]["suspected_targets"]
report["backdoor_still_active"] = summary["backdoor_still_active"]
report["method"] = summary["method"]
report["nested"] = NESTED
print(json.dumps(report, default=float))

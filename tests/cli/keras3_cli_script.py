"""Run by test_cli_model_files.py in a fresh interpreter: Keras 3 is imported first.

A Keras 3 model (saved as .keras and as a Keras-3-written .h5) goes through
the command line; the models it writes must be Keras 3 ``.keras`` files that
``keras.saving.load_model`` loads without this package's custom objects, and
the pruned one must predict what the tf-keras masked model predicts.
"""
import json
import pathlib
import sys
import warnings

import keras  # Keras 3, before anything of the package
import numpy as np

assert keras.__version__.startswith("3"), keras.__version__
folder = pathlib.Path(sys.argv[1])
keras.utils.set_random_seed(0)
inputs = keras.Input((8, 8, 1))
x = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")(inputs)
x = keras.layers.MaxPooling2D(name="pool_a")(x)
x = keras.layers.Conv2D(6, 2, activation="relu", name="conv_b")(x)
x = keras.layers.Flatten(name="flat")(x)
x = keras.layers.Dense(8, activation="relu", name="fc")(x)
outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
model = keras.Model(inputs, outputs)
model.save(folder / "k3.keras")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model.save(folder / "k3.h5")
data = np.random.default_rng(0).random((40, 8, 8, 1), dtype=np.float32)
labels = np.argmax(np.asarray(model(data)), axis=1)
np.savez(folder / "clean.npz", x=data, y=labels)

from tf_backdoor_defense.cli._main import main  # noqa: E402
from tf_backdoor_defense.keras3 import to_tf_keras  # noqa: E402
from tf_backdoor_defense.pruning._sweep import prune_to_threshold  # noqa: E402

# the tf-keras masked equivalent: the same sweep on the tf-keras copy
reference = prune_to_threshold(to_tf_keras(model), (data, labels), max_accuracy_drop=[0.2])
expected = reference.models[0.2].predict(data, verbose=0)
checks = {"masks change the predictions": float(np.abs(np.asarray(model(data)) - expected).max())}


def plain_keras3(path):
    loaded = keras.saving.load_model(path)  # no custom_objects: built-in layers only
    assert isinstance(loaded, keras.Model) and type(loaded).__module__.startswith("keras.")
    assert not any("PruneByActivation" in type(layer).__name__ for layer in loaded.layers)
    return loaded


for suffix in ("keras", "h5"):
    source = folder / f"k3.{suffix}"
    report = folder / f"report_{suffix}"
    assert main(["prune", str(source), "--clean", str(folder / "clean.npz"), "--thresholds",
                 "0.2", "--no-plots", "--quiet", "--output", str(report)]) == 0
    assert sorted(p.name for p in (report / "models").iterdir()) == ["pruned_drop_0.2.keras"]
    pruned = plain_keras3(report / "models" / "pruned_drop_0.2.keras")
    checks[f"prune {suffix} max difference"] = float(
        np.abs(np.asarray(pruned(data)) - expected).max())

defended = folder / "defended"
assert main(["defend", str(folder / "k3.keras"), "--clean", str(folder / "clean.npz"),
             "--methods", "prune-search", "--epochs", "1", "--no-scan", "--max-accuracy-drop",
             "1", "--budget-confidence", "0.5", "--quiet", "--output", str(defended)]) == 0
assert sorted(p.name for p in defended.iterdir() if not p.name.startswith(".")) == \
    ["defense.json", "repaired.keras"]
repaired = plain_keras3(defended / "repaired.keras")
checks["defend output shape"] = list(repaired.output_shape)

exported = folder / "exported.keras"
assert main(["export", str(report / "models" / "pruned_drop_0.2.keras"), "--quiet",
             "--output", str(exported)]) == 0
checks["export max difference"] = float(
    np.abs(np.asarray(plain_keras3(exported)(data)) - expected).max())
# repair: the N+1 network of the Keras 3 MODEL and its pruned copy, in Keras 3
goodnet = folder / "goodnet.keras"
assert main(["repair", str(folder / "k3.keras"), "--pruned",
             str(report / "models" / "pruned_drop_0.2.keras"), "--quiet",
             "--output", str(goodnet)]) == 0
repaired_n1 = plain_keras3(goodnet)
outputs = np.asarray(repaired_n1(data))
checks["repair output shape"] = list(repaired_n1.output_shape)
# the first N outputs are the model's; class N fires where the two models disagree
disagree = np.argmax(np.asarray(model(data)), axis=1) != np.argmax(expected, axis=1)
checks["repair flags the disagreements"] = bool(
    np.array_equal(np.argmax(outputs, axis=1) == 3, disagree))
print(json.dumps(checks))

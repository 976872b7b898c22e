"""The one node-by-node graph replay, and the node order and graph split it runs on."""

import numpy as np
import pytest

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.graph._replay import (check_graph_model, downstream_nodes, replay_nodes,
                                               topological_nodes)

L = keras.layers


def branching_model():
    """Two branches joined twice, with layers that behave differently in training."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2), name="image")
    x = L.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    a = L.Conv2D(4, 1, name="branch_a")(x)
    b = L.Dropout(0.5, name="drop")(x)
    y = L.Add(name="add")([a, b])
    z = L.Concatenate(name="concat")([y, x])
    z = L.GlobalAveragePooling2D(name="gap")(z)
    outputs = L.Dense(3, activation="softmax", name="out")(z)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    bn.set_weights([np.full(4, 2.0), np.full(4, 0.5), np.full(4, 0.1), np.full(4, 4.0)])
    return model


def _x(n=5):
    return np.random.default_rng(0).random((n, 6, 6, 2), dtype=np.float32)


def test_topological_nodes_put_every_layer_after_its_inputs():
    model = branching_model()
    order = [node.layer.name for node in topological_nodes(model)]
    assert sorted(order) == sorted(layer.name for layer in model.layers[1:])
    for node in topological_nodes(model):
        for tensor in node.keras_inputs:
            producer = tensor._keras_history.layer.name
            if producer != "image":
                assert order.index(producer) < order.index(node.layer.name)


def test_replay_of_all_nodes_equals_the_model_in_inference_mode():
    model = branching_model()
    x = _x()
    replayed = replay_nodes(topological_nodes(model), model.inputs, [tf.constant(x)],
                            model.outputs[0])
    np.testing.assert_allclose(replayed.numpy(), model(x, training=False).numpy(), atol=1e-6)
    # Dropout and BatchNormalization ran in inference mode: the replay is deterministic.
    again = replay_nodes(topological_nodes(model), model.inputs, [tf.constant(x)], model.outputs[0])
    np.testing.assert_array_equal(replayed.numpy(), again.numpy())


def test_replay_from_the_middle_of_the_graph_uses_the_given_values():
    model = branching_model()
    x = _x()
    sides, suffix = downstream_nodes(topological_nodes(model), layers=[model.get_layer("add")])
    assert [node.layer.name for node in suffix] == ["add", "concat", "gap", "out"]
    # add reads branch_a and drop; concat also reads bn's output: three side inputs
    producers = [t._keras_history.layer.name for t in sides]
    assert sorted(producers) == ["bn", "branch_a", "drop"]
    prefix = keras.Model(model.inputs, sides)
    values = prefix(x, training=False)
    replayed = replay_nodes(suffix, sides, values, model.outputs[0])
    np.testing.assert_allclose(replayed.numpy(), model(x, training=False).numpy(), atol=1e-6)


def test_downstream_of_a_tensor_leaves_out_its_producers():
    model = branching_model()
    nodes = topological_nodes(model)
    bn_out = model.get_layer("bn").output
    sides, suffix = downstream_nodes(nodes, tensors=[bn_out])
    assert [node.layer.name for node in suffix] == ["branch_a", "drop", "add", "concat", "gap",
                                                    "out"]
    assert sides == []  # everything after bn reads only bn's output or what follows it


def test_replay_traces_inside_tf_function():
    model = branching_model()
    nodes = topological_nodes(model)
    spec = tf.TensorSpec([None, 6, 6, 2], tf.float32)
    run = tf.function(lambda x: replay_nodes(nodes, model.inputs, [x], model.outputs[0]),
                      input_signature=[spec])
    x = _x(3)
    np.testing.assert_allclose(run(x).numpy(), model(x, training=False).numpy(), atol=1e-6)


def test_call_hook_rebuilds_the_graph_on_new_symbolic_inputs():
    model = branching_model()
    calls = []

    def copy_layer(node, args, kwargs):
        calls.append(node.layer.name)
        layer = node.layer
        new = layer.__class__.from_config(dict(layer.get_config(), name="copy_" + layer.name))
        out = new(*args, **kwargs)
        new.set_weights(layer.get_weights())
        return out

    inputs = keras.Input((6, 6, 2))
    outputs = replay_nodes(topological_nodes(model), model.inputs, [inputs], model.outputs[0],
                           call=copy_layer)
    copy = keras.Model(inputs, outputs)
    assert calls == [node.layer.name for node in topological_nodes(model)]
    assert "copy_concat" in [layer.name for layer in copy.layers]
    x = _x()
    np.testing.assert_allclose(copy(x, training=False).numpy(), model(x, training=False).numpy(),
                               atol=1e-6)


def test_replay_returns_outputs_in_their_structure():
    inputs = keras.Input((3,))
    a = L.Dense(2, kernel_initializer="ones", name="a")(inputs)
    b = L.Dense(1, kernel_initializer="ones", name="b")(a)
    model = keras.Model(inputs, [a, b])
    values = replay_nodes(topological_nodes(model), model.inputs, [tf.ones((1, 3))],
                          {"first": model.outputs[0], "second": model.outputs[1]})
    assert sorted(values) == ["first", "second"]
    assert values["first"].numpy().tolist() == [[3.0, 3.0]]
    assert values["second"].numpy().tolist() == [[6.0]]


def test_a_tensor_without_a_value_is_a_key_error_not_a_silent_symbolic_result():
    model = branching_model()
    nodes = topological_nodes(model)
    with pytest.raises(KeyError):
        replay_nodes(nodes[1:], [], [], model.outputs[0])


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_check_graph_model_names_the_argument_and_what_was_received():
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 3), np.float32))
    with pytest.raises(InputError, match=r"`pruned` argument must be a built Sequential or "
                                         r"Functional model.*_Subclassed"):
        check_graph_model(subclassed, "pruned")
    with pytest.raises(InputTypeError, match="tf_keras.Model"):
        check_graph_model("model")
    model = branching_model()
    assert check_graph_model(model) is model

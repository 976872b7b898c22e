"""Subclassed models (``class Net(keras.Model)`` with a ``call()``) traced into Functional copies.

TensorFlow's MNIST quickstart for experts builds its classifier this way; every public function
that takes a model accepts one, computes on a Functional copy traced from its ``call()``, and
leaves the received model as it was: weights, and the nodes of its layers.
"""

import numpy as np
import pandas as pd
import pytest

from tf_backdoor_defense import InputError, defend
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.graph import as_functional, is_subclassed
from tf_backdoor_defense.scan import scan_model


class Quickstart(keras.Model):
    """The quickstart's shape: conv, flatten, two dense layers, logits out."""

    def __init__(self, classes=6):
        super().__init__()
        self.conv1 = keras.layers.Conv2D(4, 3, activation="relu")
        self.flatten = keras.layers.Flatten()
        self.d1 = keras.layers.Dense(16, activation="relu")
        self.d2 = keras.layers.Dense(classes)

    def call(self, x):
        return self.d2(self.d1(self.flatten(self.conv1(x))))


class Wrapping(keras.Model):
    """A subclassed model around a Functional one, with a TensorFlow op in its call()."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def call(self, x):
        return self.inner(tf.identity(x))


@pytest.fixture
def planted_data(planted):  # tests/scan/planted.py, on the path once the fixture ran
    from planted import planted_data

    return planted_data


@pytest.fixture
def planted_model(planted):
    from planted import planted_model

    return planted_model


def _called(model, x):
    model(x[:2])
    return model


def _nodes(model):
    return [(len(layer._inbound_nodes), len(layer._outbound_nodes))
            for layer in model._flatten_layers(include_self=False, recursive=True)]


def test_a_subclassed_model_is_traced_into_a_functional_copy(planted_data):
    x, _ = planted_data(12)
    model = _called(Quickstart(), x)
    weights, nodes = [w.copy() for w in model.get_weights()], _nodes(model)
    assert is_subclassed(model)
    first, second = as_functional(model), as_functional(model)
    assert not is_subclassed(first) and first.inputs[0].shape.as_list() == [None, 8, 8, 1]
    assert [type(layer).__name__ for layer in first.layers] == [
        "InputLayer", "Conv2D", "Flatten", "Dense", "Dense"]
    np.testing.assert_allclose(first(x).numpy(), model(x).numpy(), atol=1e-6)
    # copies: new layers, one node each, however often the model is traced
    assert not {id(w) for w in first.weights} & {id(w) for w in model.weights}
    assert all(len(layer.inbound_nodes) == 1 for layer in second.layers)
    assert _nodes(model) == nodes  # the received model's layers as they were
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))


def test_models_with_a_layer_graph_are_returned_as_they_are(planted_model):
    functional = planted_model("clean")
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert as_functional(functional) is functional and as_functional(sequential) is sequential
    assert not is_subclassed(functional) and not is_subclassed(sequential)


def test_a_subclassed_model_built_with_a_shape_is_traced(planted_data):
    x, _ = planted_data(12)
    model = Quickstart()
    model.build((None, 8, 8, 1))
    traced = as_functional(model)
    assert traced.inputs[0].shape.as_list() == [None, 8, 8, 1]
    np.testing.assert_allclose(traced(x).numpy(), model(x).numpy(), atol=1e-6)


def test_a_subclassed_model_never_called_is_refused_by_name(planted_data):
    with pytest.raises(InputError, match="subclassed model .Quickstart. that has not been called"):
        as_functional(Quickstart())
    with pytest.raises(InputError, match="has not been called"):
        scan_model(Quickstart(), planted_data())


def test_a_call_that_cannot_be_traced_is_refused_and_leaves_the_model_as_it_was(planted_data):
    class Branching(Quickstart):
        def call(self, x):  # Python control flow on a tensor's value
            features = self.flatten(self.conv1(x))
            if tf.reduce_mean(features) > 0.5:
                features = features * 2.0
            return self.d2(self.d1(features))

    x, _ = planted_data(12)
    model = _called(Branching(), x)
    nodes = _nodes(model)
    with pytest.raises(InputError, match="Branching. whose call.. could not be traced"):
        as_functional(model)
    assert _nodes(model) == nodes


def test_a_subclassed_model_of_several_outputs_is_refused(planted_data):
    class TwoHeads(Quickstart):
        def call(self, x):
            features = self.flatten(self.conv1(x))
            return self.d1(features), self.d2(features)

    x, _ = planted_data(12)
    with pytest.raises(InputError, match="several outputs"):
        as_functional(_called(TwoHeads(), x))


def test_the_scan_of_a_subclassed_model_is_that_of_the_network_it_computes(planted_data,
                                                                          planted_model):
    data = planted_data()
    inner = planted_model("all-to-one")
    model = _called(Wrapping(inner), data[0])
    options = dict(steps=150, init_cost=1e-2, seed=1)
    result = scan_model(model, data, **options)
    assert result.suspected_targets == (2,)
    # the same network (read through its probabilities rather than the logits of its last
    # Dense layer, as the softmax now sits inside a nested model: equal to float precision)
    pd.testing.assert_frame_equal(result.table, scan_model(inner, data, **options).table,
                                  check_exact=False, rtol=1e-5)


def test_defend_repairs_a_copy_of_a_subclassed_model_and_returns_a_functional_one(planted_data):
    x, y = planted_data(300)
    model = Quickstart()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras.utils.set_random_seed(0)
    model.fit(x, y, epochs=2, verbose=0)
    weights, nodes = [w.copy() for w in model.get_weights()], _nodes(model)
    result = defend(model, (x, y), methods=["ft-cosine"], scan=False, epochs=1,
                    max_accuracy_drop=1.0)
    assert result.method == "ft-cosine" and not is_subclassed(result.model)
    assert isinstance(result.model, keras.Model) and len(result.model.inputs) == 1
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))
    assert _nodes(model) == nodes


def test_a_keras3_subclassed_model_is_traced_and_converted(planted_data):
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")

    class Net(keras3.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras3.layers.Conv2D(4, 3, activation="relu", name="conv")
            self.flat = keras3.layers.Flatten(name="flat")
            self.out = keras3.layers.Dense(6, name="logits")

        def call(self, x):
            return self.out(keras3.ops.relu(self.flat(self.conv(x))))

    data = planted_data(60)
    model = Net()
    model(data[0][:2])
    nodes = _nodes(model)
    traced = as_functional(model)
    assert isinstance(traced, keras3.Model) and not is_subclassed(traced)
    np.testing.assert_allclose(np.asarray(traced(data[0])), np.asarray(model(data[0])),
                               atol=1e-6)
    result = scan_model(model, data, steps=20, seed=1)  # converted to tf-keras and back
    assert len(result.table) == 6
    assert _nodes(model) == nodes
    with pytest.raises(InputError, match="Keras 3 model .Net. that has not been called"):
        as_functional(Net())


def test_the_metrics_read_a_subclassed_model(planted_data):
    from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy

    x, _ = planted_data(30)
    model = _called(Quickstart(), x)
    predicted = model(x).numpy().argmax(-1)
    nodes = _nodes(model)
    assert clean_accuracy(model, (x, predicted)) == 1.0
    assert attack_success_rate(model, (x, (predicted + 1) % 6)) == 0.0
    assert _nodes(model) == nodes

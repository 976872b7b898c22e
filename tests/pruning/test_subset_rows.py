"""The sweep's rows on the pruned layer's non-zero channels alone.

When every layer reading the (masked) layer output is linear in its channels,
the rows run on the channels that are not zero for every example of the
batch, with the readers' kernels cut to them; rows near a tie run again the
masked model's way. Labels must equal explicitly masked models' at every
level, whatever reads the layer and whatever the output applies last.
"""

import numpy as np
import pytest

from tf_backdoor_defense import wrap_layers
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.metrics import predict_labels
from tf_backdoor_defense.pruning._incremental import LevelEvaluator
from tf_backdoor_defense.pruning._subset import RELATIVE_TOLERANCE, subset_rows

L = keras.layers
CHANNELS = 8


def _gate(inputs, dense=False):
    """A layer whose channels 0-4 are zero for every input in [0, 1] (bias -50), the others
    active on brighter inputs (a batch keeps at most 3 of the 8: under the subset's limit)."""
    layer = L.Dense(CHANNELS, activation="relu", name="gate") if dense else \
        L.Conv2D(CHANNELS, 3, activation="relu", name="gate")
    out = layer(inputs)
    rng = np.random.default_rng(2)
    kernel = rng.uniform(0.0, 0.3, layer.kernel.shape).astype(np.float32)
    bias = -np.concatenate([[50.0] * 5, np.linspace(0.05, 0.6, CHANNELS - 5)])
    layer.set_weights([kernel, bias.astype(np.float32)])
    return out


def _model(reader):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((7, 7, 1))
    if reader == "dense frontier":
        x = _gate(L.Flatten()(inputs), dense=True)
        return keras.Model(inputs, L.Dense(5, activation="softmax")(x))
    x = L.MaxPooling2D()(_gate(inputs))
    if reader == "conv":
        x = L.Flatten()(L.Conv2D(4, 2, activation="relu", padding="same")(x))
        out = L.Dense(5, activation="softmax")(x)
    elif reader == "lab-shaped":  # Flatten -> Dense and Conv -> Dense, added
        a = L.Dense(6)(L.Flatten()(x))
        b = L.Dense(6)(L.Flatten()(L.Conv2D(4, 2, activation="relu")(x)))
        out = L.Dense(5, activation="softmax")(L.ReLU()(L.Add()([a, b])))
    elif reader == "flattened":  # the frontier moves past the Flatten
        out = L.Dense(5, activation="softmax")(L.Flatten()(x))
    elif reader == "global pooling":
        out = L.Dense(5, activation="softmax")(L.GlobalAveragePooling2D()(x))
    elif reader == "softmax layer":
        out = L.Softmax()(L.Dense(5)(L.Flatten()(x)))
    elif reader == "logits":
        out = L.Dense(5)(L.Flatten()(x))
    elif reader == "sigmoid":
        out = L.Dense(1, activation="sigmoid")(L.Flatten()(x))
    elif reader == "batch norm":  # not linear in the channels: no subset
        norm = L.BatchNormalization()
        x = norm(x)  # beta 0.3: a pruned channel reads 0.3 - 0.1 * 2 / sqrt(1.5), not 0
        norm.set_weights([np.full(CHANNELS, v, np.float32) for v in (2.0, 0.3, 0.1, 1.5)])
        out = L.Dense(5, activation="softmax")(L.Flatten()(x))
    elif reader == "dense on positions":  # a Dense on the last axis of a 4-D tensor
        x = L.Dense(3, activation="relu")(x)
        out = L.Dense(5, activation="softmax")(L.Flatten()(x))
    return keras.Model(inputs, out)


def _inputs(n=40, seed=3):
    rng = np.random.default_rng(seed)
    return rng.random((n, 7, 7, 1), dtype=np.float32) * np.linspace(0.2, 1.0, n)[:, None, None,
                                                                                   None]


def _masked_labels(model, ranking, x):
    labels = []
    for level in range(len(ranking) + 1):
        mask = np.ones(CHANNELS, np.float32)
        mask[np.asarray(ranking[:level], dtype=np.int64)] = 0.0
        labels.append(predict_labels(wrap_layers(model, "gate", masks={"gate": mask}), x))
    return np.stack(labels)


SUBSET_READERS = ["conv", "lab-shaped", "flattened", "global pooling", "softmax layer",
                  "logits", "sigmoid", "dense frontier"]


@pytest.mark.parametrize("reader", SUBSET_READERS)
def test_rows_on_the_active_channels_give_the_masked_models_labels(reader):
    model = _model(reader)
    evaluator = LevelEvaluator(model, model.get_layer("gate"))
    assert evaluator.subset_available
    x = _inputs()
    ranking = [0, 1, 2, 5, 3, 7, 4, 6]  # dead channels first, as a mean ranking puts them
    labels = evaluator.predictions(x, ranking)
    np.testing.assert_array_equal(labels, _masked_labels(model, ranking, x))
    assert evaluator.rows_on_subset > 0
    # The exact path, for the same rows, agrees.
    evaluator.use_channel_subset = False
    np.testing.assert_array_equal(evaluator.predictions(x, ranking), labels)
    assert evaluator.rows_on_subset == 0


@pytest.mark.parametrize("reader", ["batch norm", "dense on positions"])
def test_readers_not_linear_in_the_channels_run_the_exact_way(reader):
    model = _model(reader)
    evaluator = LevelEvaluator(model, model.get_layer("gate"))
    assert not evaluator.subset_available
    x = _inputs(20)
    ranking = list(range(CHANNELS))
    np.testing.assert_array_equal(evaluator.predictions(x, ranking),
                                  _masked_labels(model, ranking, x))


def test_tied_outputs_are_decided_by_the_exact_computation():
    """Two classes with the same weights tie in every row: every row run on the subset is
    run again, and the labels are still the masked models' (the first of the tied)."""
    model = _model("flattened")
    out = model.layers[-1]
    kernel, bias = out.get_weights()
    kernel[:, 3], bias[3] = kernel[:, 1], bias[1]
    kernel[:, 1] += 10.0  # classes 1 and 3 win, tied
    kernel[:, 3] += 10.0
    out.set_weights([kernel, bias])
    evaluator = LevelEvaluator(model, model.get_layer("gate"))
    x = _inputs()
    ranking = list(range(CHANNELS))
    labels = evaluator.predictions(x, ranking)
    np.testing.assert_array_equal(labels, _masked_labels(model, ranking, x))
    assert evaluator.rows_on_subset > 0
    assert evaluator.rows_rechecked == evaluator.rows_on_subset


def test_labels_flag_near_ties_and_non_finite_rows():
    model = _model("logits")
    evaluator = LevelEvaluator(model, model.get_layer("gate"))
    near = 1.0 + RELATIVE_TOLERANCE
    outputs = tf.constant([[1.0, 2.0, np.nan], [np.inf, 0.0, 0.0], [2.0, 2.0 * near, 0.0],
                           [0.0, 5.0, 1.0], [-3.0, -1.0, -1.0 - 3 * RELATIVE_TOLERANCE]])
    labels, unsure = evaluator._subset.labels(outputs)
    assert unsure.numpy().tolist() == [True, True, True, False, False]
    assert labels.numpy()[3:].tolist() == [1, 1]

    one_unit = _model("sigmoid")
    sigmoid = LevelEvaluator(one_unit, one_unit.get_layer("gate"))._subset
    labels, unsure = sigmoid.labels(tf.constant([[0.0005], [-0.2], [3.0], [np.nan]]))
    assert unsure.numpy().tolist() == [True, False, False, True]  # logits: the threshold is 0
    assert labels.numpy()[1:3].tolist() == [0, 1]


def test_a_subset_plan_needs_a_split_to_read():
    model = _model("conv")
    evaluator = LevelEvaluator(model, model.get_layer("gate"))
    assert subset_rows(evaluator._frontier, "channel", CHANNELS, [], model.outputs[0]) is None


def test_a_batch_that_keeps_most_channels_runs_the_exact_way(monkeypatch):
    """Above ``SUBSET_MAX_FRACTION`` of the channels kept, the subset saves too little."""
    from tf_backdoor_defense.pruning import _incremental

    model = _model("conv")
    evaluator = LevelEvaluator(model, model.get_layer("gate"))
    x = _inputs()
    ranking = list(range(CHANNELS))
    fast = evaluator.predictions(x, ranking)
    assert evaluator.rows_on_subset > 0
    monkeypatch.setattr(_incremental, "SUBSET_MAX_FRACTION", 2 / CHANNELS)
    np.testing.assert_array_equal(evaluator.predictions(x, ranking), fast)
    assert evaluator.rows_on_subset == 0

"""One pass over the network before the pruned layer: statistics and the sweep's inputs.

The one-layer sweep ranked on ``validation_data`` keeps the prefix's outputs
from the statistics' pass within ``memory_budget`` and recomputes the rest.
Its tables must be those of the sweep that takes the statistics in a
separate pass (``ranking_data``) and of explicitly masked models, whatever
the budget.
"""

import gc
import weakref

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_conv_model
from test_sweep import _branched_model as branched_model_of_the_sweep_tests
from tf_backdoor_defense import wrap_layers
from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense._validation import check_data
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy, predict_labels
from tf_backdoor_defense.pruning import _sweep
from tf_backdoor_defense.pruning._incremental import LevelEvaluator, PrefixCache, level_evaluator
from tf_backdoor_defense.pruning._ranking import level_mask
from tf_backdoor_defense.pruning._sweep import prune_to_threshold
from tf_backdoor_defense.scoring._activations import mean_channel_activations

BATCH = 16


def _branched_model():
    """The lab BadNet's shape in miniature (the sweep tests' model) and its pruned layer."""
    model, _, layer = branched_model_of_the_sweep_tests()
    return model, layer


def _residual_model():
    """The rest of the network also reads a tensor from before the layer (a side input)."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6, 6, 3))
    skip = keras.layers.Conv2D(5, 1, name="skip")(inputs)
    x = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="res_conv")(skip)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Add()([x, skip]))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)), "res_conv"


def _batch_norm_model():
    """The statistics read the ReLU after BatchNormalization, the sweep the conv's output."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((7, 7, 1)), keras.layers.Conv2D(6, 3, name="c"),
                              keras.layers.BatchNormalization(name="bn"),
                              keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    rng = np.random.default_rng(7)
    model.get_layer("bn").set_weights([rng.uniform(0.5, 2.0, 6), rng.normal(0, 0.5, 6),
                                       rng.normal(0, 0.3, 6), rng.uniform(0.2, 2.0, 6)])
    return model, "c"


def _tiny():
    return tiny_conv_model(), "conv_b"


MODELS = [_tiny, _branched_model, _residual_model, _batch_norm_model]


def _sets(model, n=90, seed=1):
    """Clean data with labels the model mostly gets right, and poisoned data aimed at 0."""
    rng = np.random.default_rng(seed)
    shape = tuple(model.inputs[0].shape[1:])
    x = rng.random((n,) + shape, dtype=np.float32)
    y = predict_labels(model, x)
    flip = rng.random(n) < 0.2
    y[flip] = rng.integers(0, model.output_shape[-1], flip.sum())
    xp = rng.random((40,) + shape, dtype=np.float32)
    return (x, y), (xp, np.zeros(40, dtype=np.int64))


def _batch_bytes(model, layer):
    """Bytes one batch of BATCH examples keeps: the prefix's outputs and the labels."""
    evaluator = LevelEvaluator(model, model.get_layer(layer))
    x = np.zeros((BATCH,) + tuple(model.inputs[0].shape[1:]), np.float32)
    outputs = evaluator.prefix_outputs(x)
    return sum(int(np.prod(t.shape)) * t.dtype.size for t in outputs) + BATCH * 8


def _assert_same_tables(result, reference, layer):
    pd.testing.assert_frame_equal(result.history, reference.history, check_exact=True)
    assert result.levels == reference.levels
    np.testing.assert_array_equal(result.mean_activations[layer], reference.mean_activations[layer])
    np.testing.assert_array_equal(result.rankings[layer], reference.rankings[layer])
    for threshold in reference.thresholds:
        np.testing.assert_array_equal(result.masks[threshold][layer],
                                      reference.masks[threshold][layer])


@pytest.fixture
def caches(monkeypatch):
    """Every PrefixCache the sweep creates, to check how much it kept."""
    made = []

    class Recorded(PrefixCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(_sweep, "PrefixCache", Recorded)
    return made


@pytest.mark.parametrize("factory", MODELS)
@pytest.mark.parametrize("batches_kept", [None, 2.5, 0])
def test_one_pass_gives_the_tables_of_a_separate_statistics_pass(factory, batches_kept, caches):
    """All kept (default budget), the first 2 of 6 batches kept, or nothing kept."""
    model, layer = factory()
    clean, poisoned = _sets(model)
    budget = {} if batches_kept is None else \
        {"memory_budget": int(batches_kept * _batch_bytes(model, layer))}
    common = dict(layers=layer, poisoned_validation_data=poisoned,
                  max_accuracy_drop=[0.02, 0.1, 0.3], batch_size=BATCH)
    result = prune_to_threshold(model, clean, **common, **budget)
    (cache,) = caches
    reference = prune_to_threshold(model, clean, ranking_data=clean, **common)
    assert len(caches) == 1  # the separate statistics pass keeps nothing
    _assert_same_tables(result, reference, layer)
    np.testing.assert_array_equal(
        result.mean_activations[layer],
        mean_channel_activations(model, clean[0], layer, batch_size=BATCH))
    kept = {None: 90, 2.5: 2 * BATCH, 0: 0}[batches_kept]  # examples
    assert cache.complete == (kept == 90)
    assert cache.peak_bytes == kept * _batch_bytes(model, layer) // BATCH
    assert cache.peak_bytes <= cache.memory_budget and cache.kept_bytes == 0


@pytest.mark.parametrize("factory", [_branched_model, _residual_model])
def test_recomputed_batches_match_explicitly_masked_models(factory, caches):
    model, layer = factory()
    clean, poisoned = _sets(model)
    result = prune_to_threshold(model, clean, layers=layer, poisoned_validation_data=poisoned,
                                batch_size=BATCH, memory_budget=3 * _batch_bytes(model, layer))
    assert not caches[0].complete and caches[0].peak_bytes > 0
    for level in range(result.steps + 1):
        pruned = wrap_layers(model, layer, masks={layer: level_mask(result.rankings[layer], level)})
        assert result.history["clean_accuracy"][level] == clean_accuracy(pruned, clean)
        assert result.history["attack_success_rate"][level] == attack_success_rate(pruned, poisoned)


@pytest.mark.parametrize("batches_kept", [None, 2.5])
def test_a_dataset_that_does_not_fit_is_read_again_whole(batches_kept, caches):
    model, layer = _branched_model()
    clean, poisoned = _sets(model)
    stream = tf.data.Dataset.from_tensor_slices(clean).batch(BATCH)
    budget = {} if batches_kept is None else \
        {"memory_budget": int(batches_kept * _batch_bytes(model, layer))}
    result = prune_to_threshold(model, stream, layers=layer, poisoned_validation_data=poisoned,
                                batch_size=BATCH, **budget)
    reference = prune_to_threshold(model, clean, layers=layer, poisoned_validation_data=poisoned,
                                   batch_size=BATCH, ranking_data=clean)
    _assert_same_tables(result, reference, layer)
    assert caches[0].complete == (batches_kept is None)
    assert caches[0].kept_bytes == 0


def test_data_larger_than_the_budget_keeps_memory_flat():
    """Four times the data under the same budget keeps the same bytes, and the same batches."""
    model, layer = _tiny()
    clean, _ = _sets(model)
    evaluator = LevelEvaluator(model, model.get_layer(layer))
    budget = 3 * _batch_bytes(model, layer)
    peaks = []
    for scale in (1, 4):
        data = check_data(tuple(np.concatenate([part] * scale) for part in clean), model=model)
        cache = PrefixCache(evaluator, budget)
        means = cache.channel_means(data, BATCH)
        np.testing.assert_array_equal(means, mean_channel_activations(model, data.x, layer,
                                                                      batch_size=BATCH))
        peaks.append(cache.peak_bytes)
        given = list(cache.outputs(data, BATCH))
        assert len(given) == -(-data.size // BATCH) and cache.kept_bytes == 0
        for (outputs, y), (x, y_batch) in zip(given, data.batches(BATCH)):
            np.testing.assert_array_equal(y, y_batch)
            for value, fresh in zip(outputs, evaluator.prefix_outputs(x)):
                np.testing.assert_array_equal(value.numpy(), fresh.numpy())
    assert peaks[0] == peaks[1] == budget


def test_the_cache_refuses_other_data():
    model, layer = _tiny()
    clean, poisoned = _sets(model)
    cache = PrefixCache(LevelEvaluator(model, model.get_layer(layer)), 10**6)
    cache.channel_means(check_data(clean, model=model), BATCH)
    with pytest.raises(ValueError, match="data and batch size"):
        next(cache.outputs(check_data(poisoned, model=model), BATCH))


def test_several_layers_and_a_given_ranking_ignore_the_budget(tiny_model, tiny_data):
    for kwargs in ({"layers": ["conv_b", "fc"], "steps": 3}, {"ranking": [5, 4, 3, 2, 1, 0]}):
        small = prune_to_threshold(tiny_model, tiny_data, memory_budget=0, **kwargs)
        default = prune_to_threshold(tiny_model, tiny_data, **kwargs)
        pd.testing.assert_frame_equal(small.history, default.history, check_exact=True)


@pytest.mark.parametrize("value, error", [(-1, InputError), (float("nan"), InputTypeError),
                                          (1.5, InputTypeError), (True, InputTypeError),
                                          ("256MB", InputTypeError), (None, InputTypeError)])
def test_a_bad_memory_budget_is_refused(tiny_model, tiny_data, value, error):
    with pytest.raises(error, match="'memory_budget' parameter must be an int >= 0"):
        prune_to_threshold(tiny_model, tiny_data, memory_budget=value)


def test_sweeps_of_a_model_reuse_its_evaluator_and_the_model_still_dies(tiny_data):
    x, y = tiny_data
    refs = []
    for seed in range(2):
        model = tiny_conv_model(seed=seed)
        first = prune_to_threshold(model, (x, y), layers="conv_b")
        evaluator = level_evaluator(model, model.get_layer("conv_b"))
        again = prune_to_threshold(model, (x, y), layers="conv_b")
        assert level_evaluator(model, model.get_layer("conv_b")) is evaluator
        pd.testing.assert_frame_equal(first.history, again.history, check_exact=True)
        refs.append(weakref.ref(model))
        del model, first, again, evaluator
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True]


def _sparse_model():
    """Channels that switch on with the input's brightness: dim inputs have few active ones,
    a black input none (positive kernels, negative biases, ReLU)."""
    keras.utils.set_random_seed(11)
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(5, 3, activation="relu", name="gate")(inputs)
    x = keras.layers.MaxPooling2D(name="gate_pool")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    rng = np.random.default_rng(11)
    model.get_layer("gate").set_weights([rng.uniform(0.0, 0.2, (3, 3, 1, 5)).astype(np.float32),
                                         -np.linspace(0.05, 0.4, 5).astype(np.float32)])
    return model


def _masked_labels(model, layer, ranking, x):
    """Predicted labels of explicitly masked copies at levels 0..len(ranking)."""
    labels = []
    channels = model.get_layer(layer).filters
    for level in range(len(ranking) + 1):
        mask = np.ones(channels, np.float32)
        mask[np.asarray(ranking[:level], dtype=np.int64)] = 0.0
        labels.append(predict_labels(wrap_layers(model, layer, masks={layer: mask}), x))
    return np.stack(labels)


@pytest.mark.parametrize("ranking", [[4, 0, 3, 1, 2], [2, 0, 4]])
def test_an_all_zero_frontier_is_evaluated_once_per_batch(ranking):
    """After an example's last active channel is pruned the suffix reads only zeros: one
    shared row gives its prediction. Labels equal explicitly masked models' at every level,
    with every channel ranked or only some (an unranked active channel keeps the example's
    own rows), for black, dim and bright inputs."""
    model = _sparse_model()
    rng = np.random.default_rng(3)
    x = rng.random((24, 6, 6, 1), dtype=np.float32) * np.linspace(0, 1, 24)[:, None, None, None]
    evaluator = LevelEvaluator(model, model.get_layer("gate"))
    frontier = evaluator.prefix_outputs(x)[0].numpy().reshape(24, -1, 5)
    active = np.any(frontier != 0, axis=1)
    assert not active[0].any() and active.sum(axis=1).max() == 5  # black and bright inputs
    labels = evaluator.predictions(x, ranking)
    np.testing.assert_array_equal(labels, _masked_labels(model, "gate", ranking, x))
    needed = 24 + int(active[:, ranking].sum())  # level 0, and each active ranked channel
    unranked = np.setdiff1d(np.arange(5), ranking)
    shared = int(np.sum(~active[:, unranked].any(axis=1)))  # every active channel is ranked
    assert shared > 0
    assert evaluator.rows_evaluated == needed - shared + 1


def test_side_inputs_and_non_finite_values_keep_their_own_rows():
    """The shared row holds only when the suffix reads the layer alone and the values are
    finite: with a side input, or an infinite value (0 * inf is NaN), nothing is shared."""
    model, layer = _residual_model()
    x = np.random.default_rng(5).random((8, 6, 6, 3), dtype=np.float32)
    evaluator = LevelEvaluator(model, model.get_layer(layer))
    ranking = np.arange(5)
    labels = evaluator.predictions(x, ranking)
    np.testing.assert_array_equal(labels, _masked_labels(model, layer, ranking, x))
    frontier = evaluator.prefix_outputs(x)[0].numpy().reshape(8, -1, 5)
    assert evaluator.rows_evaluated == 8 + int(np.any(frontier != 0, axis=1).sum())

    sparse_model = _sparse_model()
    sparse = LevelEvaluator(sparse_model, sparse_model.get_layer("gate"))
    flat = np.zeros((2, 4, 5), np.float32)
    flat[:, 0, 1] = [1.0, np.inf]
    active = np.any(flat != 0, axis=1)
    evaluate = np.ones((6, 2), dtype=bool)
    finite = np.all(np.isfinite(flat), axis=(1, 2))
    zeroed = sparse._zeroed_rows(finite, active, np.arange(5), evaluate)
    np.testing.assert_array_equal(np.argwhere(zeroed), [[2, 0]])  # channel 1 at level 2

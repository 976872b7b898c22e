"""CLP: channel Lipschitz scores, the mean + u * std rule and the pruned copy."""

import numpy as np
import pytest

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.scoring._lipschitz import ClpResult, channel_lipschitz, clp_masks, clp_prune, conv_layers
from tf_backdoor_defense.masks._wrapper import PruneByActivation, wrap_layers

from conftest import tiny_conv_model


def _svd_scores(kernel):
    """Spectral norm of each output channel's kernel as a (C_in, kernel_size) matrix, by loop."""
    out = []
    for k in range(kernel.shape[-1]):
        w = np.moveaxis(kernel[..., k], -1, 0)  # (C_in, *spatial)
        w = w.reshape(w.shape[0], -1)
        out.append(np.linalg.svd(w.astype(np.float64))[1].max())
    return np.array(out)


def _weights(model):
    return [w.copy() for w in model.get_weights()]


@pytest.mark.parametrize("layer_fn, shape", [
    (lambda: keras.layers.Conv2D(5, 3, name="c"), (7, 7, 3)),
    (lambda: keras.layers.Conv1D(4, 2, name="c"), (9, 3)),
    (lambda: keras.layers.Conv3D(3, 2, name="c"), (4, 4, 4, 2)),
    (lambda: keras.layers.Conv2D(4, (3, 2), data_format="channels_first", name="c"), (3, 6, 6)),
])
def test_conv_scores_equal_hand_computed_svd(layer_fn, shape):
    model = keras.Sequential([keras.Input(shape), layer_fn(), keras.layers.Flatten(), keras.layers.Dense(2)])
    kernel = model.get_layer("c").kernel.numpy()
    scores = channel_lipschitz(model, "c")
    assert scores.shape == (kernel.shape[-1],)
    np.testing.assert_allclose(scores, _svd_scores(kernel), rtol=1e-10)


def test_dense_score_is_the_weight_column_norm():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="d"), keras.layers.Dense(2)])
    kernel = model.get_layer("d").kernel.numpy()
    expected = [np.sqrt(np.sum(kernel[:, k].astype(np.float64) ** 2)) for k in range(3)]
    np.testing.assert_allclose(channel_lipschitz(model, "d"), expected, rtol=1e-10)


def _conv_bn_model():
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, name="c"),
        keras.layers.BatchNormalization(epsilon=1e-3, name="bn"),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ])
    gamma = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    beta = np.zeros(4, np.float32)
    mean = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    var = np.array([4.0, 1.0, 0.25, 9.0], np.float32)
    model.get_layer("bn").set_weights([gamma, beta, mean, var])
    return model, gamma, var


def test_following_batch_norm_scales_the_scores():
    model, gamma, var = _conv_bn_model()
    raw = _svd_scores(model.get_layer("c").kernel.numpy())
    expected = raw * np.abs(gamma) / np.sqrt(var.astype(np.float64) + 1e-3)
    np.testing.assert_allclose(channel_lipschitz(model, "c"), expected, rtol=1e-6)
    np.testing.assert_allclose(channel_lipschitz(model, "c", batch_norm=False), raw, rtol=1e-10)


def test_batch_norm_after_another_layer_is_not_included():
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, name="c"),
                              keras.layers.ReLU(), keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    model.get_layer("bn").set_weights([np.full(3, 5.0, np.float32), np.zeros(3, np.float32),
                                       np.zeros(3, np.float32), np.ones(3, np.float32)])
    np.testing.assert_allclose(channel_lipschitz(model, "c"),
                               _svd_scores(model.get_layer("c").kernel.numpy()), rtol=1e-10)


def test_mask_rule_prunes_strictly_above_mean_plus_u_std():
    scores = np.array([1.0, 2.0, 3.0, 5.0, 10.0])
    limit = scores.mean() + 1.0 * scores.std(ddof=1)
    mask = clp_masks(scores, u=1.0)
    np.testing.assert_array_equal(mask, (scores <= limit).astype(np.float32))
    assert mask.dtype == np.float32 and mask.tolist() == [1, 1, 1, 1, 0]
    assert clp_masks(scores, u=0).tolist() == [1, 1, 1, 0, 0]  # above the mean
    assert clp_masks(np.full(4, 2.0), u=0).tolist() == [1, 1, 1, 1]  # equal is kept
    assert clp_masks([5.0], u=0).tolist() == [1]  # one channel: nothing to compare with
    by_layer = clp_masks({"a": scores, "b": [1.0, 1.0, 9.0]}, u=1.0)
    assert set(by_layer) == {"a", "b"} and by_layer["b"].tolist() == [1, 1, 0]


@pytest.mark.parametrize("u, error", [(-1, ValueError), (float("nan"), ValueError),
                                      (float("inf"), ValueError), ("3", TypeError), (True, TypeError)])
def test_bad_u_is_refused(u, error):
    with pytest.raises(error, match="'u'"):
        clp_masks([1.0, 2.0], u=u)


def test_clp_prune_does_not_mutate_the_model_and_masks_the_copy():
    model = tiny_conv_model()
    kernel, bias = model.get_layer("conv_b").get_weights()
    kernel[..., 1] *= 40.0  # an outlier channel
    model.get_layer("conv_b").set_weights([kernel, bias])
    before = _weights(model)
    x = np.random.default_rng(0).random((5, 8, 8, 1), dtype=np.float32)
    out_before = model(x).numpy()

    result = clp_prune(model, u=1.5)

    assert isinstance(result, ClpResult) and result.u == 1.5
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert not any(isinstance(layer, PruneByActivation) for layer in model.layers)
    np.testing.assert_array_equal(model(x).numpy(), out_before)
    assert result.model is not model
    assert sorted(result.masks) == sorted(result.scores) == ["conv_a", "conv_b"]
    assert result.pruned_channels["conv_b"].tolist() == [1]
    for name, mask in result.masks.items():
        wrapped = result.model.get_layer(name)
        assert isinstance(wrapped, PruneByActivation)
        np.testing.assert_array_equal(wrapped.get_mask(), mask)
    assert not isinstance(result.model.get_layer("fc"), PruneByActivation)


def test_pruned_copy_predicts_like_an_explicitly_masked_copy():
    model = tiny_conv_model(channels=6)
    kernel, bias = model.get_layer("conv_b").get_weights()
    kernel[..., [0, 4]] *= 30.0
    model.get_layer("conv_b").set_weights([kernel, bias])
    result = clp_prune(model, layers="conv_b", u=0.5)
    pruned = result.pruned_channels["conv_b"]
    assert pruned.size > 0 and {0, 4} <= set(pruned.tolist())
    # Zeroing the pruned channels' weights of a ReLU conv silences them the same way.
    explicit = keras.models.clone_model(model)
    explicit.set_weights(model.get_weights())
    kernel, bias = explicit.get_layer("conv_b").get_weights()
    kernel[..., pruned] = 0.0
    bias[pruned] = 0.0
    explicit.get_layer("conv_b").set_weights([kernel, bias])
    x = np.random.default_rng(1).random((6, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(result.model(x).numpy(), explicit(x).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(result.model(x).numpy(), model(x).numpy())


def test_default_layers_are_the_conv_layers_and_dense_can_be_named():
    model = tiny_conv_model()
    assert conv_layers(model) == ["conv_a", "conv_b"]
    result = clp_prune(model, layers=["fc"], u=3)
    assert list(result.scores) == ["fc"] and result.scores["fc"].shape == (8,)
    assert isinstance(result.model.get_layer("fc"), PruneByActivation)


def test_already_pruned_channels_stay_pruned():
    model = wrap_layers(tiny_conv_model(), "conv_b", masks={"conv_b": [0, 1, 1, 1, 1, 1]})
    result = clp_prune(model, layers="conv_b", u=3)
    assert result.masks["conv_b"][0] == 0
    assert result.model.get_layer("conv_b").get_mask()[0] == 0
    assert model.get_layer("conv_b").get_mask().tolist() == [0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("layers, match", [
    ("nope", "Unknown layer 'nope'"),
    ("pool_a", "'pool_a' of type MaxPooling2D"),
    (["flat"], "'flat' of type Flatten"),
    ([], "at least one layer"),
    (["conv_a", "conv_a"], "duplicates"),
])
def test_bad_layers_are_refused(layers, match):
    with pytest.raises(ValueError, match=match):
        clp_prune(tiny_conv_model(), layers=layers)


def test_model_without_conv_layers_needs_layers():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="layers="):
        clp_prune(model)

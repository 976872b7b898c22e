"""CLP: data-free Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022).

A backdoor channel reacts very strongly to a small input pattern, so its
output can change a lot for a small change of its input: it has a large
*channel Lipschitz constant*. CLP bounds that constant from the weights alone
and prunes, layer by layer, the channels whose bound is an outlier. No data is
needed.

The upper bound of the channel Lipschitz constant (UCLC) of output channel
``k`` is

- Conv1D/2D/3D: the spectral norm (largest singular value) of the channel's
  kernel slice as a ``(C_in, kernel_size)`` matrix ``W_k``;
- Dense: the L2 norm of the unit's weight column (the spectral norm of a
  ``(C_in, 1)`` matrix);

multiplied by ``|gamma_k| / sqrt(moving_variance_k + epsilon)`` when the layer
feeds exactly one ``BatchNormalization`` over its channel axis (the affine map
BN applies at inference). Within each layer, channels with
``UCLC > mean + u * std`` are pruned, the standard deviation being the sample
one (``ddof=1``) as in the authors' PyTorch code. The paper uses ``u = 3``.

Differences from the authors' code, which handles ``Conv2d -> BatchNorm2d``
pairs only: it uses ``sqrt(running_var)`` without BN's epsilon, and prunes by
zeroing the BN weight and bias so the channel outputs exactly 0 after BN.
Here the pruning is a ``PruneByActivation`` mask on the Conv/Dense layer, so
when a BN follows, a pruned channel outputs BN's constant
``beta - gamma * mean / sqrt(var + eps)`` instead of 0.
"""

import numbers
from dataclasses import dataclass

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.masks._registry import is_conv, is_prunable
from tf_backdoor_defense.masks._results import MasksResult
from tf_backdoor_defense.masks._wrapper import (apply_masks, channel_axis, find_layer, layer_names,
                                                unwrap)
from tf_backdoor_defense._validation import check_model
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["channel_lipschitz", "clp_masks", "clp_prune", "ClpResult", "conv_layers"]


@dataclass(frozen=True, eq=False, repr=False)
class ClpResult(MasksResult):
    """What :func:`clp_prune` returns.

    Attributes
    ----------
    model : tf_keras.Model
        A copy of the input with ``PruneByActivation`` on the scored layers and
        their masks set (0 = pruned).
    masks : dict
        ``{layer_name: mask}`` (float32 arrays, 1 = kept, 0 = pruned).
    scores : dict
        ``{layer_name: UCLC array}``, one value per channel.
    u : float
        The threshold parameter used.
    """

    model: object
    masks: dict
    scores: dict
    u: float

    def __repr__(self):
        return f"ClpResult(u={self.u}, pruned={self.pruned_counts})"


def conv_layers(model):
    """Names of the Conv1D/2D/3D layers of ``model`` (wrapped or not), in model order.

    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, name="c"),
    ...                           keras.layers.Flatten(), keras.layers.Dense(2, name="d")])
    >>> conv_layers(model)
    ['c']
    """
    return [layer.name for layer in model.layers if is_conv(unwrap(layer))]


def scorable_layer(model, name):
    """The model-level layer called ``name``; a ValueError unless it is Conv or Dense."""
    if not isinstance(name, str):
        raise InputTypeError(f"Layer names must be strings. Got {name!r} instead.")
    found = find_layer(model, name)
    inner = unwrap(found)
    if not is_prunable(inner):
        raise InputError(
            f"Layer '{name}' of type {type(inner).__name__} cannot be scored by channel: "
            "expected a Conv1D, Conv2D, Conv3D or Dense layer."
        )
    return found


def _following_batch_norm(model, layer):
    """The BatchNormalization that is the only consumer of ``layer``, over its channels."""
    if len(layer._inbound_nodes) != 1:  # a shared layer: no single BN follows it
        return None
    consumers = [node.layer for node in layer._outbound_nodes if node.layer in model.layers]
    if len(consumers) != 1 or not isinstance(consumers[0], keras.layers.BatchNormalization):
        return None
    bn = consumers[0]
    rank = len(layer.output.shape)
    axis = channel_axis(layer) % rank
    bn_axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if [a % rank for a in bn_axes] != [axis]:
        return None
    return bn


def _bn_factor(bn):
    variance = np.asarray(bn.moving_variance.numpy(), dtype=np.float64)
    gamma = np.asarray(bn.gamma.numpy(), dtype=np.float64) if bn.scale else 1.0
    return np.abs(gamma) / np.sqrt(variance + float(bn.epsilon))


@with_caller_keras
def channel_lipschitz(model, layers, *, batch_norm=True):
    """Upper bound of the channel Lipschitz constant (UCLC) of each channel of ``layers``.

    Parameters
    ----------
    model : tf_keras.Model
        A built Sequential or Functional model. It is not modified.
    layers : str or list of str
        Name of a Conv1D, Conv2D, Conv3D or Dense layer (possibly already
        wrapped in ``PruneByActivation``), or a list of such names.
    batch_norm : bool, default=True
        Include the scaling of a ``BatchNormalization`` that directly follows
        the layer (its only consumer, normalising its channel axis).

    Returns
    -------
    numpy.ndarray or dict
        For one name, a float64 array with one value per output channel
        (filter or unit): the largest singular value of the channel's kernel
        slice reshaped to ``(C_in, kernel_size)`` (a Dense unit: the L2 norm
        of its weight column), times ``|gamma| / sqrt(var + eps)`` of the
        following BN. For a list of names, ``{name: array}``.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((4,)),
    ...     keras.layers.Dense(2, kernel_initializer="ones", name="d")])
    >>> channel_lipschitz(model, "d").round(3).tolist()   # ||(1, 1, 1, 1)|| = 2
    [2.0, 2.0]
    >>> list(channel_lipschitz(model, ["d"]))
    ['d']
    """
    check_model(model)
    if isinstance(layers, str):
        return _layer_lipschitz(model, scorable_layer(model, layers), batch_norm)
    names = layer_names(model, layers, conv_layers, check=scorable_layer)
    return {name: _layer_lipschitz(model, find_layer(model, name), batch_norm) for name in names}


def _layer_lipschitz(model, found, batch_norm):
    inner = unwrap(found)
    kernel = np.asarray(inner.kernel.numpy(), dtype=np.float64)
    if isinstance(inner, keras.layers.Dense):
        scores = np.linalg.norm(kernel, axis=0)
    else:
        # Keras kernels are (*spatial, C_in / groups, C_out) whatever the data format.
        channels_out = kernel.shape[-1]
        per_channel = np.moveaxis(kernel, -1, 0).reshape(channels_out, -1, kernel.shape[-2])
        matrices = np.swapaxes(per_channel, 1, 2)  # (C_out, C_in, kernel_size)
        scores = np.linalg.svd(matrices, compute_uv=False)[:, 0]
    if batch_norm:
        bn = _following_batch_norm(model, found)
        if bn is not None:
            scores = scores * _bn_factor(bn)
    return scores


def _check_u(u):
    if isinstance(u, bool) or not isinstance(u, numbers.Real):
        raise InputTypeError(f"The 'u' parameter must be a number >= 0. Got {u!r} instead.")
    u = float(u)
    if not np.isfinite(u) or u < 0:
        raise InputError(f"The 'u' parameter must be a finite number >= 0. Got {u!r} instead.")
    return u


def _mask_from_scores(scores, u, name):
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise InputError(f"The scores of '{name}' must be a non-empty array of finite numbers.")
    if scores.size < 2:  # no spread to judge an outlier by
        return np.ones(scores.shape, np.float32)
    limit = scores.mean() + u * scores.std(ddof=1)
    return np.where(scores > limit, 0.0, 1.0).astype(np.float32)


def clp_masks(scores, u=3.0):
    """CLP's rule: prune the channels whose score exceeds ``mean + u * std`` of their layer.

    A pure function, so ``u`` can be swept without recomputing the scores.
    The standard deviation is the sample one (``ddof=1``); a layer with one
    channel is never pruned.

    Parameters
    ----------
    scores : dict or array-like
        ``{layer_name: scores}`` (as in ``ClpResult.scores``) or one layer's scores.
    u : float, default=3.0
        The threshold in standard deviations (>= 0).

    Returns
    -------
    dict or numpy.ndarray
        Masks (float32, 1 = kept, 0 = pruned) in the same form as ``scores``.

    Examples
    --------
    >>> clp_masks([1.0, 1.1, 0.9, 1.0, 9.0], u=1).tolist()
    [1.0, 1.0, 1.0, 1.0, 0.0]
    >>> clp_masks({"conv": [1.0, 1.1, 0.9, 1.0, 9.0]}, u=3)["conv"].tolist()
    [1.0, 1.0, 1.0, 1.0, 1.0]
    """
    u = _check_u(u)
    if isinstance(scores, dict):
        return {name: _mask_from_scores(values, u, name) for name, values in scores.items()}
    return _mask_from_scores(scores, u, "scores")


@with_caller_keras
def clp_prune(model, *, layers=None, u=3.0, batch_norm=True):
    """Data-free Channel Lipschitzness-based Pruning (CLP) of ``model``.

    Scores every channel of the chosen layers with :func:`channel_lipschitz`
    and prunes, in each layer, those above ``mean + u * std``. ``model`` is
    never modified: the result holds a copy with ``PruneByActivation`` masks.
    A layer that is already wrapped keeps its pruned channels pruned.

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network (a built Sequential or Functional model).
    layers : str or list of str, default=None
        Conv or Dense layers to prune. Default: every Conv1D/2D/3D layer.
    u : float, default=3.0
        Threshold in standard deviations; smaller prunes more.
    batch_norm : bool, default=True
        Include a following BatchNormalization's scaling in the scores.

    Returns
    -------
    ClpResult
        ``.model`` (the pruned copy), ``.masks``, ``.scores`` and ``.u``.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((6, 6, 1)),
    ...     keras.layers.Conv2D(6, 3, name="conv"), keras.layers.Flatten(),
    ...     keras.layers.Dense(2)])
    >>> kernel, bias = model.get_layer("conv").get_weights()
    >>> kernel[..., 2] *= 50                       # one channel with a huge gain
    >>> model.get_layer("conv").set_weights([kernel, bias])
    >>> result = clp_prune(model, u=1.5)
    >>> result.pruned_channels["conv"].tolist()
    [2]
    >>> type(result.model.get_layer("conv")).__name__
    'PruneByActivation'
    """
    check_model(model)
    u = _check_u(u)
    names = layer_names(model, layers, conv_layers, check=scorable_layer)
    scores = channel_lipschitz(model, names, batch_norm=batch_norm)
    pruned, masks = apply_masks(model, clp_masks(scores, u))
    return ClpResult(pruned, masks, scores, u)

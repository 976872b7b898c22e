"""Attack-guided pruning: prune the channels that carry the backdoor, checked one by one.

Activation pruning removes channels in a fixed order and stops on clean
accuracy alone. When the defender has triggered validation inputs (e.g. a
known trigger, as in the lab), it can instead test each channel: prune it
tentatively and keep the prune only if the attack success rate (ASR) on the
poisoned validation data goes *down* while clean accuracy stays within the
budget. Layers are visited in the order given, their channels in order of
increasing mean activation on clean data (computed when the layer's turn
comes, with the earlier prunes in place). The search stops as soon as the
ASR reaches 0, since no further prune can lower it.

All trials run on one working copy whose masks are changed in place, with
the compiled forward pass of :func:`tf_backdoor_defense.metrics.predict_labels`
(no retracing, no cloning). A channel whose output is exactly zero on every
validation input cannot change any prediction, so it is recorded without
being evaluated.
"""


import numpy as np
import pandas as pd

from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.scoring._activations import mean_channel_activations, resolve_layer
from tf_backdoor_defense.masks._wrapper import PruneByActivation, channel_axis, wrap_layers
from tf_backdoor_defense.metrics import count_attack_successes, predict_labels
from tf_backdoor_defense.pruning._ranking import rank_channels
from tf_backdoor_defense._validation import (check_data, check_fraction, check_model, check_number,
                                             check_target, num_classes_of)

__all__ = ["attack_guided_prune", "GuidedPruningResult", "DECISIONS"]

#: Values of the ``decision`` column of the history.
DECISIONS = ("pruned", "kept", "kept (inactive)")
_EPS = 1e-12
_CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)


class GuidedPruningResult:
    """What :func:`attack_guided_prune` returns.

    Attributes
    ----------
    model : tf_keras.Model
        A copy of the input with ``PruneByActivation`` on the visited layers and
        their masks set.
    masks : dict
        ``{layer_name: mask}`` (float32, 1 = kept, 0 = pruned).
    history : pandas.DataFrame
        One row per channel considered, in order: ``layer``, ``channel``,
        ``decision`` (one of :data:`DECISIONS`), ``evaluated`` and the trial's
        ``clean_accuracy`` and ``attack_success_rate`` (for a channel that was
        not evaluated: the current values, which pruning it cannot change).
    baseline_accuracy, baseline_attack_success_rate : float
        Of the unpruned model.
    clean_accuracy, attack_success_rate : float
        Of the returned model, on the validation data.
    """

    def __init__(self, model, masks, history, baseline_accuracy, baseline_attack_success_rate,
                 clean_accuracy, attack_success_rate):
        self.model = model
        self.masks = masks
        self.history = history
        self.baseline_accuracy = baseline_accuracy
        self.baseline_attack_success_rate = baseline_attack_success_rate
        self.clean_accuracy = clean_accuracy
        self.attack_success_rate = attack_success_rate

    @property
    def pruned_channels(self):
        """``{layer_name: sorted array of pruned channels}``."""
        return {name: np.flatnonzero(mask == 0) for name, mask in self.masks.items()}

    def __repr__(self):
        pruned = {name: int(np.sum(mask == 0)) for name, mask in self.masks.items()}
        return (f"GuidedPruningResult(pruned={pruned}, clean_accuracy={self.clean_accuracy:.4f} "
                f"(was {self.baseline_accuracy:.4f}), attack_success_rate="
                f"{self.attack_success_rate:.4f} (was {self.baseline_attack_success_rate:.4f}))")


def _default_layers(model, count=3):
    convs = []
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, PruneByActivation) else layer
        if isinstance(inner, _CONV_TYPES) and not isinstance(inner, _TRANSPOSED):
            convs.append(layer.name)
    if not convs:
        raise ValueError("The model has no convolutional layer; pass `layers=` to name the Conv or "
                         "Dense layers to prune.")
    return list(reversed(convs[-count:]))


def _check_layers(model, layers):
    if layers is None:
        return _default_layers(model)
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(f"The 'layers' parameter must be a layer name or a non-empty list of names. "
                        f"Got {layers!r}.")
    names = [resolve_layer(model, name).name for name in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"The 'layers' parameter names a layer twice: {list(layers)}.")
    return names


def _max_abs_fn(model, layer):
    """Compiled per-channel max |output| of ``layer`` (its unmasked channels) on a batch."""
    features = keras.Model(model.inputs, layer.output)
    axis = channel_axis(layer)
    rank = len(layer.output.shape)
    axes = [a for a in range(rank) if a != axis % rank]
    spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)

    @tf.function(input_signature=[spec])
    def fn(x):
        return tf.reduce_max(tf.abs(features(x, training=False)), axis=axes)

    return fn


def attack_guided_prune(model, clean_val, poisoned_val, *, layers=None, max_accuracy_drop=0.04,
                        target=None, batch_size=256):
    """Greedy pruning that keeps a channel pruned only if it lowers the attack success rate.

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network; it is not modified.
    clean_val : (x, y) arrays or tf.data.Dataset
        Clean validation data (read into memory once).
    poisoned_val : (x, y) arrays or tf.data.Dataset
        Triggered validation inputs, labelled as in :mod:`tf_backdoor_defense.metrics`
        (by default the labels are the attacker's targets).
    layers : str or list of str, default=None
        Conv or Dense layers to visit, in this order. Default: the last three
        convolutional layers, deepest first.
    max_accuracy_drop : float in [0, 1], default=0.04
        Allowed drop in clean accuracy against the unpruned model, in absolute
        points; a prune that exceeds it is undone.
    target : None, int, "untargeted", array, dict or callable, default=None
        How to read the poisoned labels (see :mod:`tf_backdoor_defense.metrics`).
    batch_size : int, default=256

    Returns
    -------
    GuidedPruningResult
        ``.model``, ``.masks``, ``.history`` and the accuracies before and after.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
    ...     2, activation="relu", kernel_initializer="identity", name="fc"),
    ...     keras.layers.Dense(2, kernel_initializer="identity")])
    >>> clean = (np.array([[1., 0.], [1., 0.]]), [0, 0])
    >>> poisoned = (np.array([[1., 2.], [1., 3.]]), [1, 1])   # labels: attacker's class
    >>> result = attack_guided_prune(model, clean, poisoned, layers="fc")
    >>> result.masks["fc"].tolist(), result.attack_success_rate, result.clean_accuracy
    ([1.0, 0.0], 0.0, 1.0)
    >>> result.history[["channel", "decision"]].values.tolist()
    [[1, 'pruned']]
    """
    check_model(model)
    names = _check_layers(model, layers)
    max_accuracy_drop = check_fraction(max_accuracy_drop, "max_accuracy_drop")
    batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
    classes = num_classes_of(model)
    target = check_target(target, classes)
    clean = check_data(clean_val, "clean_val", model=model).arrays()
    poisoned = check_data(poisoned_val, "poisoned_val", model=model, num_classes=classes).arrays()

    working = wrap_layers(model, names)
    x_all = np.concatenate([clean[0], poisoned[0]])
    n_clean = clean[0].shape[0]

    def evaluate():
        predictions = predict_labels(working, x_all, batch_size)
        correct = int(np.sum(predictions[:n_clean] == clean[1]))
        success, attacked = count_attack_successes(predictions[n_clean:], poisoned[1], target)
        return correct, success, attacked

    correct, success, attacked = evaluate()
    if attacked == 0:
        raise ValueError("No poisoned input is attacked: every true label equals its target.")
    base_accuracy = correct / n_clean
    base_asr = success / attacked
    floor = base_accuracy - max_accuracy_drop - _EPS
    rows = []
    for name in names:
        if success == 0:
            break
        layer = working.get_layer(name)
        mask = layer.get_mask()
        order = rank_channels(mean_channel_activations(working, clean, layer=name, batch_size=batch_size))
        max_fn = _max_abs_fn(working, layer)
        peak = np.max([max_fn(x_all[s:s + batch_size]).numpy()
                       for s in range(0, x_all.shape[0], batch_size)], axis=0)
        for channel in order:
            if success == 0:
                break
            if mask[channel] == 0:
                continue
            if peak[channel] == 0:
                rows.append((name, int(channel), DECISIONS[2], False, correct / n_clean,
                             success / attacked))
                continue
            mask[channel] = 0.0
            layer.set_mask(mask)
            trial_correct, trial_success, _ = evaluate()
            accuracy = trial_correct / n_clean
            keep_pruned = trial_success < success and accuracy >= floor
            rows.append((name, int(channel), DECISIONS[0] if keep_pruned else DECISIONS[1], True,
                         accuracy, trial_success / attacked))
            if keep_pruned:
                correct, success = trial_correct, trial_success
            else:
                mask[channel] = 1.0
                layer.set_mask(mask)
    history = pd.DataFrame(rows, columns=["layer", "channel", "decision", "evaluated",
                                          "clean_accuracy", "attack_success_rate"])
    history["channel"] = history["channel"].astype(np.int64)
    history["evaluated"] = history["evaluated"].astype(bool)
    masks = {name: working.get_layer(name).get_mask() for name in names}
    return GuidedPruningResult(working, masks, history, base_accuracy, base_asr,
                               correct / n_clean, success / attacked)


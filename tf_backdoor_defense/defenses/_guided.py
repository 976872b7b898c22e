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


from dataclasses import dataclass

import numpy as np
import pandas as pd

from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.masks._registry import is_conv
from tf_backdoor_defense.masks._results import MasksResult
from tf_backdoor_defense.masks._wrapper import channel_axis, layer_names, unwrap, wrap_layers
from tf_backdoor_defense.metrics import count_attack_successes, predict_labels
from tf_backdoor_defense.pruning._ranking import rank_channels
from tf_backdoor_defense.scoring._activations import mean_channel_activations, resolve_layer
from tf_backdoor_defense._validation import (check_data, check_fraction, check_model, check_number,
                                             check_target, num_classes_of)
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["attack_guided_prune", "GuidedPruningResult", "DECISIONS"]

#: Values of the ``decision`` column of the history.
DECISIONS = ("pruned", "kept", "kept (inactive)")
_EPS = 1e-12


@dataclass(frozen=True, eq=False, repr=False)
class GuidedPruningResult(MasksResult):
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

    model: object
    masks: dict
    history: object
    baseline_accuracy: float
    baseline_attack_success_rate: float
    clean_accuracy: float
    attack_success_rate: float

    def __repr__(self):
        return (f"GuidedPruningResult(pruned={self.pruned_counts}, clean_accuracy="
                f"{self.clean_accuracy:.4f} (was {self.baseline_accuracy:.4f}), "
                f"attack_success_rate={self.attack_success_rate:.4f} "
                f"(was {self.baseline_attack_success_rate:.4f}))")


def _default_layers(model, count=3):
    convs = [layer.name for layer in model.layers if is_conv(unwrap(layer))]
    if not convs:
        raise InputError("The model has no convolutional layer; pass `layers=` to name the Conv or "
                         "Dense layers to prune.")
    return list(reversed(convs[-count:]))


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


@with_caller_keras
def attack_guided_prune(model, validation_data, poisoned_validation_data, *, layers=None,
                        max_accuracy_drop=0.04, target=None, batch_size=256):
    """Greedy pruning that keeps a channel pruned only if it lowers the attack success rate.

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network; it is not modified.
    validation_data : (x, y) arrays or tf.data.Dataset
        Clean validation data: the channel ranking and the accuracy budget
        (read into memory once).
    poisoned_validation_data : (x, y) arrays or tf.data.Dataset
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
    names = layer_names(model, layers, _default_layers, check=resolve_layer)
    max_accuracy_drop = check_fraction(max_accuracy_drop, "max_accuracy_drop")
    batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
    classes = num_classes_of(model)
    target = check_target(target, classes)
    clean = check_data(validation_data, "validation_data", model=model).arrays()
    poisoned = check_data(poisoned_validation_data, "poisoned_validation_data", model=model,
                          num_classes=classes).arrays()

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
        raise InputError("No poisoned input is attacked: every true label equals its target.")
    base_accuracy = correct / n_clean
    base_asr = success / attacked
    floor = base_accuracy - max_accuracy_drop - _EPS
    rows = []
    for name in names:
        if success == 0:
            break
        layer = working.get_layer(name)
        mask = layer.get_mask()
        order = rank_channels(mean_channel_activations(working, clean, name, batch_size=batch_size))
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


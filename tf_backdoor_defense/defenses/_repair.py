"""The lab's repaired network ("GoodNet"): the original and the pruned net side by side.

:func:`repaired_model` joins the backdoored model and its pruned copy into
one plain Keras model with ``N + 1`` outputs: where the two agree it outputs
the original's probabilities (so it predicts their shared class), where they
disagree it outputs a one-hot on class ``N``, "backdoor suspected".
:func:`evaluate_repaired` reports its clean accuracy and attack success rate,
counting class ``N`` on a poisoned input as a successful defence.
"""

from dataclasses import asdict, dataclass

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.export._export import strip_masks
from tf_backdoor_defense.keras3._caller import with_caller_keras
from tf_backdoor_defense.graph._replay import check_graph_model, replay_nodes, topological_nodes
from tf_backdoor_defense.masks._wrapper import masked_layers
from tf_backdoor_defense.metrics import count_attack_successes, defender_utility, predict_labels
from tf_backdoor_defense._validation import check_data, check_model, check_target, num_classes_of

__all__ = ["repaired_model", "suspect_class", "evaluate_repaired", "RepairedScores"]


def _inline(model, inputs, prefix):
    """Rebuild ``model``'s graph on ``inputs`` with copied layers named ``prefix + name``."""
    copies = {}

    def copy_call(node, args, kwargs):
        layer = node.layer
        new = copies.get(id(layer))
        if new is None:  # a layer called several times is copied once
            config = dict(layer.get_config(), name=prefix + layer.name)
            new = copies[id(layer)] = layer.__class__.from_config(config)
            out = new(*args, **kwargs)
            new.set_weights(layer.get_weights())
            return out
        return new(*args, **kwargs)

    return replay_nodes(topological_nodes(model), model.inputs, [inputs], model.outputs[0],
                        call=copy_call)


def _plain(model, name):
    check_model(model, name)
    check_graph_model(model, name)
    return strip_masks(model) if masked_layers(model) else model


@with_caller_keras(arguments=("original", "pruned"))
def repaired_model(original, pruned, *, name="repaired"):
    """The repaired network: ``N + 1`` outputs, class ``N`` when the two models disagree.

    Parameters
    ----------
    original : tf_keras.Model
        The backdoored model, with ``N`` softmax outputs.
    pruned : tf_keras.Model
        Its pruned (or fine-pruned) copy, with the same input and ``N``
        outputs; ``PruneByActivation`` masks are folded in.
    name : str, default="repaired"
        Name of the new model. Its layers are named ``original_*`` and
        ``pruned_*``; the output layer is ``repaired_output``.

    Returns
    -------
    tf_keras.Model
        A Functional model of standard layers only (its argmax comparison
        uses the built-in ``TFOpLambda`` layers), so it saves to ``.h5`` or
        ``.keras`` and exports without custom objects. For an input where
        both models predict class ``k``, it outputs the original's ``N``
        probabilities followed by 0; otherwise ``N`` zeros followed by 1.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> original = keras.Sequential([keras.Input((2,)),
    ...     keras.layers.Dense(2, kernel_initializer="identity", activation="softmax")])
    >>> pruned = keras.Sequential([keras.Input((2,)),
    ...     keras.layers.Dense(2, kernel_initializer="ones", activation="softmax")])
    >>> repaired = repaired_model(original, pruned)
    >>> np.argmax(repaired(np.array([[0., 1.], [1., 0.]])), axis=-1).tolist()
    [2, 0]
    """
    original = _plain(original, "original")
    pruned = _plain(pruned, "pruned")
    shape_a = tuple(original.inputs[0].shape[1:])
    shape_b = tuple(pruned.inputs[0].shape[1:])
    if shape_a != shape_b:
        raise InputError(f"The `original` and `pruned` models must take the same input. "
                         f"Got input shapes {shape_a} and {shape_b}.")
    classes = int(original.outputs[0].shape[-1] or 0)
    if classes < 2 or original.outputs[0].shape.rank != 2:
        raise InputError("The `original` model must output one probability per class "
                         f"(shape (batch, N) with N >= 2). Got {original.outputs[0].shape}.")
    if tuple(pruned.outputs[0].shape) != tuple(original.outputs[0].shape):
        raise InputError(f"The `pruned` model must have the original's {classes} outputs. "
                         f"Got output shape {tuple(pruned.outputs[0].shape)}.")
    if not isinstance(name, str) or not name:
        raise InputTypeError(f"The 'name' parameter must be a non-empty string. Got {name!r}.")

    inputs = keras.Input(shape_a, dtype=original.inputs[0].dtype, name="input")
    probs = _inline(original, inputs, "original_")
    other = _inline(pruned, inputs, "pruned_")
    same = tf.math.equal(tf.math.argmax(probs, axis=-1), tf.math.argmax(other, axis=-1))
    agree = keras.layers.Reshape((1,), name="agree")(tf.cast(same, probs.dtype))
    kept = keras.layers.Multiply(name="agreed_probabilities")([probs, agree])
    suspect = keras.layers.Reshape((1,), name="suspect")(tf.math.subtract(1.0, agree))
    outputs = keras.layers.Concatenate(name="repaired_output")([kept, suspect])
    return keras.Model(inputs, outputs, name=name)


def suspect_class(repaired):
    """Index ``N`` of the "backdoor suspected" class of a repaired model (its last output)."""
    check_model(repaired, "repaired")
    return num_classes_of(repaired) - 1


@dataclass(frozen=True)
class RepairedScores:
    """Scores of a repaired network (fractions in [0, 1]).

    ``attack_success_rate`` counts an output of class ``N`` on a poisoned
    input as defended; ``clean_flagged`` / ``poisoned_flagged`` are the
    fractions of clean / poisoned inputs flagged as class ``N``.
    """

    clean_accuracy: float
    attack_success_rate: float
    clean_flagged: float
    poisoned_flagged: float

    @property
    def defender_utility(self):
        """Clean accuracy minus attack success rate."""
        return defender_utility(self.clean_accuracy, self.attack_success_rate)

    def as_dict(self):
        return {**asdict(self), "defender_utility": self.defender_utility}


def evaluate_repaired(repaired, eval_data, poisoned_eval_data, *, target=None, batch_size=256):
    """Clean accuracy, attack success rate and flag rates of a repaired network.

    Parameters
    ----------
    repaired : tf_keras.Model
        A model from :func:`repaired_model` (``N + 1`` outputs).
    eval_data, poisoned_eval_data : (x, y) arrays or tf.data.Dataset
        Clean and triggered data to report on, labels in ``0 .. N-1``.
        Poisoned labels follow
        :func:`tf_backdoor_defense.metrics.attack_success_rate` (the attacker's
        targets by default, true labels with ``target=``).
    target : None, int, "untargeted", array, dict or callable, default=None
    batch_size : int, default=256

    Returns
    -------
    RepairedScores

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> original = keras.Sequential([keras.Input((2,)),
    ...     keras.layers.Dense(2, kernel_initializer="identity", activation="softmax")])
    >>> pruned = keras.Sequential([keras.Input((2,)),
    ...     keras.layers.Dense(2, kernel_initializer="ones", activation="softmax")])
    >>> scores = evaluate_repaired(repaired_model(original, pruned),
    ...     (np.array([[1., 0.]]), [0]), (np.array([[0., 1.]]), [1]))
    >>> scores.clean_accuracy, scores.attack_success_rate, scores.poisoned_flagged
    (1.0, 0.0, 1.0)
    """
    check_model(repaired, "repaired")
    abstain = suspect_class(repaired)
    clean = check_data(eval_data, "eval_data", model=repaired, num_classes=abstain)
    poisoned = check_data(poisoned_eval_data, "poisoned_eval_data", model=repaired,
                          num_classes=abstain)
    target = check_target(target, abstain)
    correct = total = clean_flags = 0
    for x, y in clean.batches(batch_size):
        labels = predict_labels(repaired, x, batch_size)
        correct += int(np.sum(labels == y))
        clean_flags += int(np.sum(labels == abstain))
        total += y.size
    success = attacked = poison_flags = poison_total = 0
    for x, y in poisoned.batches(batch_size):
        labels = predict_labels(repaired, x, batch_size)
        s, n = count_attack_successes(labels, y, target, abstain)
        success, attacked = success + s, attacked + n
        poison_flags += int(np.sum(labels == abstain))
        poison_total += y.size
    if total == 0 or poison_total == 0:
        raise InputError("`eval_data` and `poisoned_eval_data` must not be empty.")
    if attacked == 0:
        raise InputError("No poisoned input is attacked: every true label equals its target.")
    return RepairedScores(correct / total, success / attacked, clean_flags / total,
                          poison_flags / poison_total)

"""Clean accuracy, attack success rate (ASR) and the defender's utility.

Poisoned data follows the lab's convention by default: its labels are the
attacker's target labels, so ASR is the fraction of poisoned inputs classified
as their label. ``target=`` switches to true labels plus an attack:

- ``target=t`` (all-to-one): inputs whose true class is ``t`` are left out;
  ASR is the fraction of the rest classified as ``t``;
- ``target=mapping`` (all-to-all; an array, dict or callable giving the
  attacker's class for each true class): inputs that map to their own class
  are left out; ASR is the fraction classified as ``mapping[true]``;
- ``target="untargeted"``: ASR is the fraction misclassified.

For the repaired N+1 network, ``abstain_class=N`` makes the "backdoor
suspected" output count as a defended input, never as an attack success.
"""

import weakref

import numpy as np

from tf_backdoor_defense._distribute import is_distributed, rows_over_replicas
from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import tf
from tf_backdoor_defense._validation import check_data, check_model, check_target, num_classes_of
from tf_backdoor_defense.graph._functional import as_functional
from tf_backdoor_defense.graph._outputs import output_activation

__all__ = [
    "predict_labels",
    "clean_accuracy",
    "attack_success_rate",
    "defender_utility",
    "labels_from_outputs",
    "label_threshold",
    "count_attack_successes",
]

# One compiled forward pass per model. A value holds its model only weakly (a
# value that referred to its key would keep the model alive for ever).
_PREDICT_FNS = weakref.WeakKeyDictionary()


def _forward(model_ref, spec):
    @tf.function(input_signature=[spec])
    def forward(x):
        return model_ref()(x, training=False)

    return forward


def _predict_fn(model):
    """``(forward, threshold)``: a compiled, retrace-free forward pass (faster than
    ``model.predict``) and the model's :func:`label_threshold`."""
    cached = _PREDICT_FNS.get(model)
    if cached is None:
        spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)
        cached = _PREDICT_FNS[model] = (_forward(weakref.ref(model), spec),
                                        label_threshold(model))
    return cached


def label_threshold(model):
    """The value one output unit must exceed to mean class 1: 0.5 after a sigmoid, else 0.

    A one-unit output without a sigmoid is a logit (trained with
    ``from_logits=True``), the reading the package's training losses take too
    (:func:`~tf_backdoor_defense.finetune.loss_for`). Only one-unit outputs use it.

    >>> import tf_keras as keras
    >>> inputs = keras.Input((3,))
    >>> label_threshold(keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs)))
    0.5
    >>> label_threshold(keras.Model(inputs, keras.layers.Dense(1)(inputs)))
    0.0
    """
    outputs = getattr(model, "outputs", None)
    if not outputs or outputs[0].shape[-1] != 1:
        return 0.5  # only a one-unit output is read by a threshold
    return 0.5 if output_activation(model) == "sigmoid" else 0.0


def labels_from_outputs(outputs, threshold=0.5):
    """Class indices from model outputs: argmax, or for one unit its value above ``threshold``
    (0.5 for a sigmoid's probability, 0 for a logit: :func:`label_threshold`)."""
    outputs = np.asarray(outputs)
    if outputs.shape[-1] == 1:
        return (outputs[..., 0] > threshold).astype(np.int64)
    return np.argmax(outputs, axis=-1).astype(np.int64)


def predict_labels(model, x, batch_size=256, strategy=None):
    """Predicted class of each input in ``x``, computed in compiled batches.

    Parameters
    ----------
    model : tf_keras.Model
    x : array
    batch_size : int, default=256
    strategy : tf.distribute.Strategy, default=None
        With several replicas, replica ``r`` of ``R`` predicts rows
        ``r, r + R, ...`` of every batch and ``strategy.reduce`` gathers the
        labels, so every worker (each calling with the same ``x``) gets all
        of them: the same labels as one device. None, or one replica: this
        device alone.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, kernel_initializer="identity")])
    >>> predict_labels(model, np.array([[1., 0.], [0., 1.]])).tolist()
    [0, 1]
    >>> predict_labels(model, np.array([[0., 1.]]), strategy=tf.distribute.get_strategy()).tolist()
    [1]
    """
    x = _input_array(model, x)
    fn, threshold = _predict_fn(model)
    if is_distributed(strategy):
        return _replicated_labels(fn, threshold, x, batch_size, strategy)
    out = [labels_from_outputs(fn(x[s:s + batch_size]).numpy(), threshold)
           for s in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def _input_array(model, x):
    """``x`` as float32 inputs of ``model``'s shape, or a clear error (a cheap check: the
    public entry points validate their data in full)."""
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputTypeError(f"`x` must be an array of inputs; got {type(x).__name__} (for a "
                             "tf.data.Dataset of (x, y), use clean_accuracy).") from None
    expected = tuple(model.inputs[0].shape[1:])
    if x.ndim != len(expected) + 1 or any(
            want is not None and want != got for want, got in zip(expected, x.shape[1:])):
        raise InputError(f"`x` holds inputs of shape {tuple(x.shape[1:])}, but the model "
                         f"expects {expected} (None: any size).")
    return x


def _replicated_labels(fn, threshold, x, batch_size, strategy):
    """:func:`predict_labels` split over ``strategy``'s replicas, every label on every worker."""
    labels = rows_over_replicas(strategy, len(x), batch_size,
                                lambda rows: labels_from_outputs(fn(x[rows]).numpy(), threshold))
    return labels.astype(np.int64)


def count_attack_successes(predictions, labels, target=None, abstain_class=None):
    """``(successes, attacked)`` for one batch of poisoned inputs.

    ``target`` must already be checked by :func:`check_target`.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if target is None:
        return int(np.sum(predictions == labels)), int(labels.size)
    if isinstance(target, str):  # "untargeted"
        success = predictions != labels
        if abstain_class is not None:
            success &= predictions != abstain_class
        return int(np.sum(success)), int(labels.size)
    if isinstance(target, int):
        attacked = labels != target
        return int(np.sum(predictions[attacked] == target)), int(np.sum(attacked))
    wanted = target[labels]
    attacked = wanted != labels
    return int(np.sum(predictions[attacked] == wanted[attacked])), int(np.sum(attacked))


def clean_accuracy(model, data, batch_size=256, strategy=None):
    """Fraction of ``data`` (``(x, y)`` or a dataset) that ``model`` classifies right.

    ``strategy`` splits each batch over its replicas (see :func:`predict_labels`).

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, kernel_initializer="identity")])
    >>> clean_accuracy(model, (np.array([[1., 0.], [0., 1.]]), [0, 0]))
    0.5
    """
    model = check_model(as_functional(model))
    data = check_data(data, "data", model=model)
    correct = total = 0
    for x, y in data.batches(batch_size):
        correct += int(np.sum(predict_labels(model, x, batch_size, strategy) == y))
        total += y.size
    return correct / total


def attack_success_rate(model, poisoned_data, *, target=None, abstain_class=None, batch_size=256,
                        strategy=None):
    """Attack success rate of ``model`` on poisoned inputs (see the module doc).

    Parameters
    ----------
    model : tf_keras.Model
    poisoned_data : (x, y) arrays or tf.data.Dataset
        Triggered inputs with the attacker's labels (``target=None``) or true labels.
    target : None, int, "untargeted", array, dict or callable, default=None
    abstain_class : int, default=None
        A class that means "backdoor suspected" (the repaired network's class N).
    strategy : tf.distribute.Strategy, default=None
        Splits each batch over its replicas (see :func:`predict_labels`).

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, kernel_initializer="identity")])
    >>> x = np.array([[1., 0.], [1., 0.], [0., 1.]])
    >>> attack_success_rate(model, (x, [0, 0, 0]))             # labels are the targets
    0.6666666666666666
    >>> attack_success_rate(model, (x, [1, 1, 0]), target=0)   # true labels, all-to-one
    1.0
    """
    model = check_model(as_functional(model))
    classes = num_classes_of(model)
    if abstain_class is not None:
        classes -= 1
    target = check_target(target, classes)
    data = check_data(poisoned_data, "poisoned_data", model=model, num_classes=classes)
    success = attacked = 0
    for x, y in data.batches(batch_size):
        predictions = predict_labels(model, x, batch_size, strategy)
        s, n = count_attack_successes(predictions, y, target, abstain_class)
        success += s
        attacked += n
    if attacked == 0:
        raise InputError("No poisoned input is attacked: every true label equals its target.")
    return success / attacked


def defender_utility(clean_accuracy_value, attack_success_rate_value):
    """The paper's defender utility: clean accuracy minus attack success rate.

    >>> round(defender_utility(0.988, 0.02), 3)
    0.968
    """
    return float(clean_accuracy_value) - float(attack_success_rate_value)

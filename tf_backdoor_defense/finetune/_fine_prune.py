"""Fine-pruning and fine-tuning for people who do not write ``fit`` loops.

``fine_prune(model, train_data, validation_data)`` copies the model, wraps the
layers in ``PruneByActivation``, prunes them within an accuracy budget on
``validation_data`` and fine-tunes the copy on ``train_data`` with
:class:`~tf_backdoor_defense.finetune._callbacks.FinePruning`.
``prune=False`` (or :func:`fine_tune`) fine-tunes without pruning.

"Fine-tuning" here names one recipe, the paper's: plain SGD on the
defender's clean data (learning rate 0.01, momentum 0.9, 10 epochs by
default). The stronger clean retraining that the repairs of ``defend`` use is
:func:`~tf_backdoor_defense.finetune._training.train_clean`.
"""

import dataclasses
import warnings

import numpy as np
import pandas as pd

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense._validation import (
    check_data,
    check_model,
    check_number,
    renamed_argument,
    training_labels,
)
from tf_backdoor_defense.finetune._callbacks import (
    LOG_PREFIX,
    FinePruning,
    reset_fine_pruning_state,
)
from tf_backdoor_defense.finetune._training import loss_for
from tf_backdoor_defense.masks._wrapper import (
    PruneByActivation,
    last_conv_layer,
    layer_names,
    masked_layers,
    wrap_layers,
)
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["fine_prune", "fine_tune", "FinePruneResult"]


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class FinePruneResult:
    """What :func:`fine_prune` returns.

    Attributes
    ----------
    model : tf_keras.Model
        The fine-pruned (or fine-tuned) copy, its layers wrapped in ``PruneByActivation``.
    history : pandas.DataFrame
        One row per epoch (``epoch``, ``loss``, ... and the ``fine_pruning/...`` figures).
    sweep_result : SweepResult or None
        The pruning sweep made before fine-tuning (None when ``prune=False``).
    layers : tuple of str
        The pruned layers.
    channels_pruned : int
        Channels whose mask is 0 in the returned model, over all the pruned layers.
    """

    model: object
    history: pd.DataFrame
    sweep_result: object
    layers: tuple

    @property
    def channels_pruned(self):
        return int(sum(self.model.get_layer(name).pruned_channels.size for name in self.layers))

    @property
    def layer(self):
        """Deprecated: the pruned layer's name, or a list of names for several; use ``layers``."""
        warnings.warn("FinePruneResult.layer is now FinePruneResult.layers (a tuple of names); "
                      "'layer' will be removed in the next release.", DeprecationWarning,
                      stacklevel=2)
        return self.layers[0] if len(self.layers) == 1 else list(self.layers)

    def __repr__(self):
        return (f"FinePruneResult(layers={self.layers!r}, channels_pruned={self.channels_pruned}, "
                f"epochs={len(self.history)})")


class _EvaluationLog(keras.callbacks.Callback):
    """The logs of FinePruning, without pruning (for fine-tuning alone)."""

    def __init__(self, validation_data, poisoned_validation_data, target, batch_size):
        super().__init__()
        self.validation_data = validation_data
        self.poisoned_validation_data = poisoned_validation_data
        self.target, self.batch_size = target, batch_size

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs[LOG_PREFIX + "channels_pruned"] = 0.0
        logs[LOG_PREFIX + "fraction_pruned"] = 0.0
        logs[LOG_PREFIX + "clean_accuracy"] = clean_accuracy(self.model, self.validation_data,
                                                             self.batch_size)
        if self.poisoned_validation_data is not None:
            logs[LOG_PREFIX + "attack_success_rate"] = attack_success_rate(
                self.model, self.poisoned_validation_data, target=self.target,
                batch_size=self.batch_size)


@with_caller_keras
def fine_prune(model, train_data, validation_data=None, *, layers=None, max_accuracy_drop=0.04,
               epochs=10, optimizer=None, loss=None, batch_size=64, poisoned_validation_data=None,
               target=None, prune=True, stopping_rule="largest_within", ranking_data=None, seed=0,
               verbose=0, callbacks=None, clean_data=None, layer=None, poisoned_data=None):
    """Fine-prune ``model``: prune layers by activation, then fine-tune on ``train_data``.

    ``model`` is never modified: the work is done on a copy, which starts a
    fresh fine-pruning run (any fine-pruning state the input holds is reset;
    channels it already prunes stay pruned).

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network (Sequential or Functional).
    train_data : (x, y) arrays or tf.data.Dataset of (x, y) batches
        Clean data the copy is fine-tuned on (labels as class indices or one-hot,
        in both forms; they are given to ``loss`` as class indices, or as one-hot
        rows when ``loss`` is categorical, e.g. ``"categorical_crossentropy"``).
    validation_data : (x, y) arrays or tf.data.Dataset
        Clean data on which the pruning level is chosen, the budget is judged
        and the accuracy is logged.
    layers : str or list of str, default=None
        The layers to prune; default: the model's first PruneByActivation
        layer, else the last convolutional layer. Several names prune those
        layers together.
    max_accuracy_drop : float, default=0.04
    epochs : int, default=10
    optimizer : keras optimizer, default=None
        Default ``SGD(learning_rate=0.01, momentum=0.9)``.
    loss : keras loss, default=None
        Default sparse categorical cross-entropy (from logits unless the last
        layer is a softmax or sigmoid). A categorical loss (categorical
        cross-entropy, focal, hinge, KL divergence) gets one-hot labels.
    batch_size : int, default=64
    poisoned_validation_data, target : default=None
        Triggered data beside ``validation_data``, whose ASR is logged every epoch.
    prune : bool, default=True
        ``False`` fine-tunes alone (the paper's baseline, :func:`fine_tune`).
    stopping_rule : {"largest_within", "first_reaching"}, default="largest_within"
        See :func:`~tf_backdoor_defense.pruning._sweep.prune_to_threshold`.
    ranking_data : (x, y) arrays, x alone, or a tf.data.Dataset of (x, y) or of x, default=None
        Data for the activation statistics that rank the channels; default:
        ``train_data``.
    seed : int, default=0
    verbose : int, default=0
        Passed to ``fit``.
    callbacks : list of keras callbacks, default=None
        Extra callbacks for ``fit`` (progress bars, early stopping, TensorBoard...);
        they run after the pruning callback, so they see its ``fine_pruning/*`` logs.
    clean_data, layer, poisoned_data : deprecated
        The old names of ``validation_data``, ``layers`` and
        ``poisoned_validation_data``; they still work in this release, with a
        ``DeprecationWarning``.

    Returns
    -------
    FinePruneResult

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((6, 6, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    >>> x = np.random.default_rng(0).random((32, 6, 6, 1), dtype=np.float32)
    >>> y = np.argmax(model.predict(x, verbose=0), axis=1)
    >>> result = fine_prune(model, (x, y), (x, y), max_accuracy_drop=0.1, epochs=2)
    >>> len(result.history), result.model is model, result.layers
    (2, False, ('conv',))
    """
    validation_data = renamed_argument("fine_prune", "clean_data", clean_data, "validation_data",
                                       validation_data)
    layers = renamed_argument("fine_prune", "layer", layer, "layers", layers)
    poisoned_validation_data = renamed_argument(
        "fine_prune", "poisoned_data", poisoned_data, "poisoned_validation_data",
        poisoned_validation_data)
    check_model(model)
    if validation_data is None:
        raise InputTypeError("fine_prune needs `validation_data`: clean labelled (x, y) data on "
                             "which the pruning level is chosen and accuracy is measured.")
    if isinstance(prune, (bool, np.bool_)) is False:
        raise InputTypeError(f"The 'prune' parameter must be True or False. Got {prune!r} instead.")
    epochs = int(check_number(epochs, "epochs", 0, integer=True))
    batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
    check_data(validation_data, "validation_data", model=model)
    if poisoned_validation_data is not None:
        check_data(poisoned_validation_data, "poisoned_validation_data", model=model)
    elif target is not None:
        raise InputError("The 'target' parameter needs `poisoned_validation_data`.")
    train = training_labels(check_data(train_data, "train_data", model=model), loss, model)
    extra = list(callbacks or [])
    if not all(isinstance(c, keras.callbacks.Callback) for c in extra):
        raise InputTypeError(f"The 'callbacks' parameter must be a list of tf_keras callbacks. "
                             f"Got {callbacks!r} instead.")

    names = layer_names(model, layers, default=_default_layers)
    copy = wrap_layers(model, names)  # a copy; already wrapped layers keep their masks
    reset_fine_pruning_state(copy, names)
    keras.utils.set_random_seed(seed)
    copy.compile(optimizer=optimizer or keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
                 loss=loss or loss_for(copy), metrics=["accuracy"])
    if prune:
        callback = FinePruning(validation_data, layers=names, max_accuracy_drop=max_accuracy_drop,
                               poisoned_validation_data=poisoned_validation_data, target=target,
                               stopping_rule=stopping_rule,
                               ranking_data=train_data if ranking_data is None else ranking_data)
    else:
        callback = _EvaluationLog(validation_data, poisoned_validation_data, target, 256)
    if epochs == 0:  # prune without fine-tuning (fit() refuses 0 epochs)
        logs = {}
        if prune:
            callback.set_model(copy)
            callback.on_train_begin()
            callback.on_train_end()
    elif isinstance(train, tuple):
        logs = copy.fit(*train, epochs=epochs, batch_size=batch_size, shuffle=True,
                        verbose=verbose, callbacks=[callback] + extra).history
    else:
        logs = copy.fit(train, epochs=epochs, verbose=verbose,
                        callbacks=[callback] + extra).history
    table = pd.DataFrame(logs)
    table.insert(0, "epoch", np.arange(1, len(table) + 1))
    sweep = callback.sweep_result_ if prune else None
    for name in names:
        if not isinstance(copy.get_layer(name), PruneByActivation):  # pragma: no cover - defensive
            raise RuntimeError(f"Layer '{name}' lost its PruneByActivation wrapper.")
    return FinePruneResult(copy, table, sweep, tuple(names))


def _default_layers(model):
    """The model's first PruneByActivation layer, else its last convolutional layer."""
    wrapped = masked_layers(model)
    return [wrapped[0].name if wrapped else last_conv_layer(model)]


@with_caller_keras
def fine_tune(model, train_data, validation_data=None, **kwargs):
    """Fine-tuning alone, the paper's baseline: :func:`fine_prune` with ``prune=False``.

    The copy of ``model`` is trained on ``train_data`` with the same optimizer,
    epochs and logs as :func:`fine_prune`; ``validation_data`` is only logged.
    Other keyword arguments are those of :func:`fine_prune`.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((6, 6, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    >>> x = np.random.default_rng(0).random((16, 6, 6, 1), dtype=np.float32)
    >>> fine_tune(model, (x, np.zeros(16, int)), (x, np.zeros(16, int)), epochs=1).channels_pruned
    0
    """
    if "prune" in kwargs:
        raise InputTypeError("fine_tune() does not take 'prune'; use fine_prune(..., prune=...) "
                             "instead.")
    return fine_prune(model, train_data, validation_data, prune=False, **kwargs)

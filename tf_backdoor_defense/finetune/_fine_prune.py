"""Fine-pruning and fine-tuning for people who do not write ``fit`` loops.

``fine_prune(model, train_data, clean_data)`` copies the model, wraps the
layer in ``PruneByActivation``, prunes it within an accuracy budget and
fine-tunes the copy with :class:`~tf_backdoor_defense.finetune._callbacks.FinePruning`.
``prune=False`` (or :func:`fine_tune`) fine-tunes without pruning: the
paper's baseline, through the same entry point and with the same logs.
"""


import numpy as np
import pandas as pd

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.finetune._callbacks import LOG_PREFIX, FinePruning
from tf_backdoor_defense.masks._wrapper import PruneByActivation, last_conv_layer, masked_layers, wrap_layers
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.finetune._training import loss_for
from tf_backdoor_defense._validation import check_data, check_model, check_number

__all__ = ["fine_prune", "fine_tune", "FinePruneResult"]


class FinePruneResult:
    """What :func:`fine_prune` returns.

    Attributes
    ----------
    model : tf_keras.Model
        The fine-pruned (or fine-tuned) copy, its layer wrapped in ``PruneByActivation``.
    history : pandas.DataFrame
        One row per epoch (``epoch``, ``loss``, ... and the ``fine_pruning/...`` figures).
    sweep_result : SweepResult, GroupSweepResult or None
        The pruning sweep made before fine-tuning (None when ``prune=False``).
    layer : str or list of str
    channels_pruned : int
        Over all the pruned layers.
    """

    def __init__(self, model, history, sweep_result, layer):
        self.model = model
        self.history = history
        self.sweep_result = sweep_result
        self.layer = layer

    @property
    def channels_pruned(self):
        names = self.layer if isinstance(self.layer, list) else [self.layer]
        return int(sum(self.model.get_layer(name).pruned_channels.size for name in names))

    def __repr__(self):
        return (f"FinePruneResult(layer={self.layer!r}, channels_pruned={self.channels_pruned}, "
                f"epochs={len(self.history)})")


class _EvaluationLog(keras.callbacks.Callback):
    """The logs of FinePruning, without pruning (for fine-tuning alone)."""

    def __init__(self, clean_data, poisoned_data, target, batch_size):
        super().__init__()
        self.clean_data, self.poisoned_data = clean_data, poisoned_data
        self.target, self.batch_size = target, batch_size

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs[LOG_PREFIX + "channels_pruned"] = 0.0
        logs[LOG_PREFIX + "fraction_pruned"] = 0.0
        logs[LOG_PREFIX + "clean_accuracy"] = clean_accuracy(self.model, self.clean_data,
                                                             self.batch_size)
        if self.poisoned_data is not None:
            logs[LOG_PREFIX + "attack_success_rate"] = attack_success_rate(
                self.model, self.poisoned_data, target=self.target, batch_size=self.batch_size)


def fine_prune(model, train_data, clean_data, *, layer=None, max_accuracy_drop=0.04, epochs=10,
               optimizer=None, loss=None, batch_size=64, poisoned_data=None, target=None,
               prune=True, stopping_rule="largest_within", ranking_data=None, seed=0, verbose=0,
               callbacks=None):
    """Fine-prune ``model``: prune a layer by activation, then fine-tune on ``train_data``.

    ``model`` is never modified: the work is done on a copy.

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network (Sequential or Functional).
    train_data : (x, y) arrays or tf.data.Dataset of batches
        Clean data for fine-tuning (labels as class indices or one-hot).
    clean_data : (x, y) arrays or tf.data.Dataset
        Clean data for the ranking, the accuracy budget and the logs.
    layer : str or list of str, default=None
        The layer to prune; default: the model's PruneByActivation layer, else
        the last convolutional layer. Several names prune those layers
        together (the several-layer sweep of :func:`prune_to_threshold`).
    max_accuracy_drop : float, default=0.04
    epochs : int, default=10
    optimizer : keras optimizer, default=None
        Default ``SGD(learning_rate=0.01, momentum=0.9)``.
    loss : keras loss, default=None
        Default sparse categorical cross-entropy (from logits unless the last
        layer is a softmax or sigmoid).
    batch_size : int, default=64
    poisoned_data, target : default=None
        Triggered data whose ASR is logged every epoch.
    prune : bool, default=True
        ``False`` fine-tunes alone (the paper's baseline).
    stopping_rule, ranking_data : see :func:`~tf_backdoor_defense.pruning._sweep.prune_to_threshold`.
    seed : int, default=0
    verbose : int, default=0
        Passed to ``fit``.
    callbacks : list of keras callbacks, default=None
        Extra callbacks for ``fit`` (progress bars, early stopping, TensorBoard...);
        they run after the pruning callback, so they see its ``fine_pruning/*`` logs.

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
    >>> len(result.history), result.model is model
    (2, False)
    """
    check_model(model)
    if isinstance(prune, (bool, np.bool_)) is False:
        raise TypeError(f"The 'prune' parameter must be True or False. Got {prune!r} instead.")
    epochs = int(check_number(epochs, "epochs", 0, integer=True))
    batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
    check_data(clean_data, "clean_data", model=model)
    if poisoned_data is None and target is not None:
        raise ValueError("The 'target' parameter needs `poisoned_data`.")
    train = check_data(train_data, "train_data", model=model)
    extra = list(callbacks or [])
    if not all(isinstance(c, keras.callbacks.Callback) for c in extra):
        raise TypeError(f"The 'callbacks' parameter must be a list of tf_keras callbacks. "
                        f"Got {callbacks!r} instead.")

    if layer is None:
        wrapped = masked_layers(model)
        layer = wrapped[0].name if wrapped else last_conv_layer(model)
    names = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if len(names) == 1:
        layer = names[0]
    copy = wrap_layers(model, names)  # a copy; already wrapped layers keep their masks
    keras.utils.set_random_seed(seed)
    copy.compile(optimizer=optimizer or keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
                 loss=loss or loss_for(copy), metrics=["accuracy"])
    if prune:
        callback = FinePruning(clean_data, layer=layer, max_accuracy_drop=max_accuracy_drop,
                               poisoned_data=poisoned_data, target=target,
                               stopping_rule=stopping_rule, ranking_data=ranking_data)
    else:
        callback = _EvaluationLog(clean_data, poisoned_data, target, 256)
    if train.x is not None:
        history = copy.fit(train.x, train.y, epochs=int(epochs), batch_size=int(batch_size),
                           shuffle=True, verbose=verbose, callbacks=[callback] + extra)
    else:
        history = copy.fit(train.dataset, epochs=int(epochs), verbose=verbose, callbacks=[callback] + extra)
    if prune and epochs == 0:  # fit() does not call the callbacks' train hooks for 0 epochs
        callback.set_model(copy)
        callback.on_train_begin()
    table = pd.DataFrame(history.history)
    table.insert(0, "epoch", np.arange(1, len(table) + 1))
    sweep = callback.sweep_result_ if prune else None
    for name in names:
        if not isinstance(copy.get_layer(name), PruneByActivation):  # pragma: no cover - defensive
            raise RuntimeError(f"Layer '{name}' lost its PruneByActivation wrapper.")
    return FinePruneResult(copy, table, sweep, layer)


def fine_tune(model, train_data, clean_data, **kwargs):
    """Fine-tuning alone, the paper's baseline: :func:`fine_prune` with ``prune=False``.

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
        raise TypeError("fine_tune() does not take 'prune'; use fine_prune(..., prune=...) instead.")
    return fine_prune(model, train_data, clean_data, prune=False, **kwargs)

"""``FinePruning`` for a Keras 3 ``model.fit``.

The Keras 3 callback runs the one fine-pruning engine, the tf-keras
:class:`tf_backdoor_defense.finetune.FinePruning`, on a tf-keras mirror of
the model being trained: before each decision the mirror takes the Keras 3
weights, and after it the masks, the zeroed weights and the fine-pruning
state go back into the Keras 3 ``PruneByActivation`` variables. So the two
callbacks behave the same by construction: the same sweep, the same budget,
masks held at zero after every epoch, ``fine_pruning/...`` logs in
``History``, and state kept in the model's variables (a later ``fit()`` or a
restored checkpoint continues the same run).
"""

from tf_backdoor_defense.finetune._callbacks import FinePruning as _TfKerasFinePruning
from tf_backdoor_defense._errors import InputTypeError
from tf_backdoor_defense.keras3._backend import is_keras3_model, keras3
from tf_backdoor_defense.keras3._caller import to_caller_keras
from tf_backdoor_defense.keras3._convert import copy_weights, to_tf_keras

keras = keras3()

__all__ = ["FinePruning"]


class FinePruning(keras.callbacks.Callback):
    """Fine-pruning inside a Keras 3 ``model.fit``: prune by activation, then keep pruned channels at 0.

    The model must hold Keras 3 ``PruneByActivation`` layers (for example
    from ``wrap_layers(keras3_model, "conv")``). The parameters and the
    behaviour are those of :class:`tf_backdoor_defense.finetune.FinePruning`.

    Parameters
    ----------
    validation_data : (x, y) arrays or tf.data.Dataset
        The defender's clean labelled data on which the level is chosen, the
        budget is judged and the accuracy is logged.
    layers : str or list of str, default=None
        The ``PruneByActivation`` layers to prune; default: the first one.
    max_accuracy_drop : float, default=0.04
        Allowed drop of validation accuracy, in absolute points.
    poisoned_validation_data : (x, y), default=None
        Triggered inputs; when given, the ASR is logged.
    target : default=None
        How to read the poisoned labels (see :mod:`tf_backdoor_defense.metrics`).
    stopping_rule : {"largest_within", "first_reaching"}, default="largest_within"
    ranking_data : (x, y) or x, default=None
        Data for the activation statistics; default ``validation_data``.
    schedule : GradualChannelSchedule, default=None
        Prune gradually instead of once.
    evaluate_every : int or None, default=1
    batch_size : int, default=256

    Attributes
    ----------
    sweep_result_, rankings_, mean_activations_, channels_pruned_,
    baseline_accuracy_, stopped_by_budget_
        As on the tf-keras callback; ``sweep_result_`` holds Keras 3 models.

    Examples
    --------
    >>> import numpy as np, keras
    >>> from tf_backdoor_defense import wrap_layers
    >>> from tf_backdoor_defense.keras3 import FinePruning
    >>> keras.utils.set_random_seed(0)
    >>> model = wrap_layers(keras.Sequential([keras.Input((6, 6, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")]), "conv")
    >>> model.compile("sgd", "sparse_categorical_crossentropy")
    >>> x = np.random.default_rng(0).random((32, 6, 6, 1), dtype=np.float32)
    >>> y = np.argmax(model.predict(x, verbose=0), axis=1)
    >>> history = model.fit(x, y, epochs=1, verbose=0,
    ...                     callbacks=[FinePruning((x, y), max_accuracy_drop=0.1)])
    >>> sorted(k for k in history.history if k.startswith("fine_pruning/"))
    ['fine_pruning/channels_pruned', 'fine_pruning/clean_accuracy', 'fine_pruning/fraction_pruned']
    """

    def __init__(self, validation_data=None, *, layers=None, max_accuracy_drop=0.04,
                 poisoned_validation_data=None, target=None, stopping_rule="largest_within",
                 ranking_data=None, schedule=None, evaluate_every=1, batch_size=256):
        super().__init__()
        self._engine = _TfKerasFinePruning(
            validation_data, layers=layers, max_accuracy_drop=max_accuracy_drop,
            poisoned_validation_data=poisoned_validation_data, target=target,
            stopping_rule=stopping_rule, ranking_data=ranking_data, schedule=schedule,
            evaluate_every=evaluate_every, batch_size=batch_size)
        self._mirror = None
        self._sweep_result = None

    # -- the engine's state, read through ------------------------------------------------
    def __getattr__(self, name):
        if name in ("channels_pruned_", "baseline_accuracy_", "stopped_by_budget_") and \
                self.__dict__.get("_mirror") is not None and self.model is not None:
            # As the model holds them now (after EarlyStopping restored weights, say).
            copy_weights(self.model, self._mirror, names=set(self._wrapper_names()),
                         masks_only=True)
        if name in ("rankings_", "mean_activations_", "channels_pruned_", "baseline_accuracy_",
                    "stopped_by_budget_", "validation_data", "layers", "max_accuracy_drop",
                    "poisoned_validation_data", "target", "stopping_rule", "ranking_data",
                    "schedule", "evaluate_every", "batch_size"):
            return getattr(self.__dict__["_engine"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def sweep_result_(self):
        """The one-shot sweep this callback ran, with Keras 3 models (None when it ran none)."""
        result = self._engine.sweep_result_
        if result is None:
            return None
        if self._sweep_result is None or self._sweep_result[0] is not result:
            self._sweep_result = (result, to_caller_keras(result))
        return self._sweep_result[1]

    # -- mirror <-> model ----------------------------------------------------------------
    def _wrapper_names(self):
        return [wrapper.name for wrapper in self._engine._wrappers]

    def _to_mirror(self):
        copy_weights(self.model, self._mirror)

    def _from_mirror(self, masks_only=False):
        copy_weights(self._mirror, self.model, names=set(self._wrapper_names()),
                     masks_only=masks_only)

    # -- Keras hooks ---------------------------------------------------------------------
    def set_model(self, model):
        if not is_keras3_model(model):
            raise InputTypeError(
                "This FinePruning is the Keras 3 callback, but model.fit runs a tf-keras model: "
                "use tf_backdoor_defense.FinePruning, which serves both.")
        super().set_model(model)

    def on_train_begin(self, logs=None):
        self._mirror = to_tf_keras(self.model)
        self._engine.set_model(self._mirror)
        self._engine.on_train_begin(logs)
        self._from_mirror()

    def on_train_batch_end(self, batch, logs=None):
        if self._engine.schedule is None:
            return
        due = self._engine._prunings_due(batch)
        if due:
            self._to_mirror()
        self._engine.on_train_batch_end(batch, logs)
        # Without pruning only the step moved: the model's trained weights are newer than the
        # mirror's, and stay.
        self._from_mirror(masks_only=not due)

    def on_epoch_end(self, epoch, logs=None):
        self._to_mirror()
        self._engine.on_epoch_end(epoch, logs)
        self._from_mirror()

    def on_train_end(self, logs=None):
        self._to_mirror()
        self._engine.on_train_end(logs)
        self._from_mirror()

"""Fine-pruning as a Keras callback: wrap the layers, add the callback, call ``fit``.

``FinePruning`` prunes once, at the start of training, to the largest level
within an accuracy budget (the sweep of
:func:`~tf_backdoor_defense.pruning._sweep.prune_to_threshold`), then lets
``fit`` fine-tune the rest of the network. With
``schedule=GradualChannelSchedule(...)`` it prunes a few channels every N
steps instead, in the manner of tfmot's pruning schedules, up to a target
fraction or until the accuracy budget is spent.

State lives in the model, as tfmot keeps ``pruning_step``: each
``PruneByActivation`` layer holds its mask and three non-trainable variables,
``fine_pruning_step`` (training steps seen by a gradual schedule),
``fine_pruning_baseline`` (the validation accuracy the budget is measured
from) and ``fine_pruning_status`` (not started, pruning, done, stopped by the
budget). The callback only reads and writes them, so a callback reused for
another ``fit()``, or a fresh callback on a model restored from a checkpoint,
continues where the first run stopped, within the first run's budget: a
finished one-shot run prunes nothing more, and a gradual schedule goes on at
the saved step. :func:`reset_fine_pruning_state` starts over.

Masked channels output exactly zero and receive exactly zero gradient. Their
kernel slices and biases are set to zero when pruned, at every epoch end and
at train end, so no optimizer momentum or slot carried over from earlier
training can leave non-zero weights behind.

Figures are written into the epoch ``logs`` under ``fine_pruning/...``, so
they show in ``History``, ``CSVLogger`` and ``TensorBoard``. Put
``FinePruning`` before ``CSVLogger``/``TensorBoard`` in the callbacks list.

The callback works under ``tf.distribute`` (Mirrored and MultiWorkerMirrored):
the activation statistics are reduced across replicas and workers (see
:mod:`tf_backdoor_defense.scoring._distributed`) and every worker derives the
same masks. The layers may also sit inside tfmot's ``prune_low_magnitude``
wrapper; the sweep then runs on a plain copy of the model (same weights, no
tfmot wrappers).
"""

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras
from tf_backdoor_defense._validation import (check_data, check_number, check_ranking_data,
                                             renamed_argument)
from tf_backdoor_defense.masks._wrapper import PruneByActivation, clone_layer
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.pruning._levels import STOPPING_RULES
from tf_backdoor_defense.pruning._ranking import layer_rankings, rank_channels
from tf_backdoor_defense.pruning._sweep import prune_to_threshold
from tf_backdoor_defense.scoring._distributed import distributed_channel_means, is_distributed
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["FinePruning", "GradualChannelSchedule", "find_prunable_wrappers",
           "reset_fine_pruning_state", "LOG_PREFIX"]

LOG_PREFIX = "fine_pruning/"

# Values of PruneByActivation.fine_pruning_status, and its fine_pruning_baseline when unset.
NOT_STARTED, PRUNING, DONE, STOPPED_BY_BUDGET = 0, 1, 2, 3
NO_BASELINE = -1.0

try:  # tfmot does not export the wrapper class publicly
    from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
        PruneLowMagnitude as _PLM,
    )
except ImportError:  # pragma: no cover - other tfmot layouts
    _PLM = ()


def find_prunable_wrappers(model, layers=None):
    """The ``PruneByActivation`` layers of ``model`` named by ``layers``, with their holders.

    Looks at the model's layers and inside tfmot ``PruneLowMagnitude``
    wrappers; a name may be the ``PruneByActivation`` layer's or its tfmot
    wrapper's.

    Parameters
    ----------
    model : tf_keras.Model
    layers : str or list of str, default=None
        One name or several; default: the model's first ``PruneByActivation`` layer.

    Returns
    -------
    list of (outer, wrapper)
        The model's layer and the ``PruneByActivation`` layer (the same object
        unless tfmot wraps it), in the order of ``layers``.

    Examples
    --------
    >>> import tf_keras as keras
    >>> from tf_backdoor_defense import wrap_layers
    >>> model = wrap_layers(keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="a"),
    ...                                       keras.layers.Dense(2, name="b")]), ["a", "b"])
    >>> [wrapper.name for _, wrapper in find_prunable_wrappers(model, ["b", "a"])]
    ['b', 'a']
    """
    found = _all_wrappers(model)
    if not found:
        raise InputError(
            f"The model '{model.name}' has no PruneByActivation layer. Wrap the layers to prune "
            "first: `model = tf_backdoor_defense.wrap_layers(model, 'conv_name')`.")
    if layers is None:
        return found[:1]
    names = _names(layers)
    pairs = []
    for name in names:
        match = [pair for pair in found if name in (pair[0].name, pair[1].name)]
        if not match:
            known = [wrapper.name for _, wrapper in found]
            raise InputError(f"The 'layers' parameter must name PruneByActivation layers of the "
                             f"model: some of {known}. Got {name!r} instead.")
        pairs.append(match[0])
    return pairs


def _all_wrappers(model):
    """Every ``(outer, PruneByActivation)`` pair of ``model``, in model order."""
    found = []
    for outer in model.layers:
        if isinstance(outer, PruneByActivation):
            found.append((outer, outer))
        elif isinstance(outer, _PLM) and isinstance(outer.layer, PruneByActivation):
            found.append((outer, outer.layer))
    return found


def _names(layers):
    """``layers`` (one name or a list of distinct names) as a list."""
    if isinstance(layers, str):
        return [layers]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(n, str) for n in layers):
        raise InputTypeError(f"The 'layers' parameter must be a layer name or a list of names. "
                             f"Got {layers!r} instead.")
    if not layers or len(set(layers)) != len(layers):
        raise InputError(f"The 'layers' parameter must list distinct layer names. "
                         f"Got {list(layers)!r}.")
    return list(layers)


def _plain_copy(model):
    """A copy of ``model`` with tfmot's PruneLowMagnitude wrappers replaced by their layers."""

    def clone(layer):
        inner = layer.layer if isinstance(layer, _PLM) else layer
        return clone_layer(inner)

    copy = keras.models.clone_model(model, clone_function=clone)
    targets = {layer.name: layer for layer in copy.layers}
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, _PLM) else layer
        targets[inner.name].set_weights(inner.get_weights())
    return copy


# -- the state held by the PruneByActivation layers -------------------------------------------
def _read_state(wrappers):
    """``(status, step, baseline)`` shared by ``wrappers``; a clear error when they differ."""
    states = [(int(w.fine_pruning_status.numpy()), int(w.fine_pruning_step.numpy()),
               float(w.fine_pruning_baseline.numpy())) for w in wrappers]
    first = states[0]
    for state in states[1:]:
        if state != first:
            names = [w.name for w in wrappers]
            raise InputError(
                f"The layers {names} hold different fine-pruning states (status, step, baseline "
                f"accuracy): {states}. Fine-prune them together from the start, or call "
                "`reset_fine_pruning_state(model)` to start over.")
    return first


def _write_state(wrappers, status=None, step=None, baseline=None):
    for wrapper in wrappers:
        if status is not None:
            wrapper.fine_pruning_status.assign(status)
        if step is not None:
            wrapper.fine_pruning_step.assign(step)
        if baseline is not None:
            wrapper.fine_pruning_baseline.assign(baseline)


@with_caller_keras(in_place=True)
def reset_fine_pruning_state(model, layers=None):
    """Forget the fine-pruning state held in ``model``'s ``PruneByActivation`` layers, in place.

    The next :class:`FinePruning` run then starts over: it measures a new
    baseline accuracy and prunes within its own budget, from the channels
    already pruned. The masks are kept.

    Parameters
    ----------
    model : tf_keras.Model
        A model with ``PruneByActivation`` layers (also inside tfmot wrappers).
    layers : str or list of str, default=None
        The layers to reset; default: all of them.

    Examples
    --------
    >>> import tf_keras as keras
    >>> from tf_backdoor_defense import wrap_layers
    >>> model = wrap_layers(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")]),
    ...                     "d")
    >>> model.get_layer("d").fine_pruning_status.assign(2) is not None
    True
    >>> reset_fine_pruning_state(model)
    >>> int(model.get_layer("d").fine_pruning_status.numpy())
    0
    """
    pairs = find_prunable_wrappers(model, layers)  # a clear error without wrappers
    if layers is None:
        pairs = _all_wrappers(model)
    wrappers = [wrapper for _, wrapper in pairs]
    _write_state(wrappers, status=NOT_STARTED, step=0, baseline=NO_BASELINE)


class GradualChannelSchedule:
    """Prune ``channels_per_step`` more channels every ``every_n_steps`` training steps.

    Pruning starts after ``begin_step`` steps and stops at ``target_fraction``
    of each layer's channels, or earlier when the callback's accuracy budget
    would be exceeded. Channels are taken in the order of the ranking made at
    train begin (lowest mean activation first).

    Examples
    --------
    >>> schedule = GradualChannelSchedule(target_fraction=0.5, channels_per_step=2, every_n_steps=10)
    >>> schedule.prunes_at(10), schedule.prunes_at(15), schedule.target_channels(32)
    (True, False, 16)
    """

    def __init__(self, target_fraction=0.5, channels_per_step=1, every_n_steps=100, begin_step=0):
        self.target_fraction = float(check_number(target_fraction, "target_fraction", positive=True,
                                                  maximum=1))
        self.channels_per_step = int(check_number(channels_per_step, "channels_per_step", 1,
                                                  integer=True))
        self.every_n_steps = int(check_number(every_n_steps, "every_n_steps", 1, integer=True))
        self.begin_step = int(check_number(begin_step, "begin_step", 0, integer=True))

    def prunes_at(self, step):
        """Whether pruning happens after ``step`` completed training steps."""
        return step >= self.begin_step and step > 0 and \
            (step - self.begin_step) % self.every_n_steps == 0

    def prunings_between(self, done, now):
        """How many pruning steps fall after step ``done`` up to step ``now``.

        One batch hook can complete several steps (``steps_per_execution`` in
        ``compile``): each pruning step passed counts.

        >>> GradualChannelSchedule(every_n_steps=3).prunings_between(2, 10)
        3
        """
        return sum(self.prunes_at(step) for step in range(done + 1, now + 1))

    def target_channels(self, channels):
        """Number of channels pruned at the end of the schedule."""
        return int(np.floor(self.target_fraction * channels + 1e-9))

    def __repr__(self):
        return (f"GradualChannelSchedule(target_fraction={self.target_fraction}, "
                f"channels_per_step={self.channels_per_step}, every_n_steps={self.every_n_steps}, "
                f"begin_step={self.begin_step})")


class _ServedResult:
    """A result attribute of :class:`FinePruning`: the Keras 3 callback's while that one serves
    a Keras 3 fit for it, else the value this callback set."""

    def __set_name__(self, owner, name):
        self.name, self.slot = name, "_" + name

    def __get__(self, callback, owner=None):
        if callback is None:
            return self
        served = callback.__dict__.get("_keras3")
        return getattr(served, self.name) if served is not None else \
            callback.__dict__.get(self.slot)

    def __set__(self, callback, value):
        callback.__dict__[self.slot] = value


class FinePruning(keras.callbacks.Callback):
    """Prune ``PruneByActivation`` layers during ``fit``: once at train begin, or gradually.

    Without a ``schedule``, at the first ``on_train_begin`` the channels are
    ranked by mean activation on ``ranking_data`` (default
    ``validation_data``) and the sweep engine picks the pruning level within
    ``max_accuracy_drop`` on ``validation_data``; the masks are set on the
    model's layers and the pruned kernel slices and biases are set to zero.
    Fine-tuning is the ``fit`` call itself.

    The same callback serves a Keras 3 ``model.fit`` (a model from ``wrap_layers``
    on a Keras 3 model): there it hands every hook to
    :class:`tf_backdoor_defense.keras3.FinePruning`, made with its settings, and
    its attributes read that callback's results.

    With ``schedule=GradualChannelSchedule(...)``, nothing is pruned at train
    begin. After every ``schedule.every_n_steps`` steps,
    ``schedule.channels_per_step`` more channels are pruned in ranking order,
    one at a time, until ``schedule.target_fraction`` of each layer is reached
    or, when ``max_accuracy_drop`` is not None, until pruning one more channel
    would drop validation accuracy (of the model being fine-tuned) by more than
    the budget below the accuracy at the first train begin; that channel is
    then kept and pruning stops. With several layers, each channel pruned comes
    from the layer with the smallest fraction pruned so far (ties: the order
    given), so the layers advance together.

    The state (step, baseline accuracy, whether pruning has finished, masks)
    lives in variables of the ``PruneByActivation`` layers, not in the
    callback: the same callback used for a second ``fit()``, or a new callback
    on a model restored from a checkpoint (``save_weights``/``load_weights``,
    ``tf.train.Checkpoint``, a saved model), continues within the budget of the
    first run. A finished run prunes no more; a gradual schedule resumes at
    the saved step (a callback without a schedule refuses to cut into one
    under way). See :func:`reset_fine_pruning_state`.

    Parameters
    ----------
    validation_data : (x, y) arrays or tf.data.Dataset
        The defender's clean labelled data on which the level is chosen, the
        budget is judged and the accuracy is logged.
    layers : str or list of str, default=None
        The ``PruneByActivation`` layers (their names, or their tfmot
        wrappers'); default: the model's first one. Several names prune those
        layers together.
    max_accuracy_drop : float, default=0.04
        Allowed drop of validation accuracy, in absolute points. With a
        ``schedule`` it may be ``None`` (no budget, prune to the target fraction).
    poisoned_validation_data : (x, y) arrays or tf.data.Dataset, default=None
        Triggered inputs beside ``validation_data``; when given, the ASR is logged.
    target : default=None
        How to read the poisoned labels (see :mod:`tf_backdoor_defense.metrics`).
    stopping_rule : {"largest_within", "first_reaching"}, default="largest_within"
        One-shot pruning only (see :mod:`tf_backdoor_defense.pruning._levels`).
    ranking_data : (x, y) arrays, x alone, or a tf.data.Dataset of (x, y) or of x, default=None
        Data for the activation statistics; default ``validation_data``.
    schedule : GradualChannelSchedule, default=None
        Prune gradually instead of once.
    evaluate_every : int or None, default=1
        Log validation accuracy (and ASR) every this many epochs; ``None``
        logs only the channel counts, which costs nothing.
    batch_size : int, default=256
        Batch size for statistics and evaluation.
    clean_data, layer, poisoned_data : deprecated
        The old names of ``validation_data``, ``layers`` and
        ``poisoned_validation_data``; they still work in this release, with a
        ``DeprecationWarning``.

    Attributes
    ----------
    sweep_result_ : SweepResult or None
        The one-shot sweep this callback ran (None when it ran none).
    rankings_ : dict or None
        ``{layer: channels in pruning order}`` computed at the last train begin.
    mean_activations_ : dict or None
        ``{layer: mean activation per channel}`` on the ranking data.
    channels_pruned_ : int
        Channels pruned now, over all the pruned layers.
    baseline_accuracy_ : float or None
        The accuracy the budget is measured from, read from the model.
    stopped_by_budget_ : bool
        Whether a gradual schedule stopped because of the budget (read from the model).

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> from tf_backdoor_defense import wrap_layers
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
                 ranking_data=None, schedule=None, evaluate_every=1, batch_size=256,
                 clean_data=None, layer=None, poisoned_data=None):
        super().__init__()
        validation_data = renamed_argument("FinePruning", "clean_data", clean_data,
                                           "validation_data", validation_data)
        layers = renamed_argument("FinePruning", "layer", layer, "layers", layers)
        poisoned_validation_data = renamed_argument(
            "FinePruning", "poisoned_data", poisoned_data, "poisoned_validation_data",
            poisoned_validation_data)
        if validation_data is None:
            raise InputError("FinePruning needs `validation_data`: the defender's clean labelled "
                             "(x, y) data, on which the level is chosen and accuracy is measured.")
        check_data(validation_data, "validation_data")
        if poisoned_validation_data is not None:
            check_data(poisoned_validation_data, "poisoned_validation_data")
        elif target is not None:
            raise InputError("The 'target' parameter needs `poisoned_validation_data`.")
        if ranking_data is not None:
            check_ranking_data(ranking_data, "ranking_data")
        if stopping_rule not in STOPPING_RULES:
            raise InputError(f"The 'stopping_rule' parameter must be one of "
                             f"{list(STOPPING_RULES)}. Got {stopping_rule!r} instead.")
        if schedule is not None and not isinstance(schedule, GradualChannelSchedule):
            raise InputTypeError(f"The 'schedule' parameter must be a GradualChannelSchedule or "
                                 f"None. Got {type(schedule).__name__}.")
        self.validation_data = validation_data
        self.layers = None if layers is None else _names(layers)
        self.max_accuracy_drop = check_number(max_accuracy_drop, "max_accuracy_drop", maximum=1,
                                              allow_none=schedule is not None)
        if self.max_accuracy_drop is not None:
            self.max_accuracy_drop = float(self.max_accuracy_drop)
        self.poisoned_validation_data = poisoned_validation_data
        self.target = target
        self.stopping_rule = stopping_rule
        self.ranking_data = ranking_data
        self.schedule = schedule
        self.evaluate_every = check_number(evaluate_every, "evaluate_every", 1, integer=True,
                                           allow_none=True)
        self.batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
        self._keras3 = None  # the Keras 3 callback that serves a Keras 3 fit for this one
        self._use_own_hooks()
        self.sweep_result_ = None
        self.rankings_ = None
        self.mean_activations_ = None
        self._pairs = []
        self._step = 0
        self._last_batch = -1  # the batch index the last batch hook of this fit got

    sweep_result_ = _ServedResult()
    rankings_ = _ServedResult()
    mean_activations_ = _ServedResult()

    # -- helpers ---------------------------------------------------------
    @property
    def _wrappers(self):
        return [wrapper for _, wrapper in self._pairs]

    def _resolve(self):
        self._pairs = find_prunable_wrappers(self.model, self.layers)
        for wrapper in self._wrappers:
            if not wrapper.built or wrapper.mask is None:
                raise InputError(f"PruneByActivation layer '{wrapper.name}' is not built; build "
                                 "the model before training.")
        # The sweep and statistics need a model whose layers are top-level PruneByActivation.
        plain = all(outer is wrapper for outer, wrapper in self._pairs)
        self._stats_model = self.model if plain else _plain_copy(self.model)

    def _distributed_rankings(self):
        """``({layer: ranking}, {layer: means})`` reduced over replicas and workers, or Nones."""
        strategy = self.model.distribute_strategy
        if not is_distributed(strategy):
            return None, None
        data = self.validation_data if self.ranking_data is None else self.ranking_data
        means = {w.name: np.asarray(distributed_channel_means(
            self._stats_model, data, w.name, strategy=strategy, batch_size=self.batch_size))
            for w in self._wrappers}
        return {name: rank_channels(values) for name, values in means.items()}, means

    def _sweep(self):
        """The one-shot sweep on the model as it is now; returns the SweepResult."""
        rankings, means = self._distributed_rankings()
        result = prune_to_threshold(
            self._stats_model, self.validation_data, layers=[w.name for w in self._wrappers],
            max_accuracy_drop=self.max_accuracy_drop,
            poisoned_validation_data=self.poisoned_validation_data, target=self.target,
            stopping_rule=self.stopping_rule, ranking_data=self.ranking_data, ranking=rankings,
            batch_size=self.batch_size)
        self.rankings_ = dict(result.rankings)
        self.mean_activations_ = dict(result.mean_activations if means is None else means)
        return result

    def _rank(self):
        """Rank every pruned layer's channels on the ranking data (for a gradual schedule)."""
        rankings, means = self._distributed_rankings()
        if rankings is None:
            data = self.validation_data if self.ranking_data is None else self.ranking_data
            rankings, means, _ = layer_rankings(self._stats_model,
                                                [w.name for w in self._wrappers], data,
                                                self.batch_size)
        self.rankings_, self.mean_activations_ = rankings, means

    def _zero_pruned_weights(self):
        for wrapper in self._wrappers:
            wrapper.zero_pruned_weights()

    @property
    def channels_pruned_(self):
        """Channels whose mask is 0 now, over all the pruned layers."""
        if self._keras3 is not None:
            return self._keras3.channels_pruned_
        return int(sum(wrapper.pruned_channels.size for wrapper in self._wrappers))

    @property
    def baseline_accuracy_(self):
        """The accuracy the budget is measured from, as the model holds it (None if unset)."""
        if self._keras3 is not None:
            return self._keras3.baseline_accuracy_
        if not self._pairs:
            return None
        status, _, baseline = _read_state(self._wrappers)
        return None if status == NOT_STARTED or baseline == NO_BASELINE else baseline

    @property
    def stopped_by_budget_(self):
        """Whether a gradual schedule stopped because of the budget (as the model holds it)."""
        if self._keras3 is not None:
            return self._keras3.stopped_by_budget_
        return bool(self._pairs) and _read_state(self._wrappers)[0] == STOPPED_BY_BUDGET

    def _clean_accuracy(self):
        return clean_accuracy(self.model, self.validation_data, batch_size=self.batch_size)

    # -- Keras hooks -----------------------------------------------------
    def set_model(self, model):
        from tf_backdoor_defense.keras3._backend import is_keras3_model

        super().set_model(model)
        if is_keras3_model(model):
            self._serve_keras3(model)
        elif self._keras3 is not None:  # served a Keras 3 fit before: its own hooks again
            self._keras3 = None
            self._use_own_hooks()

    _KERAS3_HOOKS = ("on_train_begin", "on_train_batch_end", "on_epoch_end", "on_train_end")

    def _use_own_hooks(self):
        for name in self._KERAS3_HOOKS:
            self.__dict__.pop(name, None)
        if self.schedule is not None:
            # Only a schedule needs the per-batch hook; without one, fit() skips batch hooks.
            self.on_train_batch_end = self._count_step

    def _serve_keras3(self, model):
        """A Keras 3 ``model.fit`` runs this callback: the Keras 3 one does the work.

        :class:`tf_backdoor_defense.keras3.FinePruning`, made with this
        callback's settings, receives every hook (its engine is a tf-keras
        callback like this one, on a mirror of the model), and the results
        are read through: ``sweep_result_`` (Keras 3 models),
        ``channels_pruned_`` and the rest.
        """
        from tf_backdoor_defense.keras3._callbacks import FinePruning as Keras3FinePruning

        if self._keras3 is None:
            self._keras3 = Keras3FinePruning(
                self.validation_data, layers=self.layers, max_accuracy_drop=self.max_accuracy_drop,
                poisoned_validation_data=self.poisoned_validation_data, target=self.target,
                stopping_rule=self.stopping_rule, ranking_data=self.ranking_data,
                schedule=self.schedule, evaluate_every=self.evaluate_every,
                batch_size=self.batch_size)
        self._keras3.set_model(model)
        for name in self._KERAS3_HOOKS:  # instance attributes: they take over the methods
            setattr(self, name, getattr(self._keras3, name))

    def on_train_begin(self, logs=None):
        self._resolve()
        self._last_batch = -1
        status, step, baseline = _read_state(self._wrappers)
        if self.schedule is None:
            if status == PRUNING:
                names = [w.name for w in self._wrappers]
                raise InputError(
                    f"A gradual schedule is under way on {names}: continue it with "
                    "FinePruning(..., schedule=...), or call `reset_fine_pruning_state(model)` "
                    "to prune once from here.")
            if status == NOT_STARTED:
                result = self._sweep()
                self.sweep_result_ = result
                masks = result.masks[self.max_accuracy_drop]
                for wrapper in self._wrappers:
                    wrapper.set_mask(masks[wrapper.name])
                _write_state(self._wrappers, status=DONE, baseline=result.baseline_accuracy)
            self._zero_pruned_weights()
            return
        self._step = step
        if status == NOT_STARTED or (status == PRUNING and self.max_accuracy_drop is not None
                                     and baseline == NO_BASELINE):
            baseline = (self._clean_accuracy() if self.max_accuracy_drop is not None
                        else NO_BASELINE)
            _write_state(self._wrappers, status=PRUNING, baseline=baseline)
        if _read_state(self._wrappers)[0] == PRUNING:
            self._rank()
            self._targets = {w.name: self.schedule.target_channels(w.channels)
                             for w in self._wrappers}
            if self._next_layer() is None:
                _write_state(self._wrappers, status=DONE)

    def on_epoch_end(self, epoch, logs=None):
        self._zero_pruned_weights()
        if logs is None:
            return
        logs[LOG_PREFIX + "channels_pruned"] = float(self.channels_pruned_)
        logs[LOG_PREFIX + "fraction_pruned"] = self.channels_pruned_ / sum(
            wrapper.channels for wrapper in self._wrappers)
        if self.evaluate_every and (epoch + 1) % self.evaluate_every == 0:
            logs[LOG_PREFIX + "clean_accuracy"] = self._clean_accuracy()
            if self.poisoned_validation_data is not None:
                logs[LOG_PREFIX + "attack_success_rate"] = attack_success_rate(
                    self.model, self.poisoned_validation_data, target=self.target,
                    batch_size=self.batch_size)

    def on_train_end(self, logs=None):
        self._zero_pruned_weights()

    # -- the gradual schedule --------------------------------------------
    def _steps_in(self, batch):
        """Training steps the batch hook at ``batch`` completed.

        Keras calls the hook with the index, within the epoch, of the last
        batch run: with ``steps_per_execution=k`` once every ``k`` steps. An
        index not above the last one starts a new epoch.
        """
        batch = int(batch)
        return batch + 1 if batch <= self._last_batch else batch - self._last_batch

    def _prunings_due(self, batch):
        """How many pruning steps the batch hook at ``batch`` reaches."""
        return self.schedule.prunings_between(self._step, self._step + self._steps_in(batch))

    def _count_step(self, batch, logs=None):
        """``on_train_batch_end`` with a schedule: count the steps, prune when it is due."""
        due = self._prunings_due(batch)
        self._step += self._steps_in(batch)
        self._last_batch = int(batch)  # after _steps_in, which reads the previous one
        _write_state(self._wrappers, step=self._step)
        for _ in range(due):
            if int(self._wrappers[0].fine_pruning_status.numpy()) != PRUNING:
                break
            self._prune_more()

    def _next_layer(self):
        """The wrapper to prune next: below its target, smallest fraction pruned; or None."""
        open_ = [w for w in self._wrappers
                 if w.pruned_channels.size < self._targets[w.name] and np.any(w.get_mask() == 1)]
        if not open_:
            return None
        return min(open_, key=lambda w: w.pruned_channels.size / w.channels)  # first on ties

    def _prune_more(self):
        baseline = _read_state(self._wrappers)[2]
        status = PRUNING
        for _ in range(self.schedule.channels_per_step):
            wrapper = self._next_layer()
            if wrapper is None:
                break
            mask = wrapper.get_mask()
            channel = next(c for c in self.rankings_[wrapper.name] if mask[c] == 1)
            mask[channel] = 0.0
            wrapper.set_mask(mask)
            if self.max_accuracy_drop is not None:
                drop = baseline - self._clean_accuracy()
                if drop > self.max_accuracy_drop + 1e-12:
                    mask[channel] = 1.0
                    wrapper.set_mask(mask)
                    status = STOPPED_BY_BUDGET
                    break
        self._zero_pruned_weights()
        if status == PRUNING and self._next_layer() is None:
            status = DONE
        if status != PRUNING:
            _write_state(self._wrappers, status=status)

"""Fine-pruning as a Keras callback: wrap the layer, add the callback, call ``fit``.

``FinePruning`` prunes once, at the start of training, to the largest level
within an accuracy budget (the sweep of :func:`~tf_backdoor_defense.pruning._sweep.prune_to_threshold`),
then lets ``fit`` fine-tune the rest of the network. ``GradualFinePruning``
(or ``FinePruning(..., schedule=GradualChannelSchedule(...))``) prunes a few
channels every N steps instead, in the manner of tfmot's pruning schedules,
up to a target fraction or until the accuracy budget is spent.

The mask lives in the ``PruneByActivation`` layer, so masked channels output
exactly zero and receive exactly zero gradient. Their kernel slices and
biases are set to zero when pruned, at every epoch end and at train end, so
no optimizer momentum or slot carried over from earlier training can leave
non-zero weights behind.

Figures are written into the epoch ``logs`` under ``fine_pruning/...``, so
they show in ``History``, ``CSVLogger`` and ``TensorBoard``. Put
``FinePruning`` before ``CSVLogger``/``TensorBoard`` in the callbacks list.

The callbacks work under ``tf.distribute`` (Mirrored and MultiWorkerMirrored):
the activation statistics are reduced across replicas and workers (see
:mod:`tf_backdoor_defense.scoring._distributed`) and every worker derives the same mask.
The layer may also sit inside tfmot's ``prune_low_magnitude`` wrapper; the
sweep then runs on a plain copy of the model (same weights, no tfmot wrappers).
"""


import numpy as np

from tf_backdoor_defense._keras import keras
from tf_backdoor_defense.scoring._activations import mean_channel_activations
from tf_backdoor_defense.scoring._distributed import distributed_channel_means, is_distributed
from tf_backdoor_defense.masks._wrapper import PruneByActivation
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.pruning._ranking import rank_channels
from tf_backdoor_defense.pruning._sweep import STOPPING_RULES, prune_to_threshold
from tf_backdoor_defense._validation import check_data, check_number

__all__ = ["FinePruning", "GradualFinePruning", "GradualChannelSchedule", "find_prunable_wrapper",
           "LOG_PREFIX"]

LOG_PREFIX = "fine_pruning/"
try:  # tfmot does not export the wrapper class publicly
    from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
        PruneLowMagnitude as _PLM,
    )
except ImportError:  # pragma: no cover - other tfmot layouts
    _PLM = ()


def find_prunable_wrapper(model, layer=None):
    """The ``PruneByActivation`` layer of ``model`` and the top-level layer holding it.

    Looks at the model's layers and inside tfmot ``PruneLowMagnitude``
    wrappers. ``layer`` names either of them; default: the first one.

    Returns
    -------
    (outer, wrapper) : the model's layer and the ``PruneByActivation`` layer
        (the same object unless tfmot wraps it).
    """
    found = []
    for outer in model.layers:
        if isinstance(outer, PruneByActivation):
            found.append((outer, outer))
        elif isinstance(outer, _PLM) and isinstance(outer.layer, PruneByActivation):
            found.append((outer, outer.layer))
    if not found:
        raise ValueError(
            f"The model '{model.name}' has no PruneByActivation layer. Wrap the layer to prune "
            "first: `model = tf_backdoor_defense.wrap_layers(model, 'conv_name')`.")
    if layer is None:
        return found[0]
    if not isinstance(layer, str):
        raise TypeError(f"The 'layer' parameter must be a layer name (str). Got {layer!r} instead.")
    for outer, wrapper in found:
        if layer in (outer.name, wrapper.name):
            return outer, wrapper
    names = [wrapper.name for _, wrapper in found]
    raise ValueError(f"The 'layer' parameter must name a PruneByActivation layer of the model: "
                     f"one of {names}. Got {layer!r} instead.")


def _plain_copy(model):
    """A copy of ``model`` with tfmot's PruneLowMagnitude wrappers replaced by their layers."""

    def clone(layer):
        inner = layer.layer if isinstance(layer, _PLM) else layer
        return inner.__class__.from_config(inner.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    targets = {layer.name: layer for layer in copy.layers}
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, _PLM) else layer
        targets[inner.name].set_weights(inner.get_weights())
    return copy


class GradualChannelSchedule:
    """Prune ``channels_per_step`` more channels every ``every_n_steps`` training steps.

    Pruning starts after ``begin_step`` steps and stops at ``target_fraction``
    of the layer's channels, or earlier when the callback's accuracy budget
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
        self.channels_per_step = int(check_number(channels_per_step, "channels_per_step", 1, integer=True))
        self.every_n_steps = int(check_number(every_n_steps, "every_n_steps", 1, integer=True))
        self.begin_step = int(check_number(begin_step, "begin_step", 0, integer=True))

    def prunes_at(self, step):
        """Whether pruning happens after ``step`` completed training steps."""
        return step >= self.begin_step and step > 0 and \
            (step - self.begin_step) % self.every_n_steps == 0

    def target_channels(self, channels):
        """Number of channels pruned at the end of the schedule."""
        return int(np.floor(self.target_fraction * channels + 1e-9))

    def __repr__(self):
        return (f"GradualChannelSchedule(target_fraction={self.target_fraction}, "
                f"channels_per_step={self.channels_per_step}, every_n_steps={self.every_n_steps}, "
                f"begin_step={self.begin_step})")


class FinePruning(keras.callbacks.Callback):
    """Prune a ``PruneByActivation`` layer at train begin, then fine-tune with ``fit``.

    At ``on_train_begin`` the channels are ranked by mean activation on
    ``ranking_data`` (default ``clean_data``) and the sweep engine picks the
    pruning level within ``max_accuracy_drop`` on ``clean_data``; the mask is
    set on the model's layer and the pruned kernel slices and biases are set
    to zero. Fine-tuning is the ``fit`` call itself.

    Parameters
    ----------
    clean_data : (x, y) arrays or tf.data.Dataset
        The defender's clean labelled data.
    layer : str or list of str, default=None
        The ``PruneByActivation`` layer (its name, or its tfmot wrapper's);
        default: the first one in the model. Several names prune those layers
        together: one-shot with the several-layer sweep of
        :func:`prune_to_threshold`, or gradually with a ``schedule``.
    max_accuracy_drop : float, default=0.04
        Allowed drop of clean accuracy, in absolute points. For the gradual
        schedule it may be ``None`` (no budget, prune to the target fraction).
    poisoned_data : (x, y) arrays or tf.data.Dataset, default=None
        Triggered inputs; when given, the ASR is logged.
    target : default=None
        How to read the poisoned labels (see :mod:`tf_backdoor_defense.metrics`).
    stopping_rule : {"largest_within", "first_reaching"}, default="largest_within"
    ranking_data : default=None
        Data for the activation statistics; default ``clean_data``.
    schedule : GradualChannelSchedule, default=None
        Prune gradually instead of once (gives a :class:`GradualFinePruning`).
    evaluate_every : int or None, default=1
        Log clean accuracy (and ASR) every this many epochs; ``None`` logs
        only the channel counts, which costs nothing.
    batch_size : int, default=256
        Batch size for statistics and evaluation.

    Attributes
    ----------
    sweep_result_ : SweepResult, GroupSweepResult or None
    ranking_ : numpy.ndarray (``{layer: array}`` for several layers)
    mean_activations_ : numpy.ndarray (``{layer: array}`` for several layers)
    channels_pruned_ : int
        Channels pruned now, over all the pruned layers.
    baseline_accuracy_ : float

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

    def __new__(cls, *args, schedule=None, **kwargs):
        if cls is FinePruning and schedule is not None:
            cls = GradualFinePruning
        return super().__new__(cls)

    def __init__(self, clean_data=None, *, layer=None, max_accuracy_drop=0.04, poisoned_data=None,
                 target=None, stopping_rule="largest_within", ranking_data=None, schedule=None,
                 evaluate_every=1, batch_size=256):
        super().__init__()
        if clean_data is None:
            raise ValueError(f"{type(self).__name__} needs `clean_data`: the defender's clean "
                             "labelled (x, y) data, on which channels are ranked and accuracy is "
                             "measured.")
        check_data(clean_data, "clean_data")
        if poisoned_data is not None:
            check_data(poisoned_data, "poisoned_data")
        elif target is not None:
            raise ValueError("The 'target' parameter needs `poisoned_data`.")
        if ranking_data is not None:
            check_data(ranking_data, "ranking_data")
        if stopping_rule not in STOPPING_RULES:
            raise ValueError(f"The 'stopping_rule' parameter must be one of {list(STOPPING_RULES)}. "
                             f"Got {stopping_rule!r} instead.")
        if schedule is not None and not isinstance(schedule, GradualChannelSchedule):
            raise TypeError(f"The 'schedule' parameter must be a GradualChannelSchedule or None. "
                            f"Got {type(schedule).__name__}.")
        if isinstance(layer, (list, tuple)):
            if not layer or len(set(layer)) != len(layer):
                raise ValueError(f"The 'layer' parameter must list distinct layer names. "
                                 f"Got {list(layer)!r}.")
            layer = list(layer) if len(layer) > 1 else layer[0]
        self.clean_data = clean_data
        self.layer_name = layer
        self.max_accuracy_drop = check_number(max_accuracy_drop, "max_accuracy_drop", maximum=1,
                                              allow_none=schedule is not None)
        if self.max_accuracy_drop is not None:
            self.max_accuracy_drop = float(self.max_accuracy_drop)
        self.poisoned_data = poisoned_data
        self.target = target
        self.stopping_rule = stopping_rule
        self.ranking_data = ranking_data
        self.schedule = schedule
        self.evaluate_every = check_number(evaluate_every, "evaluate_every", 1, integer=True,
                                           allow_none=True)
        self.batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
        self.sweep_result_ = None
        self.ranking_ = None
        self.mean_activations_ = None
        self.baseline_accuracy_ = None
        self._outer = self._wrapper = None
        self._pairs = []

    # -- helpers ---------------------------------------------------------
    @property
    def _several(self):
        return isinstance(self.layer_name, list)

    def _resolve(self):
        names = self.layer_name if self._several else [self.layer_name]
        self._pairs = [find_prunable_wrapper(self.model, name) for name in names]
        self._outer, self._wrapper = self._pairs[0]
        for _, wrapper in self._pairs:
            if not wrapper.built or wrapper.mask is None:
                raise ValueError(f"PruneByActivation layer '{wrapper.name}' is not built; build "
                                 "the model before training.")
        # The sweep and statistics need a model whose layers are top-level PruneByActivation.
        plain = all(outer is wrapper for outer, wrapper in self._pairs)
        self._stats_model = self.model if plain else _plain_copy(self.model)

    @property
    def _wrappers(self):
        return [wrapper for _, wrapper in self._pairs]

    def _rank(self):
        """Rank every pruned layer's channels; returns ``{layer: ranking}``."""
        data = self.clean_data if self.ranking_data is None else self.ranking_data
        strategy = self.model.distribute_strategy
        means = {}
        for wrapper in self._wrappers:
            if is_distributed(strategy):
                means[wrapper.name] = np.asarray(distributed_channel_means(
                    self._stats_model, data, wrapper.name, strategy=strategy,
                    batch_size=self.batch_size))
            else:
                means[wrapper.name] = np.asarray(mean_channel_activations(
                    self._stats_model, data, layer=wrapper.name, batch_size=self.batch_size))
        rankings = {name: rank_channels(values) for name, values in means.items()}
        self.mean_activations_ = means if self._several else means[self._wrapper.name]
        self.ranking_ = rankings if self._several else rankings[self._wrapper.name]
        return rankings

    def _apply(self, mask):
        masks = mask if isinstance(mask, dict) else {self._wrapper.name: mask}
        for wrapper in self._wrappers:
            wrapper.set_mask(masks[wrapper.name])
            wrapper.zero_pruned_weights()

    def _zero_pruned_weights(self):
        for wrapper in self._wrappers:
            wrapper.zero_pruned_weights()

    @property
    def channels_pruned_(self):
        """Channels whose mask is 0 now, over all the pruned layers."""
        return int(sum(wrapper.pruned_channels.size for wrapper in self._wrappers))

    def _clean_accuracy(self):
        return clean_accuracy(self.model, self.clean_data, batch_size=self.batch_size)

    # -- Keras hooks -----------------------------------------------------
    def on_train_begin(self, logs=None):
        self._resolve()
        # several layers are ranked by the sweep itself, on this replica's copy of the data
        ranking = (self._rank()[self._wrapper.name] if is_distributed(self.model.distribute_strategy)
                   and not self._several else None)
        result = prune_to_threshold(
            self._stats_model, self.clean_data,
            layer=[w.name for w in self._wrappers] if self._several else self._wrapper.name,
            max_accuracy_drop=self.max_accuracy_drop, poisoned_data=self.poisoned_data,
            target=self.target, stopping_rule=self.stopping_rule, ranking_data=self.ranking_data,
            ranking=ranking, batch_size=self.batch_size)
        self.sweep_result_ = result
        if ranking is None:
            self.ranking_ = result.rankings if self._several else result.ranking
            self.mean_activations_ = result.mean_activations
        self.baseline_accuracy_ = result.baseline_accuracy
        self._apply(result.masks[self.max_accuracy_drop])

    def on_epoch_end(self, epoch, logs=None):
        self._zero_pruned_weights()
        if logs is None:
            return
        logs[LOG_PREFIX + "channels_pruned"] = float(self.channels_pruned_)
        logs[LOG_PREFIX + "fraction_pruned"] = self.channels_pruned_ / sum(
            wrapper.channels for wrapper in self._wrappers)
        if self.evaluate_every and (epoch + 1) % self.evaluate_every == 0:
            logs[LOG_PREFIX + "clean_accuracy"] = self._clean_accuracy()
            if self.poisoned_data is not None:
                logs[LOG_PREFIX + "attack_success_rate"] = attack_success_rate(
                    self.model, self.poisoned_data, target=self.target, batch_size=self.batch_size)

    def on_train_end(self, logs=None):
        self._zero_pruned_weights()


class GradualFinePruning(FinePruning):
    """Fine-pruning that prunes a few channels every N steps, as tfmot's schedules do.

    At train begin the channels are ranked (nothing is pruned). After every
    ``schedule.every_n_steps`` steps, ``schedule.channels_per_step`` more
    channels are pruned in ranking order, one at a time, until
    ``schedule.target_fraction`` is reached or, when ``max_accuracy_drop`` is
    not None, until pruning one more channel would drop clean accuracy (of the
    model being fine-tuned, on ``clean_data``) by more than the budget below
    the accuracy at train begin; that channel is then kept and pruning stops.

    With several layers, each pruned channel comes from the layer with the
    smallest fraction pruned so far (ties: the order given), so the layers
    advance together towards ``target_fraction`` of each.

    Parameters are those of :class:`FinePruning`; ``schedule`` defaults to
    ``GradualChannelSchedule()``.
    """

    def __init__(self, clean_data=None, *, schedule=None, **kwargs):
        super().__init__(clean_data, schedule=schedule or GradualChannelSchedule(), **kwargs)

    def on_train_begin(self, logs=None):
        self._resolve()
        self._rankings = self._rank()
        self._step = 0
        self._done = False
        self._targets = {w.name: self.schedule.target_channels(w.channels) for w in self._wrappers}
        self.baseline_accuracy_ = (self._clean_accuracy() if self.max_accuracy_drop is not None
                                   else None)
        self.stopped_by_budget_ = False

    def _next_layer(self):
        """The wrapper to prune next: below its target, smallest fraction pruned; or None."""
        open_ = [w for w in self._wrappers
                 if w.pruned_channels.size < self._targets[w.name] and np.any(w.get_mask() == 1)]
        if not open_:
            return None
        return min(open_, key=lambda w: w.pruned_channels.size / w.channels)  # first on ties

    def _prune_more(self):
        for _ in range(self.schedule.channels_per_step):
            wrapper = self._next_layer()
            if wrapper is None:
                self._done = True
                break
            mask = wrapper.get_mask()
            channel = next(c for c in self._rankings[wrapper.name] if mask[c] == 1)
            mask[channel] = 0.0
            wrapper.set_mask(mask)
            if self.max_accuracy_drop is not None:
                drop = self.baseline_accuracy_ - self._clean_accuracy()
                if drop > self.max_accuracy_drop + 1e-12:
                    mask[channel] = 1.0
                    wrapper.set_mask(mask)
                    self._done = True
                    self.stopped_by_budget_ = True
                    break
        self._zero_pruned_weights()
        if self._next_layer() is None:
            self._done = True

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if not self._done and self.schedule.prunes_at(self._step):
            self._prune_more()

"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

Backdoor neurons are unusually *sensitive*: a small perturbation of their
strength makes a backdoored network misclassify clean inputs (towards the
target class), while a benign network tolerates it. ANP learns a mask
``m_k`` in [0, 1] per neuron (channel) on a little clean data, minimising

    alpha * L(m, clean) + (1 - alpha) * max_{|delta|, |xi| <= eps} L(m + perturbation, clean)

and prunes the neurons whose mask ends low. The inner maximisation is one (or
``steps``) step(s) of sign-gradient ascent from a uniform random start in
``[-eps, eps]``, then projection back to ``[-eps, eps]`` (the paper's
algorithm; the authors' code omits the projection). The mask follows SGD
with momentum and is clipped to [0, 1] after every step. Defaults are the
paper's: ``eps=0.4``, ``steps=1``, ``alpha=0.2``, learning rate 0.2 with
momentum 0.9, batches of 128 drawn with replacement, 2000 iterations and a
pruning threshold of 0.2.

Where the perturbation acts
---------------------------
The authors perturb BatchNorm layers: ``gamma * (m + delta) * x_hat + beta *
(1 + xi)``. Many Keras networks have no BatchNorm, so here the perturbation
acts on the pruned Conv/Dense layer itself. With ``W x`` its output without
bias and ``b`` its bias, channel ``k`` computes

    act((m_k + delta_k) * (W x)_k + (m_k + xi_k) * b_k)

The noise is exactly the authors': a relative perturbation of the channel's
linear part (``delta``) and of its bias (``xi``), each within ``eps``. The
mask multiplies *both* parts, because this package prunes with
``PruneByActivation``, which zeroes the whole channel: with ``m_k = 0`` the
channel outputs ``act(0)``, i.e. exactly what the pruned channel outputs for
ReLU, linear or tanh activations. (The authors' mask scales only the BN weight
and their pruning zeroes only that weight, so there too mask and pruning
agree.) At ``m_k = 1`` the form equals the authors' ``(1 + delta) W x + (1 +
xi) b``. A channel of a layer that is already wrapped in ``PruneByActivation``
keeps its existing mask as a fixed factor.

Other choices: the network runs in inference mode (``training=False``) during
the optimisation, so BatchNorm uses its moving statistics and Dropout is off
(the authors run BN in training mode); the loss is sparse categorical
cross-entropy (binary for a single sigmoid unit), from logits unless the last
layer applies softmax or sigmoid; all masks of all layers are learned jointly
and pruning by ``fraction``/``count`` ranks channels across layers, as the
authors do. The whole optimisation is one compiled ``tf.function`` loop, and
the random batches and noise come from stateless generators keyed by
``seed``, so a seed gives the same masks on the same machine.
"""


from dataclasses import dataclass

import numpy as np

from tf_backdoor_defense._distribute import (batch_mean, is_distributed, replica_rows,
                                             resolve_strategy, sum_over_replicas, summed_loss)
from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.masks._registry import is_prunable
from tf_backdoor_defense.masks._results import MasksResult
from tf_backdoor_defense.masks._wrapper import (PruneByActivation, apply_masks, channel_axis,
                                                channel_count, check_not_nested, clone_layer,
                                                find_layer,
                                                layer_names, unwrap)
from tf_backdoor_defense.scoring._lipschitz import scorable_layer
from tf_backdoor_defense.finetune._training import loss_for
from tf_backdoor_defense._validation import check_data, check_fraction, check_model, check_number
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["anp_mask_scores", "anp_masks", "anp_prune", "AnpResult", "anp_layers"]


@dataclass(frozen=True, eq=False, repr=False)
class AnpResult(MasksResult):
    """What :func:`anp_prune` returns.

    Attributes
    ----------
    model : tf_keras.Model
        A copy of the input with ``PruneByActivation`` on the scored layers and
        the pruned channels' masks set to 0.
    masks : dict
        ``{layer_name: mask}`` (float32, 1 = kept, 0 = pruned).
    scores : dict
        ``{layer_name: learned mask values in [0, 1]}`` (low = suspicious).
    threshold, fraction, count : float, float, int
        The pruning rule used (the unused ones are None).
    """

    model: object
    masks: dict
    scores: dict
    threshold: float
    fraction: float
    count: int

    def __repr__(self):
        if self.fraction is not None:
            rule = f"fraction={self.fraction}"
        elif self.count is not None:
            rule = f"count={self.count}"
        else:
            rule = f"threshold={self.threshold}"
        return f"AnpResult({rule}, pruned={self.pruned_counts})"


def anp_layers(model):
    """ANP's default layers: every Conv layer and every Dense layer but the last.

    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, name="c"),
    ...     keras.layers.Flatten(), keras.layers.Dense(4, name="fc"), keras.layers.Dense(2, name="out")])
    >>> anp_layers(model)
    ['c', 'fc']
    """
    dense = [layer.name for layer in model.layers if isinstance(unwrap(layer), keras.layers.Dense)]
    last_dense = dense[-1] if dense else None
    return [layer.name for layer in model.layers
            if is_prunable(unwrap(layer)) and layer.name != last_dense]


# -- parameter checks ----------------------------------------------------------
# -- the perturbable copy --------------------------------------------------------
class _Switch:
    """Whether the noisy layers add their perturbation (read when a graph is traced)."""

    on = False


class _ChannelState:
    """Mask and noise variables of one layer's channels."""

    def __init__(self, channels, has_bias):
        self.mask = tf.Variable(tf.ones([channels]), trainable=True, name="anp_mask")
        self.delta = tf.Variable(tf.zeros([channels]), trainable=True, name="anp_noise")
        self.xi = (tf.Variable(tf.zeros([channels]), trainable=True, name="anp_noise_bias")
                   if has_bias else None)
        self.velocity = tf.Variable(tf.zeros([channels]), trainable=False, name="anp_velocity")

    @property
    def noise(self):
        return [self.delta] + ([self.xi] if self.xi is not None else [])


class _NoisyChannels(keras.layers.Layer):
    """``act((m + delta) * (W x) + (m + xi) * b) * prior`` along the channel axis."""

    def __init__(self, linear, bias, activation, axis, state, switch, prior=None, **kwargs):
        super().__init__(**kwargs)
        self.linear = linear
        self.bias_value = None if bias is None else tf.constant(bias, tf.float32)
        self.activation = activation
        self.axis = axis
        self._state = [state]  # a list, so Keras does not track the variables as weights
        self._switch = switch
        self.prior = None if prior is None else tf.constant(prior, tf.float32)

    def _broadcast(self, vector, rank):
        if self.axis == 1:
            return tf.reshape(vector, [1, -1] + [1] * (rank - 2))
        return vector

    def call(self, inputs):
        state = self._state[0]
        z = self.linear(inputs)
        rank = z.shape.rank
        if self._switch.on:
            scale, shift = state.mask + state.delta, state.mask + (state.xi if state.xi is not None else 0.0)
        else:
            scale = shift = state.mask
        z = z * self._broadcast(tf.cast(scale, z.dtype), rank)
        if self.bias_value is not None:
            z = z + self._broadcast(tf.cast(shift * self.bias_value, z.dtype), rank)
        out = self.activation(z)
        if self.prior is not None:
            out = out * self._broadcast(tf.cast(self.prior, out.dtype), rank)
        return out


def _noisy_copy(model, names, switch):
    """A copy of ``model`` whose layers in ``names`` are :class:`_NoisyChannels`."""
    targets = set(names)
    states = {}

    def clone(layer):
        check_not_nested(layer, targets)
        if layer.name not in targets:
            return clone_layer(layer)
        inner = unwrap(layer)
        config = dict(inner.get_config(), use_bias=False, activation="linear",
                      name=f"{layer.name}_linear")
        linear = inner.__class__.from_config(config)
        linear.trainable = False
        bias = inner.bias.numpy() if getattr(inner, "use_bias", False) else None
        prior = layer.get_mask() if isinstance(layer, PruneByActivation) else None
        state = _ChannelState(channel_count(inner), bias is not None)
        states[layer.name] = state
        return _NoisyChannels(linear, bias, inner.activation, channel_axis(layer), state, switch, prior,
                              name=layer.name)

    copy = keras.models.clone_model(model, clone_function=clone)
    sources = {layer.name: layer for layer in model.layers}
    for layer in copy.layers:
        source = sources[layer.name]
        if isinstance(layer, _NoisyChannels):
            layer.linear.kernel.assign(unwrap(source).kernel)
        else:
            layer.set_weights(source.get_weights())
    return copy, [states[name] for name in names]


def _loss_fn(model, summed=False):
    """ANP's loss of ``model``'s outputs (one sigmoid unit: labels reshaped); ``summed``: the
    sum over the batch instead of the mean."""
    loss = summed_loss(loss_for(model)) if summed else loss_for(model)
    if int(model.outputs[0].shape[-1]) == 1:
        return lambda y, out: loss(tf.cast(tf.reshape(y, [-1, 1]), out.dtype), out)
    return loss


@with_caller_keras
def anp_mask_scores(model, train_data, *, layers=None, eps=0.4, steps=1, alpha=0.2, iterations=2000,
                    batch_size=128, learning_rate=0.2, momentum=0.9, seed=0, strategy=None):
    """Learn ANP's per-channel masks on clean data (low value = backdoor suspect).

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network (a built Sequential or Functional model). Not modified.
    train_data : (x, y) arrays, LabeledData or tf.data.Dataset
        A little clean labelled data the masks are learned on (the paper uses
        500 images). A dataset is read into memory once.
    layers : str or list of str, default=None
        Conv/Dense layers whose channels get a mask. Default: :func:`anp_layers`
        (all Conv layers and all Dense layers except the last).
    eps : float, default=0.4
        Perturbation budget of the mask-multiplier and bias noise (>= 0; 0
        turns ANP into plain mask fitting on the clean loss).
    steps : int, default=1
        Sign-gradient ascent steps of the perturbation (step size ``eps / steps``).
    alpha : float, default=0.2
        Weight of the natural loss; ``1 - alpha`` weighs the perturbed loss.
    iterations : int, default=2000
        Mask updates, each on a batch drawn with replacement.
    batch_size : int, default=128
    learning_rate : float, default=0.2
        SGD learning rate of the masks.
    momentum : float, default=0.9
        SGD momentum of the masks (PyTorch convention).
    seed : int, default=0
        Seeds the batches and the noise; the same seed gives the same masks.
    strategy : tf.distribute.Strategy, default=None
        With several replicas, every replica takes its rows of each batch
        (the same batches as one device), the gradients of the noise and of
        the masks are summed over the replicas with ``strategy.reduce``, and
        every worker applies the same updates: the masks agree with one
        device's within float32 rounding (a sign step can amplify it).
        Default: ``model.distribute_strategy`` (one device outside any
        ``strategy.scope()``).

    Returns
    -------
    dict
        ``{layer_name: float32 array of mask values in [0, 1]}``, in layer order.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, activation="relu", name="hidden"),
    ...     keras.layers.Dense(2, activation="softmax", name="out")])
    >>> x, y = np.random.default_rng(0).random((16, 3)), np.arange(16) % 2
    >>> scores = anp_mask_scores(model, (x, y), iterations=5, batch_size=8)
    >>> list(scores), scores["hidden"].shape
    (['hidden'], (4,))
    >>> bool(np.all((scores["hidden"] >= 0) & (scores["hidden"] <= 1)))
    True
    """
    check_model(model)
    if not getattr(model, "_is_graph_network", False):
        raise InputError("ANP needs a Sequential or Functional model (a subclassed model cannot be "
                         "copied with perturbable layers). Build it with keras.Input first.")
    names = layer_names(model, layers, anp_layers, check=scorable_layer)
    eps = float(check_number(eps, "eps"))
    steps = int(check_number(steps, "steps", 1, integer=True))
    alpha = check_fraction(alpha, "alpha")
    iterations = int(check_number(iterations, "iterations", 0, integer=True))
    batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
    learning_rate = float(check_number(learning_rate, "learning_rate", positive=True))
    momentum = float(check_number(momentum, "momentum", below=1.0))
    seed = int(check_number(seed, "seed", 0, integer=True))
    data = check_data(train_data, "train_data", model=model)
    x, y = data.arrays()
    if x.shape[0] == 0:
        raise InputError("`train_data` is empty: it has no examples.")

    switch = _Switch()
    noisy, states = _noisy_copy(model, names, switch)
    loss_fn = _loss_fn(model)
    masks = [state.mask for state in states]
    velocities = [state.velocity for state in states]
    noise = [v for state in states for v in state.noise]
    step_size = eps / steps

    def forward_loss(xb, yb, perturbed):
        switch.on = perturbed
        try:
            return loss_fn(yb, noisy(xb, training=False))
        finally:
            switch.on = False

    def draw(i, x, y):
        """Iteration ``i``'s batch, with fresh noise: the same draws on any device."""
        base = tf.cast(i, tf.int64) * (len(noise) + 1)
        index = tf.random.stateless_uniform([batch_size], seed=tf.stack([tf.constant(seed, tf.int64), base]),
                                            minval=0, maxval=tf.shape(x)[0], dtype=tf.int32)
        if eps > 0:
            for j, v in enumerate(noise):
                v.assign(tf.random.stateless_uniform(
                    v.shape, seed=tf.stack([tf.constant(seed, tf.int64), base + j + 1]),
                    minval=-eps, maxval=eps))
        return tf.gather(x, index), tf.gather(y, index)

    @tf.function
    def optimise(x, y, iterations):
        for i in tf.range(iterations):
            xb, yb = draw(i, x, y)
            if eps > 0:
                for _ in range(steps):
                    with tf.GradientTape() as tape:
                        loss_adv = forward_loss(xb, yb, True)
                    grads = tape.gradient(loss_adv, noise)
                    for v, g in zip(noise, grads):
                        if g is not None:
                            v.assign(tf.clip_by_value(v + step_size * tf.sign(g), -eps, eps))
            with tf.GradientTape() as tape:
                loss_nat = forward_loss(xb, yb, False)
                loss_rob = forward_loss(xb, yb, True) if eps > 0 else loss_nat
                loss = alpha * loss_nat + (1.0 - alpha) * loss_rob
            grads = tape.gradient(loss, masks)
            for m, v, g in zip(masks, velocities, grads):
                if g is not None:
                    v.assign(momentum * v + g)
                    m.assign(tf.clip_by_value(m - learning_rate * v, 0.0, 1.0))
        return tf.constant(0)

    strategy = resolve_strategy(strategy, model)
    if is_distributed(strategy):
        _optimise_replicated(strategy, noisy, switch, _loss_fn(model, summed=True), states,
                             draw, x, y, settings=dict(eps=eps, steps=steps, alpha=alpha,
                                                       iterations=iterations,
                                                       batch_size=batch_size,
                                                       learning_rate=learning_rate,
                                                       momentum=momentum))
    else:
        optimise(tf.constant(x, tf.float32), tf.constant(y, tf.int64),
                 tf.constant(iterations, tf.int32))
    return {name: state.mask.numpy().astype(np.float32) for name, state in zip(names, states)}


def _optimise_replicated(strategy, noisy, switch, summed, states, draw, x, y, settings):
    """ANP's optimisation with each batch split over ``strategy``'s replicas.

    ``draw(i, x, y)`` gives iteration ``i``'s batch and noise, as on one
    device; each replica computes the
    gradients of its rows' share of the mean loss, ``strategy.reduce`` adds
    them, and every worker applies the same updates to its own variables.
    """
    eps, steps, alpha = settings["eps"], settings["steps"], settings["alpha"]
    batch_size = settings["batch_size"]
    masks = [state.mask for state in states]
    velocities = [state.velocity for state in states]
    noise = [v for state in states for v in state.noise]
    step_size = eps / steps
    x, y = tf.constant(x, tf.float32), tf.constant(y, tf.int64)

    def share(xb, yb, perturbed):
        """This replica's rows' share of the batch's mean loss."""
        switch.on = perturbed
        try:
            loss = summed(replica_rows(yb), noisy(replica_rows(xb), training=False))
        finally:
            switch.on = False
        return batch_mean(loss, batch_size)

    def gradients(loss, variables, tape):
        return [tf.zeros_like(v) if g is None else g for v, g in
                zip(variables, tape.gradient(loss, variables))]

    @tf.function
    def noise_gradients(xb, yb):
        with tf.GradientTape() as tape:
            loss = share(xb, yb, True)
        return gradients(loss, noise, tape)

    @tf.function
    def mask_gradients(xb, yb):
        with tf.GradientTape() as tape:
            natural = share(xb, yb, False)
            robust = share(xb, yb, True) if eps > 0 else natural
            loss = alpha * natural + (1.0 - alpha) * robust
        return gradients(loss, masks, tape)

    batch = tf.function(lambda i: draw(i, x, y))

    @tf.function
    def ascend(grads):
        for v, g in zip(noise, grads):
            v.assign(tf.clip_by_value(v + step_size * tf.sign(g), -eps, eps))

    @tf.function
    def descend(grads):
        for m, v, g in zip(masks, velocities, grads):
            v.assign(settings["momentum"] * v + g)
            m.assign(tf.clip_by_value(m - settings["learning_rate"] * v, 0.0, 1.0))

    for i in range(settings["iterations"]):
        xb, yb = batch(tf.constant(i, tf.int32))
        if eps > 0:
            for _ in range(steps):
                ascend(sum_over_replicas(strategy, strategy.run(noise_gradients, args=(xb, yb))))
        descend(sum_over_replicas(strategy, strategy.run(mask_gradients, args=(xb, yb))))


def anp_masks(scores, threshold=0.2, *, fraction=None, count=None):
    """ANP's pruning rule: masks that prune the channels with the lowest learned values.

    A pure function, so the rule can be swept without re-learning the scores.
    By default a channel is pruned when its value is ``<= threshold`` (as in
    the authors' ``prune_neuron_cifar.py``). With ``fraction`` or ``count``
    the ``threshold`` is ignored and that many channels with the lowest values
    across all layers are pruned (ties broken by layer order, then channel).

    Parameters
    ----------
    scores : dict
        ``{layer_name: mask values}`` as returned by :func:`anp_mask_scores`.
    threshold : float, default=0.2
        In [0, 1].
    fraction : float, default=None
        Fraction in [0, 1] of all scored channels to prune (rounded down).
    count : int, default=None
        Number of channels to prune.

    Returns
    -------
    dict
        ``{layer_name: float32 mask}`` (1 = kept, 0 = pruned).

    Examples
    --------
    >>> scores = {"a": [0.9, 0.1, 1.0], "b": [0.3, 0.0]}
    >>> {k: v.tolist() for k, v in anp_masks(scores).items()}
    {'a': [1.0, 0.0, 1.0], 'b': [1.0, 0.0]}
    >>> {k: v.tolist() for k, v in anp_masks(scores, count=3).items()}
    {'a': [1.0, 0.0, 1.0], 'b': [0.0, 0.0]}
    """
    if not isinstance(scores, dict) or not scores:
        raise InputTypeError(f"The 'scores' parameter must be a non-empty dict {{layer: values}}. Got {scores!r}.")
    arrays = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise InputError(f"The scores of '{name}' must be a non-empty array of finite numbers.")
        arrays[name] = values
    if fraction is not None and count is not None:
        raise InputError("Give at most one of 'fraction' and 'count'.")
    if fraction is None and count is None:
        threshold = check_fraction(threshold, "threshold")
        return {name: np.where(values <= threshold, 0.0, 1.0).astype(np.float32)
                for name, values in arrays.items()}
    flat = np.concatenate(list(arrays.values()))
    if fraction is not None:
        count = int(np.floor(check_fraction(fraction, "fraction") * flat.size + 1e-9))
    else:
        count = int(check_number(count, "count", 0, integer=True))
        if count > flat.size:
            raise InputError(f"The 'count' parameter must be at most the {flat.size} scored channels. "
                             f"Got {count} instead.")
    keep = np.ones(flat.size, np.float32)
    keep[np.argsort(flat, kind="stable")[:count]] = 0.0
    masks, start = {}, 0
    for name, values in arrays.items():
        masks[name] = keep[start:start + values.size].copy()
        start += values.size
    return masks


@with_caller_keras
def anp_prune(model, train_data=None, *, layers=None, threshold=0.2, fraction=None, count=None,
              scores=None, **options):
    """Adversarial Neuron Pruning of ``model``: learn masks, then prune the low ones.

    ``model`` is never modified; the result holds a copy with
    ``PruneByActivation`` masks (channels already pruned stay pruned).

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network.
    train_data : (x, y) arrays, LabeledData or tf.data.Dataset
        Clean data to learn the masks on (not needed when ``scores`` is given).
    layers : str or list of str, default=None
        Default: :func:`anp_layers`. With ``scores``, default: the scored layers.
    threshold, fraction, count
        The pruning rule of :func:`anp_masks` (default: value <= 0.2).
    scores : dict, default=None
        Masks already learned by :func:`anp_mask_scores`; skips the optimisation.
    **options
        ``eps``, ``steps``, ``alpha``, ``iterations``, ``batch_size``,
        ``learning_rate``, ``momentum``, ``seed`` for :func:`anp_mask_scores`.

    Returns
    -------
    AnpResult
        ``.model``, ``.masks``, ``.scores`` and the rule used.

    Examples
    --------
    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, activation="relu", name="hidden"),
    ...     keras.layers.Dense(2, activation="softmax", name="out")])
    >>> result = anp_prune(model, scores={"hidden": [1.0, 0.05, 0.9, 0.6]})
    >>> result.pruned_channels["hidden"].tolist()
    [1]
    """
    check_model(model)
    if scores is None:
        if train_data is None:
            raise InputError("anp_prune needs `train_data` to learn the masks (or precomputed "
                             "`scores`).")
        scores = anp_mask_scores(model, train_data, layers=layers, **options)
    else:
        if options:
            raise InputTypeError(f"Optimisation options {sorted(options)} have no effect with precomputed `scores`.")
        if not isinstance(scores, dict) or not scores:
            raise InputTypeError("The 'scores' parameter must be a non-empty dict {layer: values}.")
        names = layer_names(model, list(scores) if layers is None else layers, anp_layers,
                            check=scorable_layer)
        if set(names) != set(scores):
            raise InputError(f"The 'scores' cover layers {sorted(scores)} but 'layers' names {sorted(names)}.")
        scores = {name: np.asarray(scores[name], dtype=np.float32).reshape(-1) for name in names}
        for name, values in scores.items():
            channels = channel_count(find_layer(model, name))
            if values.size != channels:
                raise InputError(f"The scores of '{name}' have {values.size} entries; the layer has "
                                 f"{channels} channels.")
    pruned, masks = apply_masks(model, anp_masks(scores, threshold, fraction=fraction, count=count))
    used_threshold = None if (fraction is not None or count is not None) else float(threshold)
    return AnpResult(pruned, masks, scores, used_threshold, fraction, count)



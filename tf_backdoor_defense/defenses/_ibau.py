"""I-BAU: adversarial unlearning of backdoors with clean data only (Zeng et al., ICLR 2022).

Implicit Backdoor Adversarial Unlearning frames the repair as a minimax over
one *universal* perturbation ``delta`` (one for all inputs, as a trigger is):

    min_theta  max_{||delta|| <= radius}  L(f_theta(x + delta), y)

on the defender's clean data. A backdoor is a universal perturbation that
the network obeys, so the inner maximisation tends to rediscover it, and the
outer minimisation then teaches the network to ignore it while still
classifying clean inputs.

:func:`ibau` alternates the two over the clean data, batch by batch:

- **inner** (``inner_steps`` projected gradient ascent steps per batch,
  warm-started from the previous batch, reset every round): ``delta``
  maximises the cross-entropy of the perturbed inputs inside an L2 or Linf
  ball whose radius is given relative to the data's value range; perturbed
  inputs are clipped to that range;
- **outer** (one optimiser step per batch): the network is updated on the
  batch of which a ``perturbed_fraction`` carries ``delta`` and the rest
  stays clean; every input keeps the target of its clean original (by
  default the received model's prediction, see ``distill``).

The paper's outer gradient also differentiates through the inner solution
``delta*(theta)``: the implicit hypergradient. With ``hypergradient=True``
the outer step adds ``(d delta* / d theta)^T dL/d delta``, obtained, as in
the paper, from the fixed point of one inner gradient step
``Phi(delta, theta) = delta - eta * grad_delta L_inner``: a truncated Neumann
series of ``neumann_steps`` terms solves for the vector that meets the
mixed second derivative. The inner objective there is the negative
cross-entropy plus ``mu / 2 * ||delta||^2``, where ``mu`` is the ball
constraint's KKT multiplier at the found ``delta`` (the paper's objective
has a fixed small penalty; without the multiplier a perturbation on the
ball's surface is not a fixed point and the series diverges), and ``eta`` is
one over the largest curvature (a few power iterations); the multiplier is
computed as for an L2 ball with either norm. It costs several times a
first-order step and did not help in our measurements (see :func:`ibau`).

Both steps run under a ``tf.distribute`` strategy (``strategy=``): every
replica takes its rows of each batch; the inner step sums the replicas'
gradients in the perturbation before each ascent step, the outer step sums
their gradients in the weights. The hypergradient sums the replicas'
gradients and Hessian products in the perturbation at every step of its
power iteration and Neumann series.

Differences from the paper: the perturbation is refined on every batch
(warm-started) rather than once per round; only a share of each batch is
perturbed; the targets are the received model's own predictions on the clean
inputs, and each step also distils the received model on mixtures of pairs
of clean inputs (``anchor_weight``, see
:func:`~tf_backdoor_defense.defenses._unlearning.anchor_loss`), which keeps
clean accuracy when the defender has only a few hundred inputs; the network
runs in inference mode (BatchNormalization keeps its moving statistics;
Dropout is off). ``PruneByActivation`` masks are non-trainable, so pruned
channels stay at zero.

On MNIST the inner maximisation first finds natural universal perturbations
(strokes that turn digits into an 8 or a 2), which a trigger in an empty
corner cannot beat at first: the trigger's pixels get no gradient until the
backdoor starts to fire. The network is made robust to those first, and the
trigger is found later in training, so I-BAU needs more steps than unlearning
a known trigger and costs more accuracy.
"""

import logging
import time

import numpy as np

from tf_backdoor_defense._distribute import (batch_mean, replica_count, replica_rows,
                                             resolve_strategy, sum_over_replicas,
                                             summed_gradients, summed_loss, replica_layer_losses)
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense._labels import class_indices
from tf_backdoor_defense._validation import check_fraction, check_model, check_number, \
    num_classes_of
from tf_backdoor_defense.defenses._unlearning import batch_order, batch_spec, \
    check_flag, check_seed, default_epochs, mixup_pairs, replica_anchor_loss, target_loss, \
    teacher_function, training_targets
from tf_backdoor_defense.finetune._training import as_arrays, copy_model
from tf_backdoor_defense.graph._inputs import check_input_gradient, with_float_inputs
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["ibau", "NORMS"]

logger = logging.getLogger(__name__)

NORMS = ("l2", "linf")

#: Smallest L2 penalty of the inner objective used by the hypergradient, and the
#: power-iteration steps that estimate its curvature.
_PENALTY = 1e-3
_POWER_STEPS = 3


def _check_norm(norm):
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"The 'norm' parameter must be one of {list(NORMS)}. Got {norm!r}.")
    return norm.lower()


def _project(delta, radius, norm):
    if norm == "l2":
        size = tf.norm(delta)
        return delta * tf.minimum(1.0, radius / (size + 1e-12))
    return tf.clip_by_value(delta, -radius, radius)


class _Minimax:
    """The compiled inner and outer steps of :func:`ibau` on one network."""

    def __init__(self, model, *, loss_fn, radius, norm, inner_steps, step_size, low, high,
                 optimizer, hypergradient, neumann_steps, x_spec, target_spec, teacher=None,
                 anchor_weight=0.0, strategy=None, targeted=False):
        self.model = model
        # targeted: the inner step descends the loss towards the targets it is given (a
        # class), instead of ascending the loss of the true ones.
        self.targeted = bool(targeted)
        self.strategy = resolve_strategy(strategy, model)
        self.loss_fn = summed_loss(loss_fn)
        self.variables = model.trainable_variables
        self.delta = tf.Variable(tf.zeros(x_spec.shape[1:], tf.float32), trainable=False,
                                 name="universal_perturbation")
        self.radius = float(radius)
        self.norm = norm
        self.inner_steps = int(inner_steps)
        self.step_size = float(step_size)
        self.low, self.high = float(low), float(high)
        self.optimizer = optimizer
        self.hypergradient = bool(hypergradient)
        self.teacher = teacher
        self.anchor_weight = float(anchor_weight)
        self.soft_loss = summed_loss(target_loss(model, True))
        self.neumann_steps = int(neumann_steps)
        self.ascend = tf.function(self._ascend, input_signature=[x_spec, target_spec])
        self.descend = tf.function(self._descend, input_signature=[
            x_spec, target_spec, tf.TensorSpec((None,), tf.float32),
            tf.TensorSpec((None,), tf.int32), tf.TensorSpec((None,), tf.float32)])

    def _perturb(self, xb, delta, chosen=None):
        if chosen is None:
            return tf.clip_by_value(xb + delta, self.low, self.high)
        shape = tf.concat([tf.shape(chosen), tf.ones([tf.rank(xb) - 1], tf.int32)], axis=0)
        chosen = tf.reshape(chosen, shape)
        return tf.clip_by_value(xb + chosen * delta, self.low, self.high)

    def _loss(self, xb, yb, count=None):
        """The mean loss over a batch of ``count`` rows (default: ``xb``'s), of which ``xb`` are
        this replica's."""
        count = tf.shape(xb)[0] if count is None else count
        return batch_mean(self.loss_fn(yb, self.model(xb, training=False)), count)

    def _ascent_gradient(self, xb, yb, delta):
        """This replica's share of the perturbed loss and of its gradient in ``delta``."""
        count = tf.shape(xb)[0]
        xb, yb = replica_rows(xb), replica_rows(yb)
        with tf.GradientTape() as tape:
            tape.watch(delta)
            loss = self._loss(self._perturb(xb, delta), yb, count)
        return loss, tape.gradient(loss, delta)

    def _ascend(self, xb, yb):
        """``inner_steps`` projected ascent steps of the universal perturbation on one batch."""
        delta = self.delta.read_value()
        loss = tf.constant(0.0)
        for _ in range(self.inner_steps):  # unrolled: every step sums over the replicas
            loss, grad = sum_over_replicas(self.strategy, self.strategy.run(
                self._ascent_gradient, args=(xb, yb, delta)))
            if self.targeted:
                grad = -grad
            if self.norm == "l2":
                direction = grad / (tf.norm(grad) + 1e-12)
            else:
                direction = tf.sign(grad)
            delta = _project(delta + self.step_size * direction, self.radius, self.norm)
        self.delta.assign(delta)
        return loss

    def _inner_gradient(self, xb, yb, delta, multiplier, count):
        """This replica's share of the gradient in ``delta`` of the inner objective
        ``-L + multiplier / 2 * ||delta||^2`` over a batch of ``count`` rows."""
        with tf.GradientTape() as tape:
            tape.watch(delta)
            objective = (-self._loss(self._perturb(xb, delta), yb, count)
                         + 0.5 * multiplier * tf.reduce_sum(tf.square(delta)) / replica_count())
        return tape.gradient(objective, delta)

    def _hessian_product(self, xb, yb, delta, multiplier, vector, count):
        """The inner objective's Hessian in ``delta`` times ``vector``, summed over the replicas."""
        with tf.GradientTape() as tape:
            tape.watch(delta)
            product = tf.reduce_sum(self._inner_gradient(xb, yb, delta, multiplier, count)
                                    * tf.stop_gradient(vector))
        return _all_replicas(tape.gradient(product, delta))

    def _implicit_term(self, xb, yb, delta, outer_delta_grad, count):
        """``(d delta*/d theta)^T dL/d delta`` by a truncated Neumann series (fixed-point map).

        ``delta*`` is treated as a stationary point of ``-L + mu / 2 ||delta||^2``
        with ``mu`` the ball constraint's KKT multiplier at ``delta`` (so a
        perturbation on the sphere is a fixed point too), and the step ``eta``
        of the map ``Phi = delta - eta * grad`` is one over the largest
        curvature, estimated by power iteration.

        ``xb`` are this replica's rows of a batch of ``count``; the gradients
        and Hessian products in ``delta`` are summed over the replicas (the
        loops are unrolled, so that every step sums), and the mixed term
        returned is this replica's share, which the outer step sums.
        """
        outer_delta_grad = _all_replicas(outer_delta_grad)
        with tf.GradientTape() as tape:
            tape.watch(delta)
            loss = self._loss(self._perturb(xb, delta), yb, count)
        loss_grad = _all_replicas(tape.gradient(loss, delta))
        multiplier = (tf.nn.relu(tf.reduce_sum(loss_grad * delta))
                      / (tf.reduce_sum(tf.square(delta)) + 1e-12) + _PENALTY)
        size = tf.norm(outer_delta_grad) + 1e-12
        probe, curvature = outer_delta_grad / size, multiplier
        for _ in range(_POWER_STEPS):
            image = self._hessian_product(xb, yb, delta, multiplier, probe, count)
            curvature = tf.norm(image) + 1e-12
            probe = image / curvature
        eta = 1.0 / curvature
        cap = (self.neumann_steps + 1.0) * size  # what a contraction can reach at most
        v = outer_delta_grad
        for _ in range(self.neumann_steps):
            v = outer_delta_grad + v - eta * self._hessian_product(xb, yb, delta, multiplier, v,
                                                                   count)
            v = v * tf.minimum(1.0, cap / (tf.norm(v) + 1e-12))
        with tf.GradientTape() as tape:
            product = tf.reduce_sum(self._inner_gradient(xb, yb, delta, multiplier, count)
                                    * tf.stop_gradient(v))
        mixed = tape.gradient(product, self.variables)
        return [None if m is None else -eta * m for m in mixed]

    def _replica_descend(self, xb, yb, chosen, partner, weight, delta):
        count = tf.shape(xb)[0]
        clean = xb
        xb, yb, chosen = replica_rows(xb), replica_rows(yb), replica_rows(chosen)
        with tf.GradientTape(persistent=self.hypergradient) as tape:
            tape.watch(delta)
            loss = self._loss(self._perturb(xb, delta, chosen), yb, count)
            loss = loss + replica_layer_losses(self.model, loss.dtype)
            if self.teacher is not None and self.anchor_weight > 0:
                loss = loss + self.anchor_weight * replica_anchor_loss(
                    self.model, self.teacher, self.soft_loss, clean, partner, weight)
        grads = tape.gradient(loss, self.variables)
        if self.hypergradient:
            delta_grad = tape.gradient(loss, delta)
            del tape
            extra = self._implicit_term(xb, yb, delta, delta_grad, count)
            grads = [g if e is None else (e if g is None else g + e)
                     for g, e in zip(grads, extra)]
        grads = summed_gradients(grads)
        self.optimizer.apply_gradients(
            [(g, v) for g, v in zip(grads, self.variables) if g is not None],
            skip_gradients_aggregation=True)
        return loss

    def _descend(self, xb, yb, chosen, partner, weight):
        """One outer step on the batch, ``chosen`` (1/0 per example) marking the perturbed ones."""
        delta = self.delta.read_value()
        return sum_over_replicas(self.strategy, self.strategy.run(
            self._replica_descend, args=(xb, yb, chosen, partner, weight, delta)))


def _all_replicas(value):
    """Inside a replica: ``value`` summed over every replica (itself with one replica)."""
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, value)


def _check_target(target, model, hypergradient):
    """``target`` as None, an int class or an int64 array mapping each class to its target."""
    if target is None:
        return None
    classes = max(num_classes_of(model), 2)
    what = (f"The 'target' parameter must be a class index in [0, {classes - 1}], a sequence "
            f"of {classes} such indices (one target per class) or None. Got {target!r} instead.")
    if isinstance(target, (bool, np.bool_)):
        raise ValueError(what)
    if isinstance(target, (int, np.integer)):
        if not 0 <= int(target) < classes:
            raise ValueError(what)
        checked = int(target)
    else:
        try:
            mapping = np.asarray(target)
        except (TypeError, ValueError):
            raise ValueError(what) from None
        if (mapping.shape != (classes,) or mapping.dtype.kind not in "iu"
                or mapping.min() < 0 or mapping.max() >= classes):
            raise ValueError(what)
        checked = mapping.astype(np.int64)
    if hypergradient:
        raise ValueError("The 'target' parameter needs hypergradient=False (the implicit "
                         "term is derived for the untargeted inner objective).")
    return checked


def _inner_targets(targets, target):
    """The inner step's targets: ``target`` for every row, or ``target[c]`` for a row of class
    ``c`` (its training target's class, a one-hot/soft row's largest entry)."""
    soft = targets.ndim == 2 and targets.shape[1] > 1
    if isinstance(target, int):
        chosen = np.full(len(targets), target, dtype=np.int64)
    else:
        if targets.ndim == 2 and not soft:  # one sigmoid column: probability of class 1
            classes = (targets[:, 0] > 0.5).astype(np.int64)
        else:
            classes = class_indices(targets, "The training targets")
        chosen = target[classes]
    if soft:
        inner = np.zeros_like(targets)
        inner[np.arange(len(targets)), chosen] = 1
        return inner
    return chosen.reshape(targets.shape).astype(targets.dtype)


@with_caller_keras
def ibau(model, train_data, *, rounds=None, radius=3.0, norm="l2", inner_steps=5,
         perturbed_fraction=0.5, learning_rate=2e-3, distill=True, anchor_weight=3.0,
         hypergradient=False, neumann_steps=5, batch_size=64, seed=0, strategy=None,
         target=None):
    """Repair a copy of ``model`` by adversarial unlearning of a universal perturbation (I-BAU).

    Needs clean data only (the paper uses about 5% of the training set) and no
    trigger. See the module docs for the algorithm and how it differs from
    the paper.

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network (softmax or logit outputs; layers may be wrapped
        in ``PruneByActivation``, whose masks are kept). Not modified.
    train_data : (x, y) arrays or tf.data.Dataset
        The defender's clean labelled data. Its smallest and largest input
        values define the value range that perturbed inputs are clipped to
        and that ``radius`` is measured in.
    rounds : int, default=None
        Passes over ``train_data``; each starts the perturbation afresh.
        ``None`` gives about 300 outer steps (at least 2 rounds).
    radius : float, default=3.0
        Bound on the perturbation, in units of the data's value range: for
        data in [0, 1], ``||delta||_2 <= 3`` (``norm="l2"``), which holds the
        usual pixel, patch and blend triggers of 28x28 digits.
    norm : {"l2", "linf"}, default="l2"
    inner_steps : int, default=5
        Projected gradient ascent steps on the perturbation per batch; the
        step is ``2.5 * radius / inner_steps`` (normalised gradient for L2,
        its sign for Linf).
    perturbed_fraction : float in [0, 1], default=0.5
        Share of each batch that carries the perturbation in the outer step.
    learning_rate : float, default=2e-3
        Initial Adam learning rate of the outer (model) updates, decayed to
        zero along a cosine.
    distill : bool, default=True
        Targets of both steps are the received model's predictions on the
        unperturbed inputs (knowledge distillation) instead of the labels; see
        :func:`~tf_backdoor_defense.defenses._unlearning.unlearn_triggers`.
    anchor_weight : float, default=3.0
        Weight of the distillation of the received model on mixtures of pairs
        of each batch's clean inputs
        (:func:`~tf_backdoor_defense.defenses._unlearning.anchor_loss`); 0
        turns it off.
    hypergradient : bool, default=False
        Add the paper's implicit hypergradient term to the outer gradient.
        Measured with 1,000 clean digits on three MNIST nets (a clean one,
        pattern all-to-one, pixel all-to-all; accuracy on 500 other digits):
        it cost 1.4-1.6 points of accuracy against -0.8-0.6 without it, left
        19% ASR on the all-to-one net (0.2% without) and took 3-4 times as
        long, so it is off by default.
    neumann_steps : int, default=5
        Terms of the Neumann series that approximates the hypergradient.
    batch_size : int, default=64
        Global batch: each replica of ``strategy`` takes about
        ``batch_size / replicas`` of its rows.
    seed : int, default=0
        Seeds which inputs are perturbed, the batch order and Keras; the same
        seed gives the same weights.
    strategy : tf.distribute.Strategy, default=None
        Runs both steps on the strategy's replicas and workers (every worker
        needs the same ``train_data`` and ``seed``). Default:
        ``model.distribute_strategy`` (the strategy whose ``scope()`` the call
        runs in, else one device). Against one device the batches and the
        perturbed inputs chosen are the same; the perturbation and the
        weights agree within float32 tolerance, with ``hypergradient=True``
        too.
    target : int or sequence of int, default=None
        A suspected target class (from a scan): the inner step then looks
        for the universal perturbation that sends the inputs of the other
        classes *to it* (descending their loss towards ``target``) rather
        than any perturbation that raises the loss. A dense trigger such as a
        blend, which a scan's small mask does not reproduce, is found this way
        without the detour through natural perturbations; the outer step is
        unchanged (perturbed inputs keep their clean targets). A sequence
        with one class per class (``target[c]`` for inputs of class ``c``,
        their training target's class) searches for an all-to-all trigger
        along that map, such as the one-to-one map a scan's untargeted
        trigger follows (``ScanResult.all_to_all_map``).

    Returns
    -------
    tf_keras.Model
        The repaired copy, its variables made in ``strategy``'s scope.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
    ...                           keras.layers.Dense(2, activation="softmax")])
    >>> x = np.random.default_rng(0).random((32, 6, 6, 1), dtype=np.float32)
    >>> y = (x[:, 0, 0, 0] > 0.5).astype(int)
    >>> repaired = ibau(model, (x, y), rounds=1, inner_steps=2)
    >>> repaired is model
    False
    """
    check_model(model)
    strategy = resolve_strategy(strategy, model)
    x, y = as_arrays(train_data, "train_data", model)
    batch_size = int(check_number(batch_size, "batch_size", integer=True, positive=True))
    rounds = (default_epochs(x.shape[0], batch_size) if rounds is None
              else int(check_number(rounds, "rounds", 0, integer=True)))
    radius = float(check_number(radius, "radius", positive=True))
    norm = _check_norm(norm)
    inner_steps = int(check_number(inner_steps, "inner_steps", integer=True, positive=True))
    fraction = check_fraction(perturbed_fraction, "perturbed_fraction")
    learning_rate = float(check_number(learning_rate, "learning_rate", positive=True))
    distill = check_flag(distill, "distill")
    anchor_weight = float(check_number(anchor_weight, "anchor_weight"))
    hypergradient = check_flag(hypergradient, "hypergradient")
    neumann_steps = int(check_number(neumann_steps, "neumann_steps", 0, integer=True))
    seed = check_seed(seed)
    target = _check_target(target, model, hypergradient)
    low, high = float(np.min(x)), float(np.max(x))
    if high <= low:
        raise ValueError(f"The inputs of `train_data` are all equal ({low:g}); the "
                         "perturbation radius is measured in their value range, which is empty.")

    with strategy.scope():
        # Integer inputs have no gradient: the teacher reads float32 (one copy, or `model`).
        teacher = with_float_inputs(model)
    check_input_gradient(teacher, x, "I-BAU")
    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        tuned = copy_model(model)
    if rounds == 0:
        return tuned
    targets = training_targets(model, x, y, distill, strategy=strategy)
    inner_targets = targets if target is None else _inner_targets(targets, target)
    scaled = radius * (high - low)
    with strategy.scope():  # the optimiser's and the perturbation's variables
        # Integer inputs have no gradient: a copy that reads float32 is trained instead, and
        # its weights go back into `tuned` at the end.
        trained = with_float_inputs(tuned)
        solver = _Minimax(
            trained, loss_fn=target_loss(tuned, distill), radius=scaled, norm=norm,
            inner_steps=inner_steps, step_size=2.5 * scaled / inner_steps, low=low, high=high,
            optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
                learning_rate, rounds * int(np.ceil(x.shape[0] / batch_size)))),
            hypergradient=hypergradient, neumann_steps=neumann_steps,
            x_spec=batch_spec(x), target_spec=batch_spec(targets),
            teacher=teacher_function(teacher), anchor_weight=anchor_weight,
            strategy=strategy,
            targeted=target is not None)
    rng = np.random.default_rng(seed)
    inner = outer = float("nan")
    for round_ in range(rounds):
        solver.delta.assign(tf.zeros_like(solver.delta))
        for index in batch_order(x.shape[0], batch_size, rng):
            xb, yb = tf.constant(x[index]), tf.constant(targets[index])
            chosen = (rng.random(index.size) < fraction).astype(np.float32)
            inner = float(solver.ascend(xb, tf.constant(inner_targets[index])))
            outer = float(solver.descend(xb, yb, tf.constant(chosen),
                                         *mixup_pairs(rng, index.size)))
        logger.debug("ibau round %d/%d: perturbed loss %.4f, outer loss %.4f, |delta| %.3f",
                     round_ + 1, rounds, inner, outer, float(tf.norm(solver.delta)))
    if trained is not tuned:
        tuned.set_weights(trained.get_weights())
    logger.info("ibau: %d rounds, radius %.3g (%s) in %.1f s", rounds, scaled, norm,
                time.perf_counter() - started)
    return tuned

"""Reverse-engineer triggers: the smallest mask and pattern that send clean inputs to a class.

The optimisation of Neural Cleanse (Wang et al., IEEE S&P 2019), run for many
*slots* at once. A slot is one trigger to reverse: a target class (the
stamped inputs must be classified as it) or an untargeted slot (the stamped
inputs must leave their true class), and the clean inputs it is optimised on.
A stamped input is ``x * (1 - m) + m * p`` with the mask ``m`` (H, W, 1) in
[0, 1] and the pattern ``p`` (H, W, C) within the data's value range, both
written through ``tanh`` so that every value of the free variables is valid.

Slots are optimised in chunks: one variable tensor of shape (S, H, W, ·) per
chunk of S slots, a single forward pass over the S x B stamped inputs per
step, and Adam. Each slot's loss is its cross-entropy plus its own weight
times the mask's L1 norm; the weight adapts as in Neural Cleanse: raised
when the slot's attack succeeds for ``patience`` rounds in a row, lowered
when it fails, so that the mask shrinks as far as the attack allows. At the
end of each round the current masks are checked on a fresh batch, and the
smallest one that reached the success threshold there is kept.

Every step runs under a ``tf.distribute`` strategy (see
:mod:`tf_backdoor_defense._distribute`): each replica stamps and classifies
its share of every slot's batch and returns the gradients of its share of
the loss and its success counts; their sums update the masks and patterns in
one place (cross-replica), so every replica and worker holds the same
triggers. Success counts are exact; gradients, and so masks and patterns,
agree with one device within float32 tolerance.
"""

import dataclasses
import math

import numpy as np

from tf_backdoor_defense._distribute import (batch_mean, replica_count, replica_rows,
                                             resolve_strategy, sum_over_replicas)
from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.masks._wrapper import PruneByActivation

__all__ = ["ReverseSettings", "Slots", "TriggerOptimizer", "image_view", "from_image_view",
           "infer_value_range", "stamp"]

UNTARGETED = -1
#: Bound of the tanh-parametrised variables (masks in [0.0003, 0.9997]).
LIMIT = 4.0


@dataclasses.dataclass(frozen=True)
class ReverseSettings:
    """The optimisation's knobs (see :func:`tf_backdoor_defense.scan.scan_model`)."""

    batch_size: int = 32
    learning_rate: float = 0.1
    init_cost: float = 1e-3
    success_threshold: float = 0.99
    round_steps: int = 10
    patience: int = 2
    cost_up: float = 1.5
    cost_down: float = 1.5 ** 1.5
    early_stop_rounds: int = 6
    max_images_per_step: int = 512
    mask_init: float = 0.5


@dataclasses.dataclass
class Slots:
    """Triggers to reverse: ``targets[i]`` (or ``UNTARGETED``) over the inputs ``pools[i]``.

    ``thresholds[i]`` is the success rate slot ``i`` must reach (default: the
    settings' ``success_threshold`` for every slot).
    """

    targets: np.ndarray
    pools: list
    thresholds: np.ndarray = None

    def __len__(self):
        return len(self.targets)


def infer_value_range(x):
    """The value range of the data: [0, 1], [-1, 1] or [0, 255] when the data fit in it and
    span more than half of it, else [min, max].

    Data in [0, 16] (scikit-learn's raw 8x8 digits) are no 0-255 images: a
    pattern of 255 there would be a perturbation 16 times the brightest pixel.

    >>> import numpy as np
    >>> infer_value_range(np.array([0.0, 0.7])), infer_value_range(np.array([3.0, 251.0]))
    ((0.0, 1.0), (0.0, 255.0))
    >>> infer_value_range(np.array([0.0, 16.0]))
    (0.0, 16.0)
    """
    low, high = float(np.min(x)), float(np.max(x))
    for candidate in ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)):
        fits = candidate[0] <= low and high <= candidate[1]
        if fits and high - low > 0.5 * (candidate[1] - candidate[0]):
            return candidate
    return low, high


def image_view(input_shape):
    """The image shape ``(H, W, C)`` in which triggers are reversed for inputs of ``input_shape``.

    An image ``(H, W, C)`` is its own view. Inputs ``(H, W)`` (grayscale
    images without a channel axis, as ``keras.datasets.mnist`` gives them)
    get one channel. Flat inputs ``(D,)`` (a multilayer perceptron's) become
    a square ``(k, k, 1)`` when ``D = k * k`` (a flattened grayscale image),
    else one row ``(1, D, 1)``: either way every input value is one pixel of
    the mask, whose L1 norm is the same in any view. Inputs of other ranks
    raise :class:`~tf_backdoor_defense.InputError`.

    >>> image_view((32, 32, 3)), image_view((28, 28)), image_view((784,)), image_view((10,))
    ((32, 32, 3), (28, 28, 1), (28, 28, 1), (1, 10, 1))
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        return shape
    if len(shape) == 2:
        return shape + (1,)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        return (side, side, 1) if side > 1 and side * side == shape[0] else (1, shape[0], 1)
    raise InputError(f"Triggers are reversed over images (H, W, C), grayscale images (H, W) or "
                     f"flat inputs (D,). The model takes inputs of shape {shape}.")


def from_image_view(array, input_shape):
    """A mask or pattern of the :func:`image_view` of ``input_shape`` in that shape; an array of
    any other shape, and any array for image inputs, is returned as it is.

    >>> import numpy as np
    >>> from_image_view(np.zeros((28, 28, 1)), (784,)).shape
    (784,)
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 and np.shape(array) == image_view(shape):
        return np.reshape(array, shape)
    return array


def stamp(x, mask, pattern):
    """``x * (1 - mask) + mask * pattern`` for a batch ``x`` (N, H, W, C), as float32."""
    x = np.asarray(x, dtype=np.float32)
    mask = np.asarray(mask, dtype=np.float32)
    pattern = np.asarray(pattern, dtype=np.float32)
    return x * (1.0 - mask) + mask * pattern


def _log_probabilities(model):
    """A function from inputs to log class probabilities, from logits where the model has them.

    A final Dense layer with a softmax (the usual classifier) is evaluated
    without its softmax from its own weights (read, never changed), and a
    final softmax layer is skipped: probabilities that underflow to zero
    would give no gradient. Other models ending in a softmax (inside a nested
    model, or a TensorFlow op's) use the log of their probabilities, and
    models without one are taken to output logits.
    Everything is computed from float32 values (a mixed-precision model's
    layers give float16).
    """
    from tf_backdoor_defense.graph._outputs import output_activation

    last = model.layers[-1]
    inner = last.layer if isinstance(last, PruneByActivation) else last
    activation = output_activation(model)
    units = model.outputs[0].shape[-1]

    def run(network, x):
        return tf.cast(network(x, training=False), tf.float32)

    if units == 1:
        def binary(x):
            p = run(model, x)
            p = tf.clip_by_value(p if activation == "sigmoid" else tf.sigmoid(p), 1e-7, 1.0 - 1e-7)
            return tf.math.log(tf.concat([1.0 - p, p], axis=-1))
        return binary
    softmax = activation == "softmax"
    single = (not isinstance(last, PruneByActivation) and len(last.inbound_nodes) == 1
              and last is model.outputs[0]._keras_history.layer)
    if single and isinstance(inner, keras.layers.Dense) and softmax:
        features = keras.Model(model.inputs, last.input)

        def from_logits(x):
            logits = tf.matmul(run(features, x), tf.cast(inner.kernel, tf.float32))
            if inner.use_bias:
                logits = logits + tf.cast(inner.bias, tf.float32)
            return tf.nn.log_softmax(logits)
        return from_logits
    if single and (isinstance(inner, keras.layers.Softmax)
                   or (isinstance(inner, keras.layers.Activation) and softmax)):
        before = keras.Model(model.inputs, last.input)
        return lambda x: tf.nn.log_softmax(run(before, x))
    if softmax:
        return lambda x: tf.math.log(tf.clip_by_value(run(model, x), 1e-12, 1.0))
    return lambda x: tf.nn.log_softmax(run(model, x))


class TriggerOptimizer:
    """Reverse triggers for many slots, ``chunk`` slots per optimisation step.

    Parameters
    ----------
    model : tf_keras.Model
    x, y : arrays
        The clean inputs (float32, channels-last) and their class indices.
    value_range : (float, float)
    settings : ReverseSettings
    seed : int
    strategy : tf.distribute.Strategy, default=None
        Default: ``model.distribute_strategy``.
    input_shape : tuple of int, default=None
        The model's input shape, when ``x`` holds its inputs in an
        :func:`image_view` of another shape (stamped images are reshaped to
        it before the model reads them). Default: ``x.shape[1:]``.
    """

    def __init__(self, model, x, y, value_range, settings, seed, strategy=None,
                 input_shape=None):
        self.model = model
        self.strategy = resolve_strategy(strategy, model)
        self.x = np.asarray(x, dtype=np.float32)
        self.input_shape = (tuple(self.x.shape[1:]) if input_shape is None
                            else tuple(int(d) for d in input_shape))
        if math.prod(self.input_shape) != math.prod(self.x.shape[1:]):
            raise InputError(f"Inputs of shape {self.x.shape[1:]} cannot be viewed as the "
                             f"model's input shape {self.input_shape}.")
        self.y = np.asarray(y, dtype=np.int64)
        self.low, self.high = (float(v) for v in value_range)
        self.settings = settings
        self.seed = int(seed)
        self._log_probs = _log_probabilities(model)
        self._compiled = {}

    # -- parametrisation ------------------------------------------------------------------
    def initial(self, rng, count, shape):
        """Free variables of ``count`` slots: masks near ``mask_init``, random patterns."""
        h, w, c = shape
        center = np.arctanh(2.0 * self.settings.mask_init - 1.0)
        mask = (center + rng.uniform(-0.1, 0.1, size=(count, h, w, 1))).astype(np.float32)
        pattern = rng.uniform(-1.0, 1.0, size=(count, h, w, c)).astype(np.float32)
        return mask, pattern

    def to_images(self, mask_w, pattern_w):
        """Masks in [0, 1] and patterns in the value range, from free variables (numpy)."""
        mask = (np.tanh(mask_w) + 1.0) / 2.0
        pattern = self.low + (self.high - self.low) * (np.tanh(pattern_w) + 1.0) / 2.0
        return mask.astype(np.float32), pattern.astype(np.float32)

    # -- the compiled step ----------------------------------------------------------------
    def _step_fn(self, slots, batch):
        key = (slots, batch)
        if key in self._compiled:
            return self._compiled[key]
        h, w, c = self.x.shape[1:]
        low, span = self.low, self.high - self.low
        s = self.settings
        variables = {
            "mask": tf.Variable(tf.zeros((slots, h, w, 1)), trainable=False),
            "pattern": tf.Variable(tf.zeros((slots, h, w, c)), trainable=False),
        }
        moments = {name: (tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v)))
                   for name, v in variables.items()}
        counter = tf.Variable(0.0, trainable=False)
        log_probs = self._log_probs
        classes = self.model.outputs[0].shape[-1]
        classes = 2 if classes == 1 else int(classes)

        strategy = self.strategy
        input_shape = self.input_shape

        def images(mask_w, pattern_w):
            return (tf.tanh(mask_w) + 1.0) / 2.0, low + span * (tf.tanh(pattern_w) + 1.0) / 2.0

        def predict(x, mask, pattern):
            """Log probabilities (slots, rows, classes) of this replica's stamped rows of ``x``."""
            stamped = x * (1.0 - mask[:, None]) + (mask * pattern)[:, None]
            rows = tf.shape(x)[1]
            scores = log_probs(tf.reshape(stamped, (slots * rows,) + input_shape))
            return tf.reshape(scores, (slots, rows, classes))

        def successes(scores, labels, targets):
            """Per slot: how many of the rows the trigger sent where it should."""
            untargeted = targets < 0
            wanted = tf.where(untargeted[:, None], labels, targets[:, None])
            predicted = tf.argmax(scores, axis=-1)
            success = tf.where(untargeted[:, None], predicted != labels, predicted == wanted)
            return tf.reduce_sum(tf.cast(success, tf.float32), axis=1)

        def replica_step(x, labels, targets, costs, mask_w, pattern_w):
            x, labels = replica_rows(x, axis=1), replica_rows(labels, axis=1)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch([mask_w, pattern_w])
                mask, pattern = images(mask_w, pattern_w)
                scores = predict(x, mask, pattern)
                untargeted = targets < 0
                wanted = tf.where(untargeted[:, None], labels, targets[:, None])
                chosen = tf.gather(scores, wanted, batch_dims=2)
                # Untargeted: log P(any class but the true one) = logsumexp over the others.
                others = tf.where(tf.one_hot(labels, classes) > 0, -np.inf, scores)
                away = tf.reduce_logsumexp(others, axis=-1)
                cross_entropy = tf.where(untargeted[:, None], -away, -chosen)
                # This replica's share of the mean over the whole batch.
                cross_entropy = batch_mean(tf.reduce_sum(cross_entropy, axis=1), batch)
                l1 = tf.reduce_sum(mask, axis=[1, 2, 3])
                loss = tf.reduce_sum(cross_entropy + costs * l1 / replica_count())
            grads = tape.gradient(loss, [mask_w, pattern_w])
            return grads, cross_entropy, successes(scores, labels, targets)

        @tf.function(input_signature=[
            tf.TensorSpec((slots, batch, h, w, c), tf.float32),
            tf.TensorSpec((slots, batch), tf.int64),
            tf.TensorSpec((slots,), tf.int64),
            tf.TensorSpec((slots,), tf.float32)])
        def step(x, labels, targets, costs):
            mask_w, pattern_w = variables["mask"].read_value(), variables["pattern"].read_value()
            grads, cross_entropy, hits = sum_over_replicas(strategy, strategy.run(
                replica_step, args=(x, labels, targets, costs, mask_w, pattern_w)))
            l1 = tf.reduce_sum(images(mask_w, pattern_w)[0], axis=[1, 2, 3])
            counter.assign_add(1.0)
            beta1, beta2 = 0.9, 0.999
            rate = s.learning_rate * tf.sqrt(1.0 - beta2 ** counter) / (1.0 - beta1 ** counter)
            for (name, var), grad in zip(variables.items(), grads):
                m, v = moments[name]
                m.assign(beta1 * m + (1.0 - beta1) * grad)
                v.assign(beta2 * v + (1.0 - beta2) * tf.square(grad))
                # Bounded free variables: tanh never saturates so far that a mask or a
                # pattern value cannot come back.
                var.assign(tf.clip_by_value(var - rate * m / (tf.sqrt(v) + 1e-8), -LIMIT, LIMIT))
            return cross_entropy, l1, hits / batch

        def replica_check(x, labels, targets, mask_w, pattern_w):
            x, labels = replica_rows(x, axis=1), replica_rows(labels, axis=1)
            mask, pattern = images(mask_w, pattern_w)
            return successes(predict(x, mask, pattern), labels, targets)

        @tf.function(input_signature=[
            tf.TensorSpec((slots, batch, h, w, c), tf.float32),
            tf.TensorSpec((slots, batch), tf.int64),
            tf.TensorSpec((slots,), tf.int64)])
        def check(x, labels, targets):
            mask_w, pattern_w = variables["mask"].read_value(), variables["pattern"].read_value()
            hits = sum_over_replicas(strategy, strategy.run(
                replica_check, args=(x, labels, targets, mask_w, pattern_w)))
            return hits / batch

        def load(mask_w, pattern_w):
            variables["mask"].assign(mask_w)
            variables["pattern"].assign(pattern_w)
            for m, v in moments.values():
                m.assign(tf.zeros_like(m))
                v.assign(tf.zeros_like(v))
            counter.assign(0.0)

        def read():
            return variables["mask"].numpy(), variables["pattern"].numpy()

        self._compiled[key] = (step, check, load, read)
        return self._compiled[key]

    @staticmethod
    def _picks(slots, index, batch, rng):
        """Indices (slots, batch) of the clean inputs each slot sees in one step."""
        return np.stack([rng.choice(slots.pools[i], size=batch, replace=len(slots.pools[i]) < batch)
                         for i in index])

    def batch_size(self, slots):
        """Inputs per slot and step: ``settings.batch_size``, at most the smallest pool."""
        smallest = min(len(pool) for pool in slots.pools)
        return max(1, min(self.settings.batch_size, smallest))

    def chunk_size(self, count, batch):
        """Slots per step: as many as ``max_images_per_step`` allows, at least one."""
        return max(1, min(count, self.settings.max_images_per_step // batch))

    # -- running ----------------------------------------------------------------------------
    def run(self, slots, state=None, *, steps, adaptive=True, rng=None, progress=None):
        """Optimise every slot for up to ``steps`` steps.

        Parameters
        ----------
        slots : Slots
        state : dict, default=None
            ``mask_w`` and ``pattern_w`` to start from (one row per slot);
            new random ones when None.
        steps : int
        adaptive : bool, default=True
            Neural Cleanse's adaptive L1 weight and early stop; ``False`` keeps
            the initial weight for every step (the screen).
        rng : numpy.random.Generator
        progress : callable, default=None
            Called with the number of slots finished after each chunk.

        Returns
        -------
        dict of per-slot arrays: ``mask_w``, ``pattern_w`` (the best free
        variables), ``l1`` (their mask's L1 norm), ``success`` (their success
        rate during optimisation), ``reached`` (bool), ``objective`` (mean
        cross-entropy plus weighted L1 over the last round), ``steps``.
        """
        rng = np.random.default_rng(self.seed) if rng is None else rng
        count = len(slots)
        batch = self.batch_size(slots)
        chunk = self.chunk_size(count, batch)
        if state is None:
            mask_w, pattern_w = self.initial(rng, count, self.x.shape[1:])
        else:
            mask_w, pattern_w = state["mask_w"].copy(), state["pattern_w"].copy()
        out = {"mask_w": mask_w.copy(), "pattern_w": pattern_w.copy(),
               "l1": np.full(count, np.inf), "success": np.zeros(count),
               "reached": np.zeros(count, bool), "objective": np.full(count, np.inf),
               "steps": np.zeros(count, np.int64)}
        for start in range(0, count, chunk):
            index = np.arange(start, min(start + chunk, count))
            padded = np.concatenate([index, np.repeat(index[-1:], chunk - len(index))])
            self._run_chunk(slots, padded, len(index), batch, mask_w, pattern_w, out, steps,
                            adaptive, rng)
            if progress is not None:
                progress(int(index[-1]) + 1)
        return out

    def _run_chunk(self, slots, index, real, batch, mask_w, pattern_w, out, steps, adaptive, rng):
        s = self.settings
        step, check, load, read = self._step_fn(len(index), batch)
        load(mask_w[index], pattern_w[index])
        targets = slots.targets[index].astype(np.int64)
        thresholds = (np.full(len(index), s.success_threshold) if slots.thresholds is None
                      else np.asarray(slots.thresholds, np.float64)[index])
        n = len(index)
        costs = np.full(n, s.init_cost, np.float32)
        up = np.zeros(n, np.int64)
        down = np.zeros(n, np.int64)
        went_up = np.zeros(n, bool)
        went_down = np.zeros(n, bool)
        stale = np.zeros(n, np.int64)
        best_l1 = np.full(n, np.inf)
        best_success = np.zeros(n)
        best_mask, best_pattern = read()
        reached = np.zeros(n, bool)
        last_objective = np.full(n, np.inf)
        done_steps = 0
        round_success, round_objective = np.zeros(n), np.zeros(n)
        round_l1, mean_success = np.full(n, np.inf), np.zeros(n)
        for t in range(steps):
            picks = self._picks(slots, index, batch, rng)
            ce, l1, success = step(self.x[picks], self.y[picks], targets, costs)
            ce, l1, success = ce.numpy(), l1.numpy(), success.numpy()
            round_success += success
            round_objective += ce + costs * l1
            done_steps = t + 1
            if done_steps % s.round_steps and done_steps != steps:
                continue
            rounds = done_steps % s.round_steps or s.round_steps
            mean_success = round_success / rounds
            last_objective = round_objective / rounds
            round_success, round_objective = np.zeros(n), np.zeros(n)
            ok = mean_success >= thresholds
            masks, patterns = read()
            round_l1 = np.sum((np.tanh(masks) + 1.0) / 2.0, axis=(1, 2, 3))
            # The masks shrank during the round: check the ones kept on a fresh batch.
            picks = self._picks(slots, index, batch, rng)
            holds = check(self.x[picks], self.y[picks], targets).numpy()
            improved = ok & (holds >= thresholds) & (round_l1 < best_l1) if adaptive \
                else np.ones(n, bool)
            best_mask[improved], best_pattern[improved] = masks[improved], patterns[improved]
            significant = improved & (round_l1 < 0.99 * best_l1)
            stale = np.where(significant, 0, stale + 1)
            best_l1 = np.where(improved, round_l1, best_l1)
            best_success = np.where(improved, holds, best_success)
            reached |= improved
            if not adaptive:
                continue
            up = np.where(ok, up + 1, 0)
            down = np.where(ok, 0, down + 1)
            raise_cost = up >= s.patience
            lower_cost = down >= s.patience
            costs = np.where(raise_cost, costs * s.cost_up, costs)
            costs = np.where(lower_cost, costs / s.cost_down, costs).astype(np.float32)
            went_up |= raise_cost
            went_down |= lower_cost
            up = np.where(raise_cost, 0, up)
            down = np.where(lower_cost, 0, down)
            finished = reached & went_up & went_down & (stale >= s.early_stop_rounds)
            if np.all(finished[:real]):
                break
        if adaptive:
            # A slot that never reached the threshold keeps its last state.
            masks, patterns = read()
            never = ~reached
            best_mask[never], best_pattern[never] = masks[never], patterns[never]
            best_l1 = np.where(never, round_l1, best_l1)
            best_success = np.where(never, mean_success, best_success)
        rows = index[:real]
        out["mask_w"][rows] = best_mask[:real]
        out["pattern_w"][rows] = best_pattern[:real]
        out["l1"][rows] = best_l1[:real]
        out["success"][rows] = best_success[:real]
        out["reached"][rows] = reached[:real]
        out["objective"][rows] = last_objective[:real]
        out["steps"][rows] = done_steps

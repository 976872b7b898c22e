"""Unlearning of reversed triggers: fine-tune on clean inputs stamped with them, clean answers kept.

Neural Cleanse (Wang et al., S&P 2019) reverse-engineers, for a suspected
target class, the smallest mask and pattern that send clean inputs there.
Its repair fine-tunes the network on the defender's clean data of which a
fraction is stamped with that trigger while keeping the **true** labels: the
network learns that the trigger means nothing, so the shortcut to the target
class is unlearnt. :func:`unlearn_triggers` does this for any number of
triggers, given as ``(mask, pattern)`` pairs; a stamped input is
``x * (1 - mask) + mask * pattern``.

By default (``distill=True``) the target of every input, stamped or not, is
the received model's own prediction on the *unstamped* input (knowledge
distillation from the model as received) rather than its label: a stamped
input must get the answer its clean original gets. This keeps the network's
clean behaviour much better than hard labels when the defender has only a
few hundred or thousand clean inputs, which a network trained on more data
would otherwise overfit; ``distill=False`` uses the true labels, as Neural
Cleanse does.

Fitting the received model on the defender's inputs pins its behaviour down
only at those inputs. With ``anchor_weight > 0`` every step also distils the
received model on mixtures ``w * x_i + (1 - w) * x_j`` of random pairs of the
batch's clean inputs (mixup, ``w`` uniform in [0, 1)), where it knows the
answer too and no trigger appears: the repair then keeps the network's
behaviour between the defender's inputs as well.

Measured on 8 real MNIST BadNets with the true trigger (about
98% clean accuracy, trained on 3,000 digits the defender never sees;
accuracy judged on 1,000 other digits): with 1,000 clean digits the largest
accuracy drop was 1.3 points with labels and 0.6 with distillation (no
anchors), with 200 digits 2.1 and 0.5; the attack success rate ended at or
below 1.7% either way.

Training runs the network in inference mode (``training=False``):
BatchNormalization keeps and uses its moving statistics, which a few hundred
clean inputs would otherwise overwrite, and Dropout is off. Gradients still
reach every trainable weight (BatchNormalization's scale and offset
included). ``PruneByActivation`` masks are non-trainable and multiply their
channels' outputs, so pruned channels stay at zero.

Training runs under a ``tf.distribute`` strategy (``strategy=``, see
:func:`inference_mode_step`): the stamping, the batches and the mixtures are
drawn once, from the seed, and each replica takes its share of every batch.
"""

import logging
import time

import numpy as np

from tf_backdoor_defense._distribute import (batch_mean, is_distributed,
                                             replica_rows, resolve_strategy, rows_over_replicas,
                                             sum_over_replicas, summed_gradients, summed_loss,
                                             replica_layer_losses)
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense._validation import check_fraction, check_model, check_number
from tf_backdoor_defense.finetune._training import as_arrays, copy_model, loss_for
from tf_backdoor_defense.keras3._caller import with_caller_keras
from tf_backdoor_defense.metrics import labels_from_outputs, predict_labels
from tf_backdoor_defense.scan._reverse import from_image_view, image_view

__all__ = ["unlearn_triggers", "check_triggers", "stamp_triggers"]

logger = logging.getLogger(__name__)

#: Optimiser steps the defaults aim for, whatever the size of the clean data.
DEFAULT_STEPS = 300


def _as_array(value, what):
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"The 'triggers' parameter must hold numeric arrays; its {what} is "
                        f"{type(value).__name__}.") from error
    return array


def _fit_shape(array, image_shape, what, index):
    """``array`` as ``image_shape[:-1] + (1 or C,)`` (a missing channel axis is added; an
    array of the inputs' image view is reshaped to them)."""
    array = from_image_view(array, image_shape)
    spatial, channels = tuple(image_shape[:-1]), image_shape[-1]
    if array.shape == spatial:
        array = array[..., None]
    if array.shape[:-1] != spatial or array.shape[-1] not in (1, channels):
        raise ValueError(
            f"The 'triggers' parameter's {what} {index} must have shape {spatial + (1,)} or "
            f"{spatial + (channels,)} to fit inputs of shape {tuple(image_shape)}. "
            f"Got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"The 'triggers' parameter's {what} {index} contains NaN or Inf values.")
    return array


def check_triggers(triggers, image_shape):
    """Validate triggers and stack them as ``(masks, patterns)`` float32 arrays.

    Parameters
    ----------
    triggers : sequence of (mask, pattern) pairs, or a (masks, patterns) pair of stacked arrays
        ``mask`` has shape ``(H, W, 1)`` (or ``(H, W)`` or ``(H, W, C)``) with
        values in [0, 1]; ``pattern`` has shape ``(H, W, C)`` (or ``(H, W, 1)``
        or ``(H, W)``) in the data's scale. Stacked arrays carry a leading
        trigger axis: ``masks`` ``(K, H, W, 1)``, ``patterns`` ``(K, H, W, C)``.
        One pair of unstacked arrays is one trigger. For inputs that are not
        ``(H, W, C)`` images, both have the inputs' shape or that of their
        image view (:func:`~tf_backdoor_defense.scan._reverse.image_view`, a
        scan's ``masks`` and ``patterns``), which is reshaped to it.
    image_shape : tuple of int
        The shape of one input, ``(H, W, C)`` for images.

    Returns
    -------
    masks : float32 array of shape (K, H, W, 1 or C)
    patterns : float32 array of shape (K, H, W, 1 or C)

    Examples
    --------
    >>> import numpy as np
    >>> mask, pattern = np.zeros((4, 4, 1)), np.ones((4, 4, 1))
    >>> masks, patterns = check_triggers([(mask, pattern), (mask, pattern)], (4, 4, 1))
    >>> masks.shape, patterns.shape
    ((2, 4, 4, 1), (2, 4, 4, 1))
    >>> check_triggers([(mask, pattern)], (16,))[0].shape  # a flat input's image view
    (1, 16)
    """
    image_shape = tuple(int(s) for s in image_shape)
    rank = len(image_shape)
    view = image_view(image_shape) if rank in (1, 2) else None
    if isinstance(triggers, (str, bytes, dict)) or not hasattr(triggers, "__len__"):
        raise TypeError("The 'triggers' parameter must be a sequence of (mask, pattern) pairs. "
                        f"Got {type(triggers).__name__}.")
    pairs = list(triggers)
    if len(pairs) == 2 and all(isinstance(p, np.ndarray) or hasattr(p, "numpy") for p in pairs):
        masks, patterns = (_as_array(p, "array") for p in pairs)
        stacked_views = view is not None and masks.shape[1:] == patterns.shape[1:] == view
        if view is not None and masks.shape == patterns.shape == view:
            pairs = [(masks, patterns)]  # one pair in the image view
        elif stacked_views or (masks.ndim == rank + 1 and patterns.ndim == rank + 1):  # stacked
            if masks.shape[0] != patterns.shape[0]:
                raise ValueError(f"The 'triggers' parameter holds {masks.shape[0]} masks but "
                                 f"{patterns.shape[0]} patterns; they must pair up.")
            pairs = list(zip(masks, patterns))
        elif masks.ndim in (rank - 1, rank) and patterns.ndim in (rank - 1, rank):
            pairs = [(masks, patterns)]  # one unstacked pair
    if not pairs:
        raise ValueError("The 'triggers' parameter must hold at least one (mask, pattern) pair.")
    masks, patterns = [], []
    for index, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise TypeError(f"The 'triggers' parameter must be a sequence of (mask, pattern) "
                            f"pairs. Item {index} is {type(pair).__name__}, not a pair.")
        mask = _fit_shape(_as_array(pair[0], f"mask {index}"), image_shape, "mask", index)
        pattern = _fit_shape(_as_array(pair[1], f"pattern {index}"), image_shape, "pattern",
                             index)
        if mask.min() < -1e-6 or mask.max() > 1 + 1e-6:
            raise ValueError(f"The 'triggers' parameter's mask {index} must have values in "
                             f"[0, 1]. Got values in [{mask.min():g}, {mask.max():g}].")
        masks.append(np.clip(mask, 0.0, 1.0))
        patterns.append(pattern)
    width = max(m.shape[-1] for m in masks)
    masks = [np.broadcast_to(m, m.shape[:-1] + (width,)) for m in masks]
    width = max(p.shape[-1] for p in patterns)
    patterns = [np.broadcast_to(p, p.shape[:-1] + (width,)) for p in patterns]
    return np.stack(masks).astype(np.float32), np.stack(patterns).astype(np.float32)


def _translate(arrays, rows, cols):
    """``arrays`` (n, H, W, C) moved down ``rows`` and right ``cols`` pixels, zeros shifted in."""
    out = np.zeros_like(arrays)
    height, width = arrays.shape[1:3]
    if abs(rows) >= height or abs(cols) >= width:
        return out
    out[:, max(rows, 0):height + min(rows, 0), max(cols, 0):width + min(cols, 0)] = \
        arrays[:, max(-rows, 0):height + min(-rows, 0), max(-cols, 0):width + min(-cols, 0)]
    return out


def stamp_triggers(x, masks, patterns, which, shifts=None):
    """Stamp ``x[i]`` with trigger ``which[i]`` (``-1``: left clean); returns a new array.

    ``shifts`` (optional, ``(N, 2)`` ints) moves example ``i``'s mask and
    pattern by ``shifts[i] = (rows, cols)`` pixels first (images only).

    >>> import numpy as np
    >>> x = np.zeros((2, 2, 2, 1), np.float32)
    >>> masks = np.array([[[[1.0], [0.0]], [[0.0], [0.0]]]], np.float32)
    >>> out = stamp_triggers(x, masks, np.full_like(masks, 5.0), np.array([0, -1]))
    >>> out[:, 0, 0, 0].tolist(), float(x.sum())
    ([5.0, 0.0], 0.0)
    >>> moved = stamp_triggers(x, masks, np.full_like(masks, 5.0), np.array([0, 0]),
    ...                        shifts=np.array([[0, 0], [1, 1]]))
    >>> moved[1, :, :, 0].tolist()
    [[0.0, 0.0], [0.0, 5.0]]
    """
    out = np.array(x, dtype=np.float32, copy=True)
    chosen = np.flatnonzero(which >= 0)
    if chosen.size:
        mask, pattern = masks[which[chosen]], patterns[which[chosen]]
        if shifts is not None:
            offsets = np.asarray(shifts)[chosen]
            for rows, cols in {tuple(int(v) for v in o) for o in offsets}:
                if rows or cols:
                    same = np.flatnonzero((offsets[:, 0] == rows) & (offsets[:, 1] == cols))
                    mask[same] = _translate(mask[same], rows, cols)
                    pattern[same] = _translate(pattern[same], rows, cols)
        out[chosen] = out[chosen] * (1.0 - mask) + mask * pattern
    return out


def default_epochs(size, batch_size, steps=DEFAULT_STEPS, minimum=2):
    """Epochs giving about ``steps`` optimiser steps on ``size`` examples (at least ``minimum``).

    >>> default_epochs(1000, 64), default_epochs(200, 64)
    (19, 75)
    """
    per_epoch = max(1, int(np.ceil(size / batch_size)))
    return max(int(minimum), int(np.ceil(steps / per_epoch)))


def batch_order(size, batch_size, rng):
    """One epoch's shuffled batches of indices."""
    order = rng.permutation(size)
    return [order[start:start + batch_size] for start in range(0, size, batch_size)]


def batch_spec(array):
    """A ``tf.TensorSpec`` for batches of ``array``'s rows (any batch size)."""
    dtype = tf.float32 if np.issubdtype(array.dtype, np.floating) else tf.as_dtype(array.dtype)
    return tf.TensorSpec((None,) + tuple(array.shape[1:]), dtype)


def teacher_function(model):
    """``model`` as a function from inputs to probabilities (inference mode, no gradient)."""
    from_logits = _from_logits(model)

    def probabilities(x):
        out = tf.stop_gradient(model(x, training=False))
        if from_logits:
            out = tf.sigmoid(out) if out.shape[-1] == 1 else tf.nn.softmax(out, axis=-1)
        return out

    return probabilities


def mixup_pairs(rng, size):
    """A partner index and a mixing weight in [0, 1) for each of ``size`` batch rows."""
    return (tf.constant(rng.permutation(size).astype(np.int32)),
            tf.constant(rng.random(size).astype(np.float32)))


def mixtures(x, partner, weight):
    """``w * x + (1 - w) * x[partner]``, one mixing weight per row of the batch ``x``."""
    shape = tf.concat([tf.shape(weight), tf.ones([tf.rank(x) - 1], tf.int32)], axis=0)
    weight = tf.reshape(weight, shape)
    return weight * x + (1.0 - weight) * tf.gather(x, partner)


def anchor_loss(model, teacher, loss_fn, x, partner, weight):
    """Distillation of ``teacher`` on mixtures ``w * x + (1 - w) * x[partner]`` of clean inputs.

    The defender's few clean inputs pin the network down only at those
    inputs; the teacher (the received model) also gives the answer between
    them, so fitting it there keeps the clean behaviour the repair must not
    lose. No trigger appears in a mixture of clean inputs.

    Under a strategy the training steps mix the whole batch (partners may
    sit on other replicas) and each replica takes its rows of the mixtures.
    """
    mixed = mixtures(x, partner, weight)
    return loss_fn(teacher(mixed), model(mixed, training=False))


def replica_anchor_loss(model, teacher, summed_soft_loss, x, partner, weight):
    """This replica's share of :func:`anchor_loss` on the batch ``x`` (inside ``strategy.run``).

    ``summed_soft_loss`` sums over the rows (see
    :func:`~tf_backdoor_defense._distribute.summed_loss`); the share is its
    sum over this replica's rows of the mixtures divided by the batch size.
    """
    mixed = replica_rows(mixtures(x, partner, weight))
    return batch_mean(summed_soft_loss(teacher(mixed), model(mixed, training=False)),
                      tf.shape(x)[0])


def inference_mode_step(model, loss_fn, optimizer, x, targets, teacher=None, anchor_weight=0.0,
                        strategy=None):
    """A compiled training step that runs ``model`` with ``training=False``.

    BatchNormalization uses (and keeps) its moving statistics and Dropout is
    off; gradients reach every trainable variable. ``x`` and ``targets`` fix
    the input signature (batches of their rows). With a ``teacher`` (see
    :func:`teacher_function`), :func:`anchor_loss` on the clean batch, times
    ``anchor_weight``, is added. The step takes ``(inputs, targets, clean inputs, partner, weight)``
    and returns the batch loss.

    The step runs under ``strategy`` (default: ``model.distribute_strategy``;
    ``model`` and ``optimizer`` must be made in its scope): every replica
    takes its rows of the batch (and of the batch's mixtures), the gradients
    of the replicas' shares of the loss are summed, and the summed update is
    applied on every replica. With one replica this is the plain step.
    """
    strategy = resolve_strategy(strategy, model)
    variables = model.trainable_variables
    loss_fn = summed_loss(loss_fn)
    soft = summed_loss(target_loss(model, True))

    def replica_step(xb, yb, clean, partner, weight):
        count = tf.shape(xb)[0]
        xb, yb = replica_rows(xb), replica_rows(yb)
        with tf.GradientTape() as tape:
            loss = batch_mean(loss_fn(yb, model(xb, training=False)), count)
            loss = loss + replica_layer_losses(model, loss.dtype)
            if teacher is not None and anchor_weight > 0:
                loss = loss + anchor_weight * replica_anchor_loss(model, teacher, soft, clean,
                                                                  partner, weight)
        grads = summed_gradients(tape.gradient(loss, variables))
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None],
                                  skip_gradients_aggregation=True)
        return loss

    @tf.function(input_signature=[batch_spec(x), batch_spec(targets), batch_spec(x),
                                  tf.TensorSpec((None,), tf.int32),
                                  tf.TensorSpec((None,), tf.float32)])
    def step(xb, yb, clean, partner, weight):
        return sum_over_replicas(strategy, strategy.run(
            replica_step, args=(xb, yb, clean, partner, weight)))

    return step


def _from_logits(model):
    return bool(loss_for(model).get_config().get("from_logits", False))


def training_targets(model, x, y, distill, batch_size=256, strategy=None):
    """What the repairs fit: ``y`` itself, or the model's probabilities on ``x`` (``distill``).

    Probabilities are float32 rows (one column for a single sigmoid unit),
    computed in inference mode before any training. With a ``strategy`` of
    several replicas each replica computes its rows of every batch and every
    worker gets all of them (:func:`~tf_backdoor_defense._distribute.rows_over_replicas`):
    the same values as one device.

    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
    ...     2, activation="softmax", kernel_initializer="zeros")])
    >>> training_targets(model, np.ones((1, 2)), np.array([1]), distill=True).tolist()
    [[0.5, 0.5]]
    """
    if not distill:
        return y
    logits = _from_logits(model)

    def probabilities(part):
        out = model(part, training=False)
        if logits:
            out = tf.sigmoid(out) if out.shape[-1] == 1 else tf.nn.softmax(out, axis=-1)
        return np.asarray(out, dtype=np.float32)

    if is_distributed(strategy):
        columns = int(model.output_shape[-1])
        return rows_over_replicas(strategy, x.shape[0], batch_size,
                                  lambda rows: probabilities(x[rows]),
                                  row_shape=(columns,)).astype(np.float32)
    parts = [probabilities(x[start:start + batch_size]) for start in range(0, x.shape[0], batch_size)]
    return np.concatenate(parts)


def target_loss(model, distill):
    """The loss between ``model``'s outputs and :func:`training_targets`.

    Sparse cross-entropy on labels; cross-entropy against probability rows
    with ``distill`` (binary cross-entropy for a single unit). From logits
    unless the model ends in a softmax (sigmoid), as :func:`loss_for`.
    """
    hard = loss_for(model)
    if not distill or isinstance(hard, keras.losses.BinaryCrossentropy):
        return hard
    return keras.losses.CategoricalCrossentropy(from_logits=_from_logits(model))


def check_seed(seed):
    """``seed`` as an int >= 0, or a clear error."""
    return int(check_number(seed, "seed", 0, integer=True))


def check_flag(value, name):
    """``value`` as a bool when it is one, or a clear ``TypeError``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"The '{name}' parameter must be True or False. Got {value!r}.")
    return bool(value)


@with_caller_keras
def unlearn_triggers(model, train_data, triggers, *, epochs=None, learning_rate=0.003,
                     stamp_fraction=0.2, jitter=0, distill=True, anchor_weight=1.0,
                     momentum=0.9, batch_size=64, seed=0, strategy=None,
                     min_agreement=0.95, backoffs=2):
    """Fine-tune a copy of ``model`` to ignore reversed triggers (Neural Cleanse's unlearning).

    Every epoch a fresh random ``stamp_fraction`` of the clean inputs is
    stamped, each with one of ``triggers`` drawn at random, and keeps the
    target of its clean original (the received model's prediction with
    ``distill``, else its label); the rest stay clean. Training is
    cosine-decayed SGD with momentum, with the network in inference mode (see
    the module docs).

    Parameters
    ----------
    model : tf_keras.Model
        The suspect network (softmax or logit outputs; layers may be wrapped
        in ``PruneByActivation``, whose masks are kept). Not modified.
    train_data : (x, y) arrays or tf.data.Dataset
        The defender's clean labelled data.
    triggers : sequence of (mask, pattern) pairs, or a (masks, patterns) pair of stacked arrays
        The reversed triggers (see :func:`check_triggers`): ``mask`` of shape
        ``(H, W, 1)`` in [0, 1], ``pattern`` of shape ``(H, W, C)`` in the
        data's scale, or for other inputs in their shape or image view. A
        scan's ``(result.masks, result.patterns)`` can be passed as they are.
    epochs : int, default=None
        Passes over ``train_data``; ``None`` gives about 300 optimiser steps
        (at least 2 epochs), so small clean sets get more passes.
    learning_rate : float, default=0.003
        Initial SGD learning rate, decayed to zero along a cosine.
    stamp_fraction : float in [0, 1], default=0.2
        Share of each epoch's inputs stamped with a trigger.
    jitter : int, default=0
        Move each stamp by a random offset of up to ``jitter`` pixels along
        each image axis, so that a reversed trigger found a pixel or two away
        from the real one still covers it (images ``(H, W, C)`` only).
    distill : bool, default=True
        Fit the received model's predictions on the unstamped inputs instead
        of the labels (see the module docs).
    anchor_weight : float, default=1.0
        Weight of :func:`anchor_loss`, the received model distilled on mixtures
        of pairs of clean inputs of each batch (see the module docs); 0 turns
        it off. Each step then costs about twice as much.
    momentum : float in [0, 1), default=0.9
    batch_size : int, default=64
        Global batch: each replica of ``strategy`` takes about
        ``batch_size / replicas`` of its rows.
    seed : int, default=0
        Seeds the stamping, the batch order and Keras; the same seed gives the
        same weights.
    strategy : tf.distribute.Strategy, default=None
        Trains on the strategy's replicas and workers (every worker needs the
        same ``train_data``, ``triggers`` and ``seed``). Default:
        ``model.distribute_strategy`` (the strategy whose ``scope()`` the call
        runs in, else one device). Against one device the stamped inputs,
        batches and mixtures are the same, and the weights agree within
        float32 tolerance (the gradients are summed in another order).
    min_agreement : float in [0, 1] or None, default=0.95
        Divergence guard. After a quarter of the epochs and at the end, the
        tuned copy must still give the received model's answer on this share
        of the (unstamped) training inputs. Below it the training has diverged
        (a rate too large for the network: measured on BatchNormalization
        nets, where 0.003 sent every input to one class): it starts again
        from the received weights at a third of the rate, at most
        ``backoffs`` times, and the last attempt is returned (logged as a
        warning when it still disagrees). ``None`` turns the guard off.
    backoffs : int, default=2
        Restarts the guard may make.

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
    >>> mask = np.zeros((6, 6, 1)); mask[-2:, -2:] = 1.0
    >>> repaired = unlearn_triggers(model, (x, y), [(mask, np.ones((6, 6, 1)))], epochs=1)
    >>> repaired is model
    False
    """
    check_model(model)
    strategy = resolve_strategy(strategy, model)
    x, y = as_arrays(train_data, "train_data", model)
    masks, patterns = check_triggers(triggers, x.shape[1:])
    batch_size = int(check_number(batch_size, "batch_size", integer=True, positive=True))
    epochs = (default_epochs(x.shape[0], batch_size) if epochs is None
              else int(check_number(epochs, "epochs", 0, integer=True)))
    learning_rate = float(check_number(learning_rate, "learning_rate", positive=True))
    momentum = float(check_number(momentum, "momentum", below=1.0))
    fraction = check_fraction(stamp_fraction, "stamp_fraction")
    jitter = int(check_number(jitter, "jitter", 0, integer=True))
    if jitter and x.ndim != 4:
        raise ValueError(f"The 'jitter' parameter moves stamps across image rows and columns; "
                         f"it needs inputs of shape (H, W, C). Got inputs of shape "
                         f"{x.shape[1:]}: pass jitter=0.")
    distill = check_flag(distill, "distill")
    anchor_weight = float(check_number(anchor_weight, "anchor_weight"))
    seed = check_seed(seed)

    if min_agreement is not None:
        min_agreement = check_fraction(min_agreement, "min_agreement")
    backoffs = int(check_number(backoffs, "backoffs", 0, integer=True))

    started = time.perf_counter()
    if epochs == 0:
        keras.utils.set_random_seed(seed)
        with strategy.scope():
            return copy_model(model)
    targets = training_targets(model, x, y, distill, strategy=strategy)
    answers = None  # the received model's answers, which the guard compares against
    if min_agreement is not None:
        answers = (labels_from_outputs(targets) if distill
                   else predict_labels(model, x, strategy=strategy))
    run = dict(model=model, x=x, targets=targets, masks=masks, patterns=patterns,
               epochs=epochs, batch_size=batch_size, momentum=momentum, fraction=fraction,
               jitter=jitter, distill=distill, anchor_weight=anchor_weight, seed=seed,
               strategy=strategy, answers=answers, min_agreement=min_agreement)
    rate = learning_rate
    for attempt in range(backoffs + 1):
        tuned, agreement = _unlearn_once(rate, **run)
        if agreement is None or agreement >= min_agreement:
            break
        level = logging.INFO if attempt < backoffs else logging.WARNING
        logger.log(level, "unlearn_triggers: diverged at learning rate %g (agrees with the "
                   "received model on %.1f%% of the clean inputs, below %.1f%%)%s", rate,
                   100 * agreement, 100 * min_agreement,
                   f"; restarting at {rate / 3:g}" if attempt < backoffs else
                   "; returning the last attempt")
        rate /= 3
    logger.info("unlearn_triggers: %d trigger(s), %d epochs at learning rate %g in %.1f s",
                masks.shape[0], epochs, rate, time.perf_counter() - started)
    return tuned


def _agreement(model, x, answers, strategy=None):
    return float(np.mean(predict_labels(model, x, strategy=strategy) == answers))


def _unlearn_once(learning_rate, *, model, x, targets, masks, patterns, epochs, batch_size,
                  momentum, fraction, jitter, distill, anchor_weight, seed, strategy, answers,
                  min_agreement):
    """One training run from the received weights: ``(tuned, agreement or None)``.

    The agreement with the received model's answers is measured after a
    quarter of the epochs (the run stops there when it is already below
    ``min_agreement``) and at the end; None without a guard.
    """
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        tuned = copy_model(model)
    rng = np.random.default_rng(seed)
    steps = epochs * int(np.ceil(x.shape[0] / batch_size))
    with strategy.scope():
        optimizer = keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(learning_rate, steps), momentum=momentum)
    step = inference_mode_step(tuned, target_loss(tuned, distill), optimizer, x, targets,
                               teacher_function(model), anchor_weight, strategy)
    stamped_count = int(round(fraction * x.shape[0]))
    checkpoint = max(1, -(-epochs // 4))
    loss = float("nan")
    for epoch in range(epochs):
        which = np.full(x.shape[0], -1, np.int64)
        chosen = rng.choice(x.shape[0], size=stamped_count, replace=False)
        which[chosen] = rng.integers(0, masks.shape[0], size=stamped_count)
        shifts = rng.integers(-jitter, jitter + 1, size=(x.shape[0], 2)) if jitter else None
        x_epoch = stamp_triggers(x, masks, patterns, which, shifts)
        for index in batch_order(x.shape[0], batch_size, rng):
            loss = float(step(tf.constant(x_epoch[index]), tf.constant(targets[index]),
                              tf.constant(x[index]), *mixup_pairs(rng, index.size)))
        logger.debug("unlearn_triggers epoch %d/%d: last batch loss %.4f", epoch + 1, epochs,
                     loss)
        if answers is not None and epoch + 1 == checkpoint < epochs:
            agreement = _agreement(tuned, x, answers, strategy)
            if agreement < min_agreement:
                return tuned, agreement
    return tuned, (None if answers is None else _agreement(tuned, x, answers, strategy))

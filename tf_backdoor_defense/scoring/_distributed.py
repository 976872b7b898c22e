"""Channel statistics reduced across the replicas and workers of a ``tf.distribute`` strategy.

Every worker holds the same clean data (the defender's). Each batch is given
to every replica; replica ``r`` of ``R`` takes the rows ``r, r+R, r+2R, ...``,
sums its channel activations in float64, and ``strategy.reduce(SUM)`` adds
the partial sums of all replicas on all workers. All workers run the same
number of steps, so the collectives always match, and every worker ends
with the same totals: the masks derived from them are identical everywhere
and equal the single-device result (up to the order of float64 additions).
"""

import weakref

from tf_backdoor_defense._keras import tf
from tf_backdoor_defense.scoring._activations import (
    average_channel_sums,
    channel_sum_fn,
    mean_channel_activations,
    resolve_layer,
)
from tf_backdoor_defense._validation import check_data, check_model
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["distributed_channel_means", "is_distributed"]

# {model: {(layer, strategy) ids: compiled step}}. A value holds the feature extractor and
# the strategy, never the model itself, so the entry dies with the model.
_FNS = weakref.WeakKeyDictionary()


def is_distributed(strategy):
    """True for a strategy with several replicas or several workers."""
    if strategy is None:
        return False
    if strategy.num_replicas_in_sync > 1:
        return True
    extended = getattr(strategy, "extended", None)
    return bool(getattr(extended, "_num_workers", 1) > 1)


def _step_fn(model, layer, strategy):
    key = (id(layer), id(strategy))
    cache = _FNS.setdefault(model, {})
    if key in cache:
        return cache[key]
    sums_fn = channel_sum_fn(model, layer)
    replicas = strategy.num_replicas_in_sync

    def replica_fn(x):
        context = tf.distribute.get_replica_context()
        replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
        return sums_fn(tf.gather(x, tf.range(replica, tf.shape(x)[0], replicas)))

    spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)

    @tf.function(input_signature=[spec])
    def step(x):
        sums, size = strategy.run(replica_fn, args=(x,))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, size, axis=None))

    cache[key] = step
    return step


@with_caller_keras
def distributed_channel_means(model, data, layer=None, strategy=None, batch_size=256):
    """Mean activation per channel of ``layer``, computed on all replicas and reduced.

    With no strategy (or a single-replica one) this is
    :func:`~tf_backdoor_defense.scoring._activations.mean_channel_activations`.

    Parameters
    ----------
    model : tf_keras.Model
        Built in ``strategy.scope()`` when ``strategy`` is distributed.
    data : (x, y) arrays or tf.data.Dataset
        The same clean data on every worker.
    layer : str, default=None
        Conv or Dense layer; default: the last convolutional layer.
    strategy : tf.distribute.Strategy, default=None
        Default: ``model.distribute_strategy``.
    batch_size : int, default=256
        Global batch: each replica gets about ``batch_size / replicas`` rows.

    Returns
    -------
    numpy.ndarray of shape (channels,), float64

    Examples
    --------
    Without a distributed strategy it gives :func:`mean_channel_activations`' result:

    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(3, 2, name="conv")])
    >>> x = np.random.default_rng(0).random((5, 4, 4, 1), dtype=np.float32)
    >>> means = distributed_channel_means(model, (x, np.zeros(5, int)), "conv")
    >>> means.shape, bool(np.array_equal(means, mean_channel_activations(model, x, "conv")))
    ((3,), True)
    """
    check_model(model)
    if strategy is None:
        strategy = model.distribute_strategy
    if not is_distributed(strategy):
        return mean_channel_activations(model, data, layer=layer, batch_size=batch_size)
    found = resolve_layer(model, layer)
    data = check_data(data, "data", model=model, num_classes=None)
    step = _step_fn(model, found, strategy)
    return average_channel_sums(data.batches(batch_size),
                                lambda x: step(tf.constant(x, tf.float32)))

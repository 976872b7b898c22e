"""One data-parallel code path for the loops that pass over data: strategy, replica rows, sums.

The scan's trigger optimisation and success rates, and the training loops of
the repairs, run every batch through ``strategy.run`` and add what the
replicas computed with ``strategy.reduce(SUM)`` (or, inside a replica, with
``all_reduce``). Each batch is given whole to every replica, and replica
``r`` of ``R`` takes its rows ``r, r + R, r + 2R, ...``
(:func:`replica_rows`), as :mod:`tf_backdoor_defense.scoring._distributed`
does for channel statistics: workers holding the same data and seed build
the same batches and run the same collectives in the same order. A mean over
a batch is each replica's sum divided by the size of the whole batch
(:func:`batch_mean`), so the replicas' shares add up to it.

Without a strategy the model's ``distribute_strategy`` is used: the default
strategy outside any ``strategy.scope()`` (one replica: ``run`` calls the
function, ``reduce`` returns its value and the replica's rows are all rows,
so the single-device result is the same code), or the strategy of the scope
the call runs in.

Exact and float-close: sums of counts (successes, predicted classes) are
exact under any strategy. Sums of floats (losses, gradients) are added in
another order when there are several replicas, so weights, masks and losses
agree with one device within float32 tolerance.
"""

from tf_backdoor_defense._keras import keras, tf

__all__ = ["resolve_strategy", "replica_rows", "batch_mean", "replica_count", "sum_over_replicas",
           "summed_loss", "summed_gradients", "shift_variables"]


def resolve_strategy(strategy, model):
    """``strategy``, or ``model.distribute_strategy`` (the current scope's, or the default) for None.

    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> resolve_strategy(None, model).num_replicas_in_sync
    1
    """
    if strategy is None:
        return model.distribute_strategy
    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(f"The 'strategy' parameter must be a tf.distribute.Strategy or None. "
                        f"Got {type(strategy).__name__}.")
    return strategy


def replica_count():
    """Replicas in sync in the current replica context (1 outside any strategy)."""
    return tf.distribute.get_replica_context().num_replicas_in_sync


def replica_rows(tensor, axis=0):
    """This replica's share of ``tensor`` along ``axis``: rows ``r, r + R, ...`` of replica ``r``.

    Call it inside ``strategy.run`` (or outside any strategy: every row).

    >>> import numpy as np
    >>> replica_rows(tf.constant(np.arange(4))).numpy().tolist()
    [0, 1, 2, 3]
    """
    context = tf.distribute.get_replica_context()
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    size = tf.shape(tensor)[axis]
    return tf.gather(tensor, tf.range(replica, size, context.num_replicas_in_sync), axis=axis)


def batch_mean(total, count):
    """``total / count`` (0 for an empty batch): a replica's sum over the whole batch's size.

    The same operations as a Keras loss's mean over the batch, so that one
    replica gives what the loss itself gives.
    """
    return tf.math.divide_no_nan(total, tf.cast(count, total.dtype))


def summed_loss(loss):
    """A copy of the Keras loss ``loss`` that sums over the batch instead of averaging.

    >>> import tf_keras as keras
    >>> summed_loss(keras.losses.SparseCategoricalCrossentropy()).reduction
    'sum'
    """
    config = dict(loss.get_config(), reduction=keras.losses.Reduction.SUM)
    return loss.__class__.from_config(config)


def sum_over_replicas(strategy, values):
    """``strategy.reduce(SUM)`` of every tensor in the nest ``values`` (cross-replica context)."""
    return tf.nest.map_structure(
        lambda value: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None), values)


def summed_gradients(gradients):
    """Inside a replica: every replica's ``gradients`` added up (``all_reduce``); Nones kept."""
    present = [i for i, gradient in enumerate(gradients) if gradient is not None]
    if not present:
        return list(gradients)
    summed = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, [gradients[i] for i in present])
    out = list(gradients)
    for i, gradient in zip(present, summed):
        out[i] = gradient
    return out


def shift_variables(variables, deltas, subtract=False):
    """Inside a replica: add ``deltas`` to ``variables`` (or subtract them), on every replica.

    The deltas must be the same on every replica (computed from summed
    gradients). ``None`` deltas are skipped.
    """
    pairs = [(variable, delta) for variable, delta in zip(variables, deltas) if delta is not None]

    def update(variable, delta):
        return variable.assign_sub(delta) if subtract else variable.assign_add(delta)

    def merged(strategy, deltas):
        for (variable, _), delta in zip(pairs, deltas):
            strategy.extended.update(variable, update, args=(delta,))

    tf.distribute.get_replica_context().merge_call(merged, args=([d for _, d in pairs],))

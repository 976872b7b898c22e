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

Loops that keep numpy bookkeeping between compiled calls (the sweep's
incremental re-evaluation) cannot run inside ``strategy.run``. They use
:func:`sum_over_local_replicas` instead: each worker runs the loop once for
each of its replicas, over that replica's rows of every batch
(:class:`ReplicaShard`, the rows :func:`replica_rows` gives it), and
``strategy.reduce(SUM)`` adds the results of all replicas on all workers.
"""

import numpy as np

from tf_backdoor_defense._keras import keras, tf

__all__ = ["resolve_strategy", "replica_rows", "batch_mean", "replica_count", "sum_over_replicas",
           "summed_loss", "summed_gradients", "shift_variables", "ReplicaShard",
           "sum_over_local_replicas", "local_replica_count", "rows_over_replicas",
           "is_distributed"]


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


def is_distributed(strategy):
    """True for a strategy with several replicas or several workers (False for None).

    >>> is_distributed(None), is_distributed(tf.distribute.get_strategy())
    (False, False)
    """
    if strategy is None:
        return False
    if strategy.num_replicas_in_sync > 1:
        return True
    extended = getattr(strategy, "extended", None)
    return bool(getattr(extended, "_num_workers", 1) > 1)


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


def replica_layer_losses(model, dtype):
    """This replica's share of ``model``'s layer losses (regularisers), as ``dtype``.

    Cast to the training loss's dtype, so that a float64 model (whose
    regularisers are float64) and a float32 loss, or the reverse, add up.
    """
    losses = [tf.cast(loss, dtype) for loss in model.losses]
    total = tf.add_n(losses) if losses else tf.zeros((), dtype)
    return total / tf.cast(replica_count(), dtype)


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


class ReplicaShard:
    """One replica's rows ``r, r + R, ...`` of every batch of ``data``, as :func:`replica_rows`.

    ``data`` is a ``LabeledData`` (see :mod:`tf_backdoor_defense._validation`)
    read in batches of ``batch_size``; batches where the replica has no row
    are skipped. ``size`` is None for a stream, as ``data.size``.

    >>> import numpy as np
    >>> from tf_backdoor_defense._validation import LabeledData
    >>> data = LabeledData("d", np.zeros((5, 1), np.float32), np.arange(5))
    >>> shard = ReplicaShard(data, batch_size=3, replica=1, replicas=2)
    >>> [y.tolist() for _, y in shard.batches(3)], shard.size
    ([[1], [4]], 2)
    """

    def __init__(self, data, batch_size, replica, replicas):
        self.data, self.batch_size = data, int(batch_size)
        self.replica, self.replicas = int(replica), int(replicas)

    @property
    def size(self):
        if self.data.size is None:
            return None
        full, rest = divmod(self.data.size, self.batch_size)
        share = len(range(self.replica, self.batch_size, self.replicas))
        return full * share + len(range(self.replica, rest, self.replicas))

    def batches(self, batch_size=256):
        if int(batch_size) != self.batch_size:
            raise ValueError(f"ReplicaShard was cut for batches of {self.batch_size}. "
                             f"Got batch_size={batch_size}.")
        for x, y in self.data.batches(self.batch_size):
            x, y = x[self.replica::self.replicas], y[self.replica::self.replicas]
            if len(y):
                yield x, y


def local_replica_count(strategy):
    """How many of ``strategy``'s replicas run on this worker (1 for the default strategy)."""
    try:
        return len(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy
        return 1


def sum_over_local_replicas(strategy, compute):
    """``compute(replica, replicas)`` for each replica of this worker, summed over all replicas.

    Each worker calls ``compute`` once per local replica, on that replica's
    device, with the replica's index among all ``replicas`` of all workers;
    ``compute`` returns a nest of numbers or arrays (exact in float64, such
    as counts). ``strategy.reduce(SUM)`` adds them over every replica of
    every worker, and the sums come back as float64 numpy arrays, the same
    on every worker. Every worker must call this the same number of times.

    >>> sums = sum_over_local_replicas(tf.distribute.get_strategy(),
    ...                                lambda r, n: {"replica": r, "rows": np.array([3, 4])})
    >>> sums["replica"].tolist(), sums["rows"].tolist()
    (0.0, [3.0, 4.0])
    """
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one replica, on the current device
        devices = [None]
    calls = iter(devices)

    def value_fn(context):
        device = next(calls)
        with tf.device(device):
            result = compute(context.replica_id_in_sync_group, context.num_replicas_in_sync)
            return tf.nest.map_structure(
                lambda value: tf.constant(np.asarray(value, np.float64)), result)

    values = strategy.experimental_distribute_values_from_function(value_fn)
    return tf.nest.map_structure(lambda value: np.asarray(value.numpy()),
                                 sum_over_replicas(strategy, values))


def rows_over_replicas(strategy, size, batch_size, compute, row_shape=()):
    """A per-row computation over ``size`` rows split across ``strategy``'s replicas.

    Replica ``r`` of ``R`` computes rows ``r, r + R, ...`` of every batch of
    ``batch_size`` (``compute(rows)`` gets their indices and returns one
    value of ``row_shape`` per row) and writes them into a zero float64
    array; :func:`sum_over_local_replicas` adds the replicas' arrays. Each
    row is written by one replica only, so the sum is the values themselves
    (exact for float32 values and integers), the same on every worker.

    >>> rows_over_replicas(tf.distribute.get_strategy(), 5, 2, lambda rows: rows * 10).tolist()
    [0.0, 10.0, 20.0, 30.0, 40.0]
    """
    def compute_replica(replica, replicas):
        values = np.zeros((size,) + tuple(row_shape), np.float64)
        for start in range(0, size, batch_size):
            rows = np.arange(start + replica, min(start + batch_size, size), replicas)
            if rows.size:
                values[rows] = compute(rows)
        return values

    return sum_over_local_replicas(strategy, compute_replica)

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

from tf_backdoor_defense._distribute import is_distributed
from tf_backdoor_defense._keras import tf
from tf_backdoor_defense.masks._wrapper import layer_names
from tf_backdoor_defense.scoring._activations import (
    average_channel_sums,
    channel_sum_fn,
    mean_channel_activations,
    resolve_layer,
)
from tf_backdoor_defense._errors import InputTypeError
from tf_backdoor_defense._validation import check_model, check_ranking_data, renamed_argument
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["distributed_channel_means", "is_distributed"]

# {model: {(layer, strategy) ids: compiled step}}. A value holds the feature extractor and
# the strategy, never the model itself, so the entry dies with the model.
_FNS = weakref.WeakKeyDictionary()


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
def distributed_channel_means(model, ranking_data=None, layers=None, strategy=None,
                              batch_size=256, *, data=None, layer=None):
    """Mean activation per channel of one layer or several, computed on all replicas and reduced.

    With no strategy (or a single-replica one) this is
    :func:`~tf_backdoor_defense.scoring._activations.mean_channel_activations`.

    Parameters
    ----------
    model : tf_keras.Model
        Built in ``strategy.scope()`` when ``strategy`` is distributed.
    ranking_data : (x, y) arrays, x alone, or a tf.data.Dataset of (x, y) or of x
        The same clean data on every worker.
    layers : str or list of str, default=None
        Conv or Dense layer name, or a list of names; default: the last
        convolutional layer.
    strategy : tf.distribute.Strategy, default=None
        Default: ``model.distribute_strategy``.
    batch_size : int, default=256
        Global batch: each replica gets about ``batch_size / replicas`` rows.
    data, layer
        Old names of ``ranking_data`` and ``layers`` (deprecated; they warn).

    Returns
    -------
    numpy.ndarray of shape (channels,), float64
        For one layer name (or None).
    dict of {name: numpy.ndarray}
        For a list of names.

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
    ranking_data = renamed_argument("distributed_channel_means()", "data", data,
                                    "ranking_data", ranking_data)
    layers = renamed_argument("distributed_channel_means()", "layer", layer, "layers", layers)
    check_model(model)
    if strategy is None:
        strategy = model.distribute_strategy
    if not is_distributed(strategy):
        return mean_channel_activations(model, ranking_data, layers, batch_size=batch_size)
    if ranking_data is None:
        raise InputTypeError("distributed_channel_means() needs 'ranking_data': clean inputs.")
    single = layers is None or isinstance(layers, str)
    names = layer_names(model, layers)
    found = [resolve_layer(model, name) for name in names]
    checked = check_ranking_data(ranking_data, "ranking_data", model=model, num_classes=None)
    means = {}
    for layer_object in found:
        step = _step_fn(model, layer_object, strategy)
        means[layer_object.name] = average_channel_sums(
            checked.batches(batch_size), lambda x, step=step: step(tf.constant(x, tf.float32)))
    return next(iter(means.values())) if single else means

"""Clean retraining that moves the weights: schedules, weight decay, SAM and head re-initialisation.

A backdoored network usually fits the defender's clean data almost perfectly
(often it was trained on it), so the clean loss is near zero and the paper's
fine-tuning (:func:`~tf_backdoor_defense.finetune._fine_prune.fine_tune`:
plain SGD at a small learning rate) barely moves the weights: the backdoor
survives. :func:`train_clean` is the stronger clean retraining the repairs of
:mod:`tf_backdoor_defense.defenses._defend` build on:

- a cosine-decayed SGD learning rate, large enough to leave the attacker's
  minimum (``learning_rate``);
- optional weight decay, which shrinks weights that clean data never uses;
- optional sharpness-aware minimisation (``sam_rho``; FT-SAM, Zhu et al.,
  ICCV 2023), which seeks flat minima, where backdoor neurons lose their
  outsized weights;
- optional re-initialisation of layers (``reinitialize``), e.g. the dense
  head after the last convolution: the classifier is relearnt from clean
  data only, so the trigger's route to the target class is cut (in the
  spirit of feature-shift tuning, Min et al., NeurIPS 2023).

``PruneByActivation`` masks are non-trainable and multiply the channels'
outputs, so pruned channels stay at zero throughout.

Training runs under a ``tf.distribute`` strategy (``strategy=``; default: the
model's ``distribute_strategy``): the copy and its optimiser are made in the
strategy's scope, each replica takes its share of every batch (see
:mod:`tf_backdoor_defense._distribute`), and the gradients of the replicas'
shares of the batch loss are summed before every update.
"""


import numpy as np

from tf_backdoor_defense._distribute import (batch_mean, replica_rows,
                                             resolve_strategy, shift_variables, sum_over_replicas,
                                             summed_gradients, summed_loss, replica_layer_losses)
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.masks._registry import CONV_TYPES
from tf_backdoor_defense.masks._wrapper import clone_layer, unwrap
from tf_backdoor_defense._validation import check_data, check_number
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["train_clean", "loss_for", "copy_model", "head_layers", "reinitialize", "as_arrays"]


def loss_for(model):
    """The training loss matching ``model``'s output layer.

    Sparse categorical cross-entropy (binary for one output unit), from logits
    unless the model ends in a softmax (sigmoid), also inside a nested model
    or applied by a TensorFlow op (:func:`~tf_backdoor_defense.graph._outputs.output_activation`).

    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> loss_for(model).get_config()["from_logits"]
    True
    """
    from tf_backdoor_defense.graph._outputs import output_activation

    units = model.outputs[0].shape[-1]
    activation = output_activation(model)
    if units == 1:
        return keras.losses.BinaryCrossentropy(from_logits=activation != "sigmoid")
    return keras.losses.SparseCategoricalCrossentropy(from_logits=activation != "softmax")


def copy_model(model):
    """A structural copy of ``model`` with copied weights (masks included).

    >>> import tf_keras as keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> copy_model(model) is model
    False
    """
    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def as_arrays(data, name, model):
    """``(x, y)`` numpy arrays from arrays or a dataset (read once into memory)."""
    return check_data(data, name, model=model).arrays()


@with_caller_keras
def head_layers(model):
    """Names of the Dense layers after the model's last convolution (its classifier head).

    For a model without convolutions: all its Dense layers.

    >>> import tf_keras as keras
    >>> head_layers(keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3),
    ...     keras.layers.Flatten(), keras.layers.Dense(4, name="fc"),
    ...     keras.layers.Dense(2, name="output")]))
    ['fc', 'output']
    """
    layers = list(model.layers)
    last_conv = max((i for i, layer in enumerate(layers) if isinstance(unwrap(layer), CONV_TYPES)),
                    default=-1)
    return [layer.name for layer in layers[last_conv + 1:]
            if isinstance(unwrap(layer), keras.layers.Dense)]


def reinitialize(model, layers, seed=0):
    """Draw fresh weights for ``layers`` of ``model`` from their initialisers (in place).

    Masks of ``PruneByActivation`` layers are kept. Returns ``model``.

    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d",
    ...                           bias_initializer="zeros")])
    >>> model.get_layer("d").bias.assign([5.0, 5.0]) is not None
    True
    >>> reinitialize(model, ["d"]).get_layer("d").bias.numpy().tolist()
    [0.0, 0.0]
    """
    for offset, name in enumerate(layers):
        layer = unwrap(model.get_layer(name))
        for attribute, initializer in (("kernel", "kernel_initializer"), ("bias", "bias_initializer")):
            variable = getattr(layer, attribute, None)
            if variable is None:
                continue
            original = keras.initializers.get(getattr(layer, initializer))
            config = original.get_config()
            if "seed" in config:
                config["seed"] = int(seed) * 1000 + offset
            init = original.__class__.from_config(config)
            variable.assign(init(variable.shape, dtype=variable.dtype))
    return model


@with_caller_keras
def train_clean(model, train_data, *, epochs=20, learning_rate=0.05, momentum=0.9,
                schedule="cosine", weight_decay=0.0, sam_rho=0.0, reinitialize_layers=(),
                batch_size=64, seed=0, strategy=None):
    """Retrain a copy of ``model`` on clean data, hard enough to move the weights.

    Not the paper's fine-tuning (that is
    :func:`~tf_backdoor_defense.finetune._fine_prune.fine_tune`): a
    cosine-decayed, larger learning rate, with optional weight decay, SAM and
    re-initialised layers.

    Parameters
    ----------
    model : tf_keras.Model
        Not modified.
    train_data : (x, y) arrays or tf.data.Dataset
        Clean labelled data.
    epochs : int, default=20
    learning_rate : float, default=0.05
        Initial SGD learning rate.
    momentum : float, default=0.9
    schedule : {"cosine", "constant"}, default="cosine"
        Cosine decay to zero over all steps, or a constant rate.
    weight_decay : float, default=0.0
        Decoupled weight decay of SGD.
    sam_rho : float, default=0.0
        Neighbourhood radius of sharpness-aware minimisation; 0 turns it off.
        Each step then costs two forward/backward passes.
    reinitialize_layers : sequence of str, default=()
        Layers whose weights are drawn afresh before training (see
        :func:`head_layers`).
    batch_size : int, default=64
        Global batch: each replica of ``strategy`` takes about
        ``batch_size / replicas`` of its rows.
    seed : int, default=0
    strategy : tf.distribute.Strategy, default=None
        Trains on the strategy's replicas and workers (every worker needs the
        same ``train_data`` and ``seed``); the copy is made in its scope.
        Default: ``model.distribute_strategy`` (the strategy whose ``scope()``
        the call runs in, else one device). Against one device the weights
        agree within float32 tolerance (the gradients are summed in another
        order), except that BatchNormalization (in training mode) normalises
        each replica's share of a batch and Dropout draws other masks, as in
        Keras' own ``fit``.

    Returns
    -------
    tf_keras.Model
        The retrained copy (masks, if any, kept), its variables made in
        ``strategy``'s scope.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
    ...                           keras.layers.Dense(2, activation="softmax")])
    >>> x = np.random.default_rng(0).random((64, 4), dtype=np.float32)
    >>> y = (x[:, 0] > 0.5).astype(int)
    >>> tuned = train_clean(model, (x, y), epochs=2, sam_rho=0.05)
    >>> tuned is model, len(tuned.get_weights()) == len(model.get_weights())
    (False, True)
    """
    epochs = int(check_number(epochs, "epochs", 0, integer=True))
    batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
    learning_rate = float(check_number(learning_rate, "learning_rate"))
    momentum = float(check_number(momentum, "momentum"))
    weight_decay = float(check_number(weight_decay, "weight_decay"))
    sam_rho = float(check_number(sam_rho, "sam_rho"))
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"The 'schedule' parameter must be 'cosine' or 'constant'. Got {schedule!r}.")
    strategy = resolve_strategy(strategy, model)
    x, y = as_arrays(train_data, "train_data", model)
    if isinstance(reinitialize_layers, str):
        reinitialize_layers = [reinitialize_layers]
    for name in reinitialize_layers:
        model.get_layer(name)  # raises a clear ValueError for unknown names
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        tuned = copy_model(model)
        reinitialize(tuned, list(reinitialize_layers), seed=seed)
    if epochs == 0 or x.shape[0] == 0:
        return tuned
    steps = epochs * int(np.ceil(x.shape[0] / batch_size))
    rate = (keras.optimizers.schedules.CosineDecay(learning_rate, steps)
            if schedule == "cosine" else learning_rate)
    with strategy.scope():
        optimizer = keras.optimizers.SGD(rate, momentum=momentum,
                                         weight_decay=weight_decay or None)
    loss_fn = summed_loss(loss_for(tuned))
    variables = tuned.trainable_variables

    def loss_on(xb, yb, count):
        """This replica's share of the batch loss (its rows' sum over the batch size)."""
        loss = batch_mean(loss_fn(yb, tuned(xb, training=True)), count)
        return loss + replica_layer_losses(tuned, loss.dtype)

    def replica_step(xb, yb):
        count = tf.shape(xb)[0]
        xb, yb = replica_rows(xb), replica_rows(yb)
        with tf.GradientTape() as tape:
            loss = loss_on(xb, yb, count)
        grads = summed_gradients(tape.gradient(loss, variables))
        if sam_rho > 0:
            norm = tf.linalg.global_norm([g for g in grads if g is not None]) + 1e-12
            nudges = [None if g is None else g * (sam_rho / norm) for g in grads]
            shift_variables(variables, nudges)
            with tf.GradientTape() as tape:
                sharp_loss = loss_on(xb, yb, count)
            grads = summed_gradients(tape.gradient(sharp_loss, variables))
            shift_variables(variables, nudges, subtract=True)
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None],
                                  skip_gradients_aggregation=True)
        return loss

    @tf.function(reduce_retracing=True)
    def step(xb, yb):
        return sum_over_replicas(strategy, strategy.run(replica_step, args=(xb, yb)))

    dataset = (tf.data.Dataset.from_tensor_slices((x, y))
               .shuffle(x.shape[0], seed=seed, reshuffle_each_iteration=True)
               .batch(batch_size))
    for _ in range(epochs):
        for xb, yb in dataset:
            step(xb, yb)
    return tuned

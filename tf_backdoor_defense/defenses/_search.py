"""Fine-pruning with the accuracy budget measured after fine-tuning.

The paper's fine-pruning picks the pruning level by the accuracy of the
pruned network *before* fine-tuning. Fine-tuning recovers much of that
accuracy, so the classic rule stops far too early: the budget is spent on a
drop that fine-tuning would have repaired, and the backdoor survives.
:func:`search_pruning_level` puts fine-tuning inside the search: every level
it tries is pruned, fine-tuned on the defender's clean data and measured on
the defender's validation data, and it keeps the most aggressive level whose
*post-fine-tuning* accuracy stays within the budget.

Several layers can be pruned together (e.g. the last convolution and the
penultimate dense layer): each layer keeps its own activation ranking, and a
level prunes the same fraction of every layer.
"""

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tf_backdoor_defense._distribute import resolve_strategy
from tf_backdoor_defense._errors import InputError
from tf_backdoor_defense.pruning._ranking import fraction_masks, layer_rankings
from tf_backdoor_defense.masks._results import MasksResult
from tf_backdoor_defense.masks._wrapper import layer_names, wrap_layers
from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
from tf_backdoor_defense.finetune._training import train_clean
from tf_backdoor_defense._validation import (check_data, check_fraction, check_model, check_target,
                                             check_ranking_data, num_classes_of, renamed_argument)
from tf_backdoor_defense.keras3._caller import with_caller_keras

__all__ = ["search_pruning_level", "PruningSearchResult", "SEARCH_STRATEGIES"]

SEARCH_STRATEGIES = ("bisection", "descending")
_EPS = 1e-12


@dataclass(frozen=True, eq=False, repr=False)
class PruningSearchResult(MasksResult):
    """What :func:`search_pruning_level` returns.

    Attributes
    ----------
    model : tf_keras.Model
        The pruned and fine-tuned copy at the chosen level (layers wrapped in
        ``PruneByActivation``).
    fraction : float
        Fraction of each layer's channels pruned.
    masks : dict
        ``{layer: mask}`` at the chosen level (1 = kept).
    table : pandas.DataFrame
        One row per level tried, in the order tried: ``fraction``,
        ``channels_pruned``, ``validation_accuracy``, ``accuracy_drop``,
        ``within_budget``, ``validation_asr`` (NaN without poisoned data) and
        ``seconds``.
    baseline_accuracy : float
        The unpruned model's validation accuracy, before any fine-tuning.
    within_budget : bool
        False when even the unpruned, fine-tuned model misses the budget.
    layers : list of str
        The layers pruned.
    """

    model: object
    fraction: float
    masks: dict
    table: object
    baseline_accuracy: float
    within_budget: bool
    layers: list

    @property
    def channels_pruned(self):
        """``{layer: number of channels pruned}`` at the chosen level."""
        return self.pruned_counts

    def __repr__(self):
        return (f"PruningSearchResult(fraction={self.fraction:.3f}, "
                f"channels_pruned={self.channels_pruned}, levels_tried={len(self.table)})")


def _fractions(fractions, largest):
    if fractions is None:
        steps = min(largest, 32)
        return np.arange(steps + 1) / steps
    values = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
        raise InputError(f"The 'fractions' parameter must hold numbers in [0, 1]. Got {fractions!r}.")
    return np.unique(np.concatenate([[0.0], values]))


@with_caller_keras
def search_pruning_level(model, train_data, validation_data, *, layers=None, max_accuracy_drop=0.01,
                         strategy="bisection", fractions=None, fine_tune=None, ranking_data=None,
                         poisoned_validation_data=None, target=None, batch_size=256, seed=0,
                         poisoned_validation=None, distribute_strategy=None):
    """Prune ``layers`` as far as fine-tuning can repair, within an accuracy budget.

    ``model`` is never modified.

    Parameters
    ----------
    model : tf_keras.Model
    train_data : (x, y) arrays or tf.data.Dataset
        The defender's clean data: fine-tuning, and the channel ranking unless
        ``ranking_data`` is given.
    validation_data : (x, y) arrays or tf.data.Dataset
        Clean data the budget is measured on (not used for training).
    layers : str or list of str, default=None
        Conv or Dense layers to prune together; default: the last conv layer.
    max_accuracy_drop : float, default=0.01
        Allowed drop of validation accuracy after fine-tuning, in absolute
        points, relative to the unpruned model as received.
    strategy : {"bisection", "descending"}, default="bisection"
        ``"bisection"`` assumes accuracy falls with the level and tries about
        log2(levels) + 1 of them; ``"descending"`` tries the most aggressive
        level first and walks down until one fits (no assumption, more runs).
    fractions : sequence of float, default=None
        Levels to consider, as fractions of each layer's channels; default:
        33 evenly spaced levels (fewer for narrow layers). 0 is always added.
    fine_tune : dict, default=None
        Keyword arguments for :func:`~tf_backdoor_defense.finetune._training.train_clean`.
    ranking_data : default=None
        Data for the activation ranking; default: ``train_data``.
    poisoned_validation_data, target : default=None
        When given, the ASR of every level tried is recorded in the table
        (it never influences the choice).
    batch_size : int, default=256
        Batch size of the statistics and evaluations.
    seed : int, default=0
    poisoned_validation : deprecated
        The old name of ``poisoned_validation_data``; it still works in this
        release, with a ``DeprecationWarning``.
    distribute_strategy : tf.distribute.Strategy, default=None
        The ``tf.distribute`` strategy (``strategy`` names the search order):
        the channel statistics, every level's clean training and its
        validation passes run on the strategy's replicas and workers (every
        worker needs the same data and seed). Default:
        ``fine_tune["strategy"]`` if given, else ``model.distribute_strategy``
        (the strategy whose ``scope()`` the call runs in, else one device).

    Returns
    -------
    PruningSearchResult

    Examples
    --------
    >>> import numpy as np, tf_keras as keras
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((6, 6, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ...     keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    >>> x = np.random.default_rng(0).random((32, 6, 6, 1), dtype=np.float32)
    >>> y = np.argmax(model.predict(x, verbose=0), axis=1)
    >>> result = search_pruning_level(model, (x, y), (x, y), max_accuracy_drop=0.5,
    ...                               fine_tune={"epochs": 1})
    >>> list(result.table.columns[:3]), result.model is model
    (['fraction', 'channels_pruned', 'validation_accuracy'], False)
    """
    check_model(model)
    poisoned_validation_data = renamed_argument("search_pruning_level", "poisoned_validation",
                                                poisoned_validation, "poisoned_validation_data",
                                                poisoned_validation_data)
    names = layer_names(model, layers)
    budget = check_fraction(max_accuracy_drop, "max_accuracy_drop")
    if strategy not in SEARCH_STRATEGIES:
        raise InputError(f"The 'strategy' parameter must be one of {list(SEARCH_STRATEGIES)}. "
                         f"Got {strategy!r}.")
    train = check_data(train_data, "train_data", model=model)
    validation = check_data(validation_data, "validation_data", model=model)
    poisoned = None
    if poisoned_validation_data is not None:
        target = check_target(target, num_classes_of(model))
        poisoned = check_data(poisoned_validation_data, "poisoned_validation_data", model=model)
    elif target is not None:
        raise InputError("The 'target' parameter needs `poisoned_validation_data`.")
    settings = dict(fine_tune or {})
    settings.setdefault("seed", seed)
    given = settings.get("strategy")
    if given is not None and distribute_strategy is not None and given is not distribute_strategy:
        raise InputError("`fine_tune['strategy']` and `distribute_strategy` name different "
                         "strategies; give one.")
    distribute_strategy = resolve_strategy(distribute_strategy or given, model)
    settings["strategy"] = distribute_strategy

    ranking_set = train if ranking_data is None else check_ranking_data(
        ranking_data, "ranking_data", model=model)
    rankings, _, base_masks = layer_rankings(model, names, ranking_set, batch_size,
                                             strategy=distribute_strategy)
    grid = _fractions(fractions, max(order.size for order in rankings.values()))
    baseline = clean_accuracy(model, validation, batch_size, strategy=distribute_strategy)

    rows, models = [], {}

    def masks_at(fraction):
        return fraction_masks(rankings, base_masks, fraction)

    def try_level(index):
        fraction = float(grid[index])
        started = time.perf_counter()
        masks = masks_at(fraction)
        tuned = train_clean(wrap_layers(model, names, masks), train, **settings)
        accuracy = clean_accuracy(tuned, validation, batch_size, strategy=distribute_strategy)
        asr = (attack_success_rate(tuned, poisoned, target=target, batch_size=batch_size,
                                   strategy=distribute_strategy)
               if poisoned is not None else np.nan)
        ok = bool(baseline - accuracy <= budget + _EPS)
        rows.append({"fraction": fraction,
                     "channels_pruned": int(sum(np.sum(m == 0) for m in masks.values())),
                     "validation_accuracy": accuracy, "accuracy_drop": baseline - accuracy,
                     "within_budget": ok, "validation_asr": asr,
                     "seconds": time.perf_counter() - started})
        models[index] = (tuned, masks)
        return ok

    if strategy == "bisection":
        best = 0
        if try_level(0):
            low, high = 0, len(grid) - 1
            while low < high:
                middle = (low + high + 1) // 2
                if try_level(middle):
                    low = middle
                else:
                    high = middle - 1
            best = low
    else:
        best = 0
        for index in range(len(grid) - 1, -1, -1):
            if try_level(index):
                best = index
                break
    chosen, masks = models[best]
    table = pd.DataFrame(rows)
    within = bool(table.loc[table["fraction"] == grid[best], "within_budget"].iloc[0])
    return PruningSearchResult(chosen, float(grid[best]), masks, table, baseline, within, names)

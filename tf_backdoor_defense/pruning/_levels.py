"""Choosing a pruning level per accuracy budget.

Stopping rules (``drop = accuracy(level 0) - accuracy(level k)``, in absolute
points, measured on the clean data):

``"largest_within"`` (default)
    The largest level ``k`` whose drop is at most ``max_accuracy_drop``.
    Accuracy need not fall monotonically; levels after a dip still count.
``"first_reaching"`` (the lab reports' rule)
    The first level ``k`` whose drop is at least ``max_accuracy_drop``; all
    levels when none reaches it.
"""

import numpy as np

from tf_backdoor_defense._errors import InputError

__all__ = ["STOPPING_RULES", "select_level"]

STOPPING_RULES = ("largest_within", "first_reaching")
_EPS = 1e-12


def select_level(clean_accuracy, max_accuracy_drop, stopping_rule="largest_within"):
    """Pick a pruning level from per-level clean accuracies (index = level).

    Examples
    --------
    >>> acc = [0.90, 0.90, 0.88, 0.89, 0.80, 0.10]
    >>> select_level(acc, 0.02), select_level(acc, 0.02, "first_reaching")
    (3, 2)
    """
    if stopping_rule not in STOPPING_RULES:
        raise InputError(f"The 'stopping_rule' parameter must be one of {list(STOPPING_RULES)}. "
                         f"Got {stopping_rule!r} instead.")
    acc = np.asarray(clean_accuracy, dtype=np.float64)
    drop = acc[0] - acc
    if stopping_rule == "largest_within":
        return int(np.flatnonzero(drop <= max_accuracy_drop + _EPS).max())
    reached = np.flatnonzero(drop >= max_accuracy_drop - _EPS)
    reached = reached[reached > 0] if max_accuracy_drop > 0 else reached
    return int(reached.min()) if reached.size else int(acc.size - 1)


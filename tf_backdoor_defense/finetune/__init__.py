"""Fine-pruning and fine-tuning (`FinePruning`, `fine_prune`, `fine_tune`), clean retraining.

The names are imported on first use: modules of other subpackages import
``finetune._training`` and must not pull in the sweep through this file.
"""

import importlib

_EXPORTS = {
    "FinePruning": "_callbacks",
    "GradualChannelSchedule": "_callbacks",
    "find_prunable_wrappers": "_callbacks",
    "reset_fine_pruning_state": "_callbacks",
    "LOG_PREFIX": "_callbacks",
    "fine_prune": "_fine_prune",
    "fine_tune": "_fine_prune",
    "FinePruneResult": "_fine_prune",
    "train_clean": "_training",
    "loss_for": "_training",
    "copy_model": "_training",
    "head_layers": "_training",
    "reinitialize": "_training",
    "as_arrays": "_training",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

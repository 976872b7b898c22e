"""tf_backdoor_defense: repair backdoored TensorFlow networks by pruning and fine-pruning.

The package uses tf-keras (Keras 2), which tensorflow-model-optimization
needs: build and load your models with ``import tf_keras as keras``.

Importing the package changes one thing in the process: it sets
``TF_USE_LEGACY_KERAS=1`` (unless already set), so that TensorFlow, when it
loads, selects tf-keras. Nothing else: TensorFlow itself loads on the first
use of a name below, and no logging, warning filter or file descriptor is
touched.

Examples
--------
>>> import tf_backdoor_defense
>>> tf_backdoor_defense.prune_to_threshold.__name__
'prune_to_threshold'
"""

import importlib
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # read by TensorFlow when it first loads

__version__ = "0.1.0"

# Each public name and the private module that defines it, imported on first use.
# A new public name is a new entry here, never an import line: importing the
# package must not load TensorFlow (the command line's --help stays fast).
_EXPORTS = {
    "PruneByActivation": "masks._wrapper",
    "wrap_layers": "masks._wrapper",
    "get_mask": "masks._wrapper",
    "set_mask": "masks._wrapper",
    "mean_channel_activations": "scoring._activations",
    "rank_channels": "pruning._ranking",
    "prune_to_threshold": "pruning._sweep",
    "SweepResult": "pruning._sweep",
    "clean_accuracy": "metrics",
    "attack_success_rate": "metrics",
    "defender_utility": "metrics",
    "predict_labels": "metrics",
    "channel_activation_table": "report._analysis",
    "plot_channel_activations": "report._analysis",
    "attack_guided_prune": "defenses._guided",
    "GuidedPruningResult": "defenses._guided",
    "FinePruning": "finetune._callbacks",
    "GradualChannelSchedule": "finetune._callbacks",
    "reset_fine_pruning_state": "finetune._callbacks",
    "fine_prune": "finetune._fine_prune",
    "fine_tune": "finetune._fine_prune",
    "FinePruneResult": "finetune._fine_prune",
    "distributed_channel_means": "scoring._distributed",
    "evaluate_defenses": "experiments._paper",
    "paper_table_mnist": "experiments._paper",
    "EvaluationResult": "experiments._paper",
    "InputError": "_errors",
    "InputTypeError": "_errors",
    "OutputExistsError": "_errors",
    "load_model": "io._loading",
    "UnsafeModelError": "io._loading",
    "ModelFileError": "io._loading",
    "load_data": "io._data",
    "DataFileError": "io._data",
    "write_sweep_report": "report._report",
    "strip_masks": "export._export",
    "export_saved_model": "export._export",
    "export_keras": "export._export",
    "convert_to_tflite": "export._export",
    "ExportReport": "export._export",
    "ShrinkFallbackWarning": "export._export",
    "repaired_model": "defenses._repair",
    "evaluate_repaired": "defenses._repair",
    "suspect_class": "defenses._repair",
    "RepairedScores": "defenses._repair",
    "train_clean": "finetune._training",
    "head_layers": "finetune._training",
    "search_pruning_level": "defenses._search",
    "PruningSearchResult": "defenses._search",
    "channel_lipschitz": "scoring._lipschitz",
    "clp_masks": "scoring._lipschitz",
    "clp_prune": "scoring._lipschitz",
    "ClpResult": "scoring._lipschitz",
    "anp_mask_scores": "scoring._anp",
    "anp_masks": "scoring._anp",
    "anp_prune": "scoring._anp",
    "AnpResult": "scoring._anp",
    "defend": "defenses._defend",
    "DefenseResult": "defenses._defend",
    "BackdoorStillActiveWarning": "defenses._defend",
    "LowAccuracyWarning": "_validation",
    "MissingClassesWarning": "_validation",
    "convs_read_by_dense": "graph._analysis",
    "scan_model": "scan._scan",
    "ScanResult": "scan._scan",
}

# Subpackages and modules reachable as attributes (``tf_backdoor_defense.attacks``), also
# imported on first use.
_SUBMODULES = ("attacks", "cli", "defenses", "experiments", "export", "finetune", "graph", "io",
               "masks", "metrics", "pruning", "report", "scan", "scoring")

__all__ = [*_EXPORTS, "attacks", "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))

"""tf_backdoor_defense: repair backdoored TensorFlow networks by pruning and fine-pruning.

Importing the package selects tf-keras (Keras 2), which tensorflow-model-optimization
needs: use ``import tf_keras as keras`` for your models.
"""

from tf_backdoor_defense.cli._native_stderr import quiet_native_startup as _quiet_native_startup

_quiet_native_startup()  # only as the command: TensorFlow's native start-up lines off stderr

from tf_backdoor_defense import _keras  # noqa: E402,F401  (selects tf-keras first)
from tf_backdoor_defense import attacks  # noqa: F401
from tf_backdoor_defense.scoring._activations import mean_channel_activations
from tf_backdoor_defense.finetune._callbacks import FinePruning, GradualChannelSchedule, GradualFinePruning
from tf_backdoor_defense.scoring._distributed import distributed_channel_means
from tf_backdoor_defense.experiments._paper import EvaluationResult, evaluate_defenses, paper_table_mnist
from tf_backdoor_defense.io._data import DataFileError, load_data
from tf_backdoor_defense.io._loading import ModelFileError, UnsafeModelError, load_model
from tf_backdoor_defense.report._report import write_sweep_report
from tf_backdoor_defense.finetune._fine_prune import FinePruneResult, fine_prune, fine_tune
from tf_backdoor_defense.report._analysis import channel_activation_table, plot_channel_activations
from tf_backdoor_defense.export._export import (
    ExportReport,
    ShrinkFallbackWarning,
    convert_to_tflite,
    export_keras,
    export_saved_model,
    strip_masks,
)
from tf_backdoor_defense.defenses._guided import GuidedPruningResult, attack_guided_prune
from tf_backdoor_defense.masks._wrapper import PruneByActivation, get_mask, set_mask, wrap_layers
from tf_backdoor_defense.metrics import (
    attack_success_rate,
    clean_accuracy,
    defender_utility,
    predict_labels,
)
from tf_backdoor_defense.pruning._ranking import rank_channels
from tf_backdoor_defense.defenses._repair import RepairedScores, evaluate_repaired, repaired_model, suspect_class
from tf_backdoor_defense.pruning._group_sweep import GroupSweepResult
from tf_backdoor_defense.pruning._sweep import SweepResult, prune_to_threshold
from tf_backdoor_defense.finetune._training import head_layers, train_clean
from tf_backdoor_defense.defenses._search import PruningSearchResult, search_pruning_level
from tf_backdoor_defense.scoring._lipschitz import ClpResult, channel_lipschitz, clp_masks, clp_prune
from tf_backdoor_defense.scoring._anp import AnpResult, anp_mask_scores, anp_masks, anp_prune
from tf_backdoor_defense.defenses._defend import BackdoorStillActiveWarning, DefenseResult, defend

__version__ = "0.1.0"

__all__ = [
    "PruneByActivation",
    "wrap_layers",
    "get_mask",
    "set_mask",
    "mean_channel_activations",
    "rank_channels",
    "prune_to_threshold",
    "SweepResult",
    "GroupSweepResult",
    "clean_accuracy",
    "attack_success_rate",
    "defender_utility",
    "predict_labels",
    "channel_activation_table",
    "plot_channel_activations",
    "attack_guided_prune",
    "GuidedPruningResult",
    "attacks",
    "FinePruning",
    "GradualFinePruning",
    "GradualChannelSchedule",
    "fine_prune",
    "fine_tune",
    "FinePruneResult",
    "distributed_channel_means",
    "evaluate_defenses",
    "paper_table_mnist",
    "EvaluationResult",
    "load_model",
    "UnsafeModelError",
    "ModelFileError",
    "load_data",
    "DataFileError",
    "write_sweep_report",
    "strip_masks",
    "export_saved_model",
    "export_keras",
    "convert_to_tflite",
    "ExportReport",
    "ShrinkFallbackWarning",
    "repaired_model",
    "evaluate_repaired",
    "suspect_class",
    "RepairedScores",
    "train_clean",
    "head_layers",
    "search_pruning_level",
    "PruningSearchResult",
    "channel_lipschitz",
    "clp_masks",
    "clp_prune",
    "ClpResult",
    "anp_mask_scores",
    "anp_masks",
    "anp_prune",
    "AnpResult",
    "defend",
    "DefenseResult",
    "BackdoorStillActiveWarning",
    "__version__",
]

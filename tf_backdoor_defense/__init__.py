"""tf_backdoor_defense: repair backdoored TensorFlow networks by pruning and fine-pruning.

Importing the package selects tf-keras (Keras 2), which tensorflow-model-optimization
needs: use ``import tf_keras as keras`` for your models.
"""

from tf_backdoor_defense._native_stderr import quiet_native_startup as _quiet_native_startup

_quiet_native_startup()  # only as the command: TensorFlow's native start-up lines off stderr

from tf_backdoor_defense import _keras  # noqa: E402,F401  (selects tf-keras first)
from tf_backdoor_defense import attacks  # noqa: F401
from tf_backdoor_defense.activations import mean_channel_activations
from tf_backdoor_defense.callbacks import FinePruning, GradualChannelSchedule, GradualFinePruning
from tf_backdoor_defense.distributed import distributed_channel_means
from tf_backdoor_defense.evaluation import EvaluationResult, evaluate_defenses, paper_table_mnist
from tf_backdoor_defense.io import DataFileError, load_data
from tf_backdoor_defense.loading import ModelFileError, UnsafeModelError, load_model
from tf_backdoor_defense.report import write_sweep_report
from tf_backdoor_defense.finetune import FinePruneResult, fine_prune, fine_tune
from tf_backdoor_defense.analysis import channel_activation_table, plot_channel_activations
from tf_backdoor_defense.export import (
    ExportReport,
    ShrinkFallbackWarning,
    convert_to_tflite,
    export_keras,
    export_saved_model,
    strip_masks,
)
from tf_backdoor_defense.guided import GuidedPruningResult, attack_guided_prune
from tf_backdoor_defense.masks import PruneByActivation, get_mask, set_mask, wrap_layers
from tf_backdoor_defense.metrics import (
    attack_success_rate,
    clean_accuracy,
    defender_utility,
    predict_labels,
)
from tf_backdoor_defense.ranking import rank_channels
from tf_backdoor_defense.repair import RepairedScores, evaluate_repaired, repaired_model, suspect_class
from tf_backdoor_defense.group_sweep import GroupSweepResult
from tf_backdoor_defense.sweep import SweepResult, prune_to_threshold
from tf_backdoor_defense.training import head_layers, train_clean
from tf_backdoor_defense.search import PruningSearchResult, search_pruning_level
from tf_backdoor_defense.lipschitz import ClpResult, channel_lipschitz, clp_masks, clp_prune
from tf_backdoor_defense.anp import AnpResult, anp_mask_scores, anp_masks, anp_prune
from tf_backdoor_defense.defense import BackdoorStillActiveWarning, DefenseResult, defend

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

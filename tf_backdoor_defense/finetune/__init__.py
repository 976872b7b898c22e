"""Fine-tuning and fine-pruning: Keras callbacks, `fine_prune` and training loops."""

from tf_backdoor_defense.finetune._callbacks import (  # noqa: F401
    FinePruning,
    GradualFinePruning,
    GradualChannelSchedule,
    find_prunable_wrapper,
    LOG_PREFIX,
)
from tf_backdoor_defense.finetune._fine_prune import (  # noqa: F401
    fine_prune,
    fine_tune,
    FinePruneResult,
)
from tf_backdoor_defense.finetune._training import (  # noqa: F401
    train_clean,
    loss_for,
    copy_model,
    head_layers,
    reinitialize,
    as_arrays,
)

__all__ = [
    "FinePruning",
    "GradualFinePruning",
    "GradualChannelSchedule",
    "find_prunable_wrapper",
    "LOG_PREFIX",
    "fine_prune",
    "fine_tune",
    "FinePruneResult",
    "train_clean",
    "loss_for",
    "copy_model",
    "head_layers",
    "reinitialize",
    "as_arrays",
]

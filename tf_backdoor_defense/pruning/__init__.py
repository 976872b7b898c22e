"""Scores -> ranking -> levels -> the incremental sweep -> `SweepResult`."""

from tf_backdoor_defense.pruning._group_sweep import (  # noqa: F401
    GroupSweepResult,
    sweep_layers,
    layer_rankings,
    fraction_masks,
)
from tf_backdoor_defense.pruning._incremental import (  # noqa: F401
    LevelEvaluator,
)
from tf_backdoor_defense.pruning._levels import (  # noqa: F401
    STOPPING_RULES,
    select_level,
    LevelResult,
)
from tf_backdoor_defense.pruning._ranking import (  # noqa: F401
    rank_channels,
    level_mask,
)
from tf_backdoor_defense.pruning._sweep import (  # noqa: F401
    prune_to_threshold,
    SweepResult,
    STOPPING_RULES,
    select_level,
)

__all__ = [
    "GroupSweepResult",
    "sweep_layers",
    "layer_rankings",
    "fraction_masks",
    "LevelEvaluator",
    "STOPPING_RULES",
    "select_level",
    "LevelResult",
    "rank_channels",
    "level_mask",
    "prune_to_threshold",
    "SweepResult",
    "STOPPING_RULES",
    "select_level",
]

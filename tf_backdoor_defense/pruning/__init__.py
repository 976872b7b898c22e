"""Scores -> ranking -> levels -> the one sweep engine -> `SweepResult`."""

from tf_backdoor_defense.pruning._incremental import (  # noqa: F401
    LevelEvaluator,
)
from tf_backdoor_defense.pruning._levels import (  # noqa: F401
    STOPPING_RULES,
    select_level,
)
from tf_backdoor_defense.pruning._ranking import (  # noqa: F401
    fraction_masks,
    layer_rankings,
    level_mask,
    rank_channels,
)
from tf_backdoor_defense.pruning._sweep import (  # noqa: F401
    SweepResult,
    prune_to_threshold,
)

__all__ = [
    "LevelEvaluator",
    "STOPPING_RULES",
    "select_level",
    "fraction_masks",
    "layer_rankings",
    "level_mask",
    "rank_channels",
    "SweepResult",
    "prune_to_threshold",
]

"""`defend()` and the repairs it composes (pruning search, attack-guided pruning, GoodNet)."""

from tf_backdoor_defense.defenses._defend import (  # noqa: F401
    defend,
    DefenseResult,
    BackdoorStillActiveWarning,
    LowAccuracyWarning,
    MissingClassesWarning,
    METHODS,
)
from tf_backdoor_defense.defenses._guided import (  # noqa: F401
    attack_guided_prune,
    GuidedPruningResult,
    DECISIONS,
)
from tf_backdoor_defense.defenses._repair import (  # noqa: F401
    repaired_model,
    suspect_class,
    evaluate_repaired,
    RepairedScores,
)
from tf_backdoor_defense.defenses._search import (  # noqa: F401
    search_pruning_level,
    PruningSearchResult,
    SEARCH_STRATEGIES,
)

__all__ = [
    "defend",
    "DefenseResult",
    "BackdoorStillActiveWarning",
    "LowAccuracyWarning",
    "MissingClassesWarning",
    "METHODS",
    "attack_guided_prune",
    "GuidedPruningResult",
    "DECISIONS",
    "repaired_model",
    "suspect_class",
    "evaluate_repaired",
    "RepairedScores",
    "search_pruning_level",
    "PruningSearchResult",
    "SEARCH_STRATEGIES",
]

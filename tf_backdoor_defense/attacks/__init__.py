"""Backdoor attacks used to test the defenses: BadNet triggers, data poisoning and the
pruning-aware attack."""

from tf_backdoor_defense.attacks.badnet import (
    BlendTrigger,
    ImageTrigger,
    PatchTrigger,
    PixelPatternTrigger,
    SignalTrigger,
    Trigger,
    all_to_all_shift,
    checkerboard_patch,
    pixel_pattern,
    poison_dataset,
    poisoned_evaluation_set,
    single_pixel,
)
from tf_backdoor_defense.attacks.pruning_aware import PruningAwareAttackResult, pruning_aware_attack

__all__ = [
    "Trigger",
    "PatchTrigger",
    "PixelPatternTrigger",
    "ImageTrigger",
    "BlendTrigger",
    "SignalTrigger",
    "single_pixel",
    "pixel_pattern",
    "checkerboard_patch",
    "all_to_all_shift",
    "poison_dataset",
    "poisoned_evaluation_set",
    "pruning_aware_attack",
    "PruningAwareAttackResult",
]

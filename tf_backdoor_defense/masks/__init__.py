"""`PruneByActivation`, the per-channel mask wrapper, and helpers to find and wrap layers."""

from tf_backdoor_defense.masks._wrapper import (  # noqa: F401
    PruneByActivation,
    PRUNABLE_LAYER_TYPES,
    wrap_layers,
    find_layer,
    last_conv_layer,
    get_mask,
    set_mask,
    masked_layers,
    channel_axis,
)

__all__ = [
    "PruneByActivation",
    "PRUNABLE_LAYER_TYPES",
    "wrap_layers",
    "find_layer",
    "last_conv_layer",
    "get_mask",
    "set_mask",
    "masked_layers",
    "channel_axis",
]

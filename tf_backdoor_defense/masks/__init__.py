"""`PruneByActivation`, the layer-kind registry, and helpers to find, wrap and unwrap layers."""

from tf_backdoor_defense.masks._registry import (  # noqa: F401
    PRUNABLE_LAYER_TYPES,
    is_conv,
    is_prunable,
)
from tf_backdoor_defense.masks._wrapper import (  # noqa: F401
    PruneByActivation,
    OutputLayerPruningWarning,
    wrap_layers,
    apply_masks,
    find_layer,
    layer_names,
    last_conv_layer,
    unwrap,
    get_mask,
    set_mask,
    masked_layers,
    channel_axis,
    channel_count,
)

__all__ = [
    "PruneByActivation",
    "OutputLayerPruningWarning",
    "PRUNABLE_LAYER_TYPES",
    "is_conv",
    "is_prunable",
    "wrap_layers",
    "apply_masks",
    "find_layer",
    "layer_names",
    "last_conv_layer",
    "unwrap",
    "get_mask",
    "set_mask",
    "masked_layers",
    "channel_axis",
    "channel_count",
]

"""Per-channel scores: mean activations (streaming, distributed), ANP, channel Lipschitz."""

from tf_backdoor_defense.scoring._activations import (  # noqa: F401
    mean_channel_activations,
    resolve_layer,
    activation_tensor,
    channel_sum_fn,
    average_channel_sums,
)
from tf_backdoor_defense.scoring._anp import (  # noqa: F401
    anp_mask_scores,
    anp_masks,
    anp_prune,
    AnpResult,
    anp_layers,
)
from tf_backdoor_defense.scoring._distributed import (  # noqa: F401
    distributed_channel_means,
    is_distributed,
)
from tf_backdoor_defense.scoring._lipschitz import (  # noqa: F401
    channel_lipschitz,
    clp_masks,
    clp_prune,
    ClpResult,
    conv_layers,
)

__all__ = [
    "mean_channel_activations",
    "resolve_layer",
    "activation_tensor",
    "channel_sum_fn",
    "average_channel_sums",
    "anp_mask_scores",
    "anp_masks",
    "anp_prune",
    "AnpResult",
    "anp_layers",
    "distributed_channel_means",
    "is_distributed",
    "channel_lipschitz",
    "clp_masks",
    "clp_prune",
    "ClpResult",
    "conv_layers",
]

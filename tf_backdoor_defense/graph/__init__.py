"""The network as a graph: NHWC channel dependencies and node order."""

from tf_backdoor_defense.graph._channels import (  # noqa: F401
    ChannelUse,
    layer_kind,
    topological_nodes,
    tensor_consumers,
    channel_consumers,
)

__all__ = [
    "ChannelUse",
    "layer_kind",
    "topological_nodes",
    "tensor_consumers",
    "channel_consumers",
]

"""The network as a graph: NHWC channel dependencies, node order and the one graph replay."""

from tf_backdoor_defense.graph._analysis import convs_read_by_dense  # noqa: F401
from tf_backdoor_defense.graph._channels import (  # noqa: F401
    ChannelUse,
    layer_kind,
    tensor_consumers,
    channel_consumers,
)
from tf_backdoor_defense.graph._functional import as_functional, is_subclassed  # noqa: F401
from tf_backdoor_defense.graph._inputs import (  # noqa: F401
    channels_last_view,
    reads_channels_first,
    with_float_inputs,
)
from tf_backdoor_defense.graph._replay import (  # noqa: F401
    topological_nodes,
    replay_nodes,
)

__all__ = [
    "ChannelUse",
    "layer_kind",
    "topological_nodes",
    "tensor_consumers",
    "channel_consumers",
    "replay_nodes",
    "convs_read_by_dense",
    "with_float_inputs",
    "reads_channels_first",
    "channels_last_view",
    "as_functional",
    "is_subclassed",
]

"""What every result that carries per-layer channel masks can say about them."""

import numpy as np

__all__ = ["MasksResult"]


class MasksResult:
    """Base of the frozen result dataclasses that hold ``masks`` (``{layer: 0/1 mask}``).

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Example(MasksResult):
    ...     masks: dict
    >>> result = Example({"conv": np.array([1.0, 0.0, 0.0])})
    >>> result.pruned_channels["conv"].tolist(), result.pruned_counts
    ([1, 2], {'conv': 2})
    """

    @property
    def pruned_channels(self):
        """``{layer_name: sorted array of pruned channels}``."""
        return {name: np.flatnonzero(np.asarray(mask) == 0) for name, mask in self.masks.items()}

    @property
    def pruned_counts(self):
        """``{layer_name: number of channels pruned}``."""
        return {name: int(np.sum(np.asarray(mask) == 0)) for name, mask in self.masks.items()}

"""``max``: round to nearest with every scale from the max |w| it covers (the codec's own choice)."""

from __future__ import annotations

from ...algorithm_options import Algorithm
from .registry import AlgorithmContext, register

__all__ = ["MaxStep"]


@register(Algorithm.MAX)
class MaxStep:
    """Nothing to observe and nothing to change: the codec quantizes the weights as they are."""

    needs_forward = False

    def __init__(self, context: AlgorithmContext) -> None:
        self.context = context

    def stop_observing(self) -> None:
        pass

    def apply(self) -> None:
        pass

"""What one export format puts in a checkpoint, before anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .shards import PlannedTensor

__all__ = ["CheckpointContent"]


@dataclass(frozen=True)
class CheckpointContent:
    """A format's tensors (computed lazily while they are written), the ``quantization_config`` block of
    ``config.json``, and any format-specific JSON side files (file name -> content)."""

    plan: list[PlannedTensor]
    quantization_config: dict[str, Any]
    side_files: dict[str, dict[str, Any]] = field(default_factory=dict)

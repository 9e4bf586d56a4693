"""What one export format puts in a checkpoint, before anything is written."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .shards import PlannedTensor

__all__ = ["CheckpointContent", "planning"]


@dataclass(frozen=True)
class CheckpointContent:
    """A format's tensors (computed lazily while they are written), the ``quantization_config`` block of
    ``config.json``, and any format-specific JSON side files (file name -> content)."""

    plan: list[PlannedTensor]
    quantization_config: dict[str, Any]
    side_files: dict[str, dict[str, Any]] = field(default_factory=dict)


@contextmanager
def planning() -> Iterator[None]:
    """Builds a plan without the garbage collector's full passes: a 30B MoE plan creates ~74,000 entries
    (and their closures), which set off collections that walk every object the model holds; they took ~40% of
    the plan's time and find nothing (the plan makes no reference cycles). Collection runs again after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

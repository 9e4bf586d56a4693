"""The garbage collector paused while an export plans, or a check reads, its many small objects.

A 30B MoE export plans ~74,000 tensors (entries, closures, sort keys, header records) and the checker reads as
many back. Those allocations set off full collections that walk every object the process holds (in an export,
the model's modules and parameters too) and find nothing: none of these objects form reference cycles.
Measured: ~40% of a 12-layer, 128-expert plan's time; 0.6 s of a 2.6 s check of 37,000 tensors. Only such
Python-heavy stages are paused, never the writing, where tensors are freed as they are written.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """No automatic collection inside the block; the collector is left as it was found."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

"""Host memory that stays flat as a layer-by-layer run goes through its decoder layers (issue 12).

Two native causes made the resident memory of a CPU run grow with the number of layers, while the
Python-visible objects and tensors did not:

* glibc's allocator keeps the memory of freed layers (its arenas are trimmed only at their top, and the
  export's shard threads each have their own arena): :func:`release_freed_memory` hands the free pages
  back to the system after each layer (``malloc_trim``), where the C library has it;
* oneDNN, which runs CPU matrix products in bf16/fp16, caches a compiled primitive per input shape, in two
  caches of up to 1,024 entries each (its own, and ideep's inside PyTorch), about 0.15 MiB an entry. An MoE
  layer's experts see a new number of tokens per expert and per batch, so each layer adds some hundred
  shapes, which only fill the caches over many layers (about 0.6 GiB when full).
  :func:`bound_onednn_caches` caps both caches. Their capacities are read from the environment once, at the
  first oneDNN product of the process: the cap applies only when no product ran before it, and a value
  the user set is kept. A primitive made again computes the same values: results and exported bytes do not
  change.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from functools import cache

__all__ = ["ONEDNN_CACHE_CAPACITY", "ONEDNN_CACHE_VARIABLES", "bound_onednn_caches", "release_freed_memory"]

logger = logging.getLogger(__name__)

ONEDNN_CACHE_CAPACITY = 64
"""Entries per cache: more than the fixed shapes of one layer's batches (attention and dense projections keep
hitting the cache), a few MiB in all. Must be at least 1 (ideep fails with an empty cache)."""

ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
"""oneDNN's primitive cache, and ideep's cache of computations (in PyTorch's CPU matrix products)."""


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None on other C libraries and systems)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the allocator's free pages (of every arena) to the system; False where there is no
    ``malloc_trim`` to call (nothing is done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> dict[str, str]:
    """Cap oneDNN's primitive caches at ``capacity`` entries each, unless the environment already names a
    capacity; returns the variables it set. Effective when called before the process's first oneDNN product."""
    if capacity < 1:
        raise ValueError(f"oneDNN cache capacity must be at least 1, got {capacity}")
    set_now = {}
    for variable in ONEDNN_CACHE_VARIABLES:
        if variable not in os.environ:
            os.environ[variable] = set_now[variable] = str(capacity)
    if set_now:
        logger.debug("oneDNN caches capped at %d entries (%s)", capacity, ", ".join(set_now))
    return set_now

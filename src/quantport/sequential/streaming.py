"""Export of a model opened layer by layer: each planned tensor computed while its layer holds its weights.

The writer computes the planned tensors in name order, so a decoder layer's tensors come one after the
other. :class:`LayerStream` wraps each planned tensor's computation: the layer is read from the source
before its first tensor and dropped after its last, and no more than ``capacity`` layers hold their
weights at once (with one shard written at a time, two: the one written and the next).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import torch

from ..export.shards import PlannedTensor, TensorRun
from .host_memory import release_freed_memory
from .layer_store import LayerStore

__all__ = ["LayerStream"]


class LayerStream:
    """Loads the layer a planned tensor belongs to when it is computed, frees it after its last tensor."""

    def __init__(self, store: LayerStore, capacity: int = 2) -> None:
        self.store = store
        self.capacity = capacity
        self._left: Counter[int] = Counter()
        self._ready = threading.Condition()

    def wrap(self, plan: list[PlannedTensor]) -> list[PlannedTensor]:
        """``plan`` with each computation of a decoder layer's tensor (alone or in a run of neighbours) wrapped
        in that layer's loading."""
        wrapped, runs = [], {}
        for entry in plan:
            layer = self.store.layer_of(entry.name)
            if layer is None:
                wrapped.append(entry)
                continue
            self._left[layer] += 1
            run = entry.run
            if run is not None and id(run) not in runs:
                runs[id(run)] = TensorRun(
                    lambda names, layer=layer, compute=run.compute: self._compute(layer, compute, names)
                )
            wrapped.append(
                PlannedTensor(
                    entry.name,
                    entry.spec,
                    lambda layer=layer, compute=entry.compute, name=entry.name: self._compute(
                        layer, lambda _: compute(), [name]
                    ),
                    borrowed=entry.borrowed,
                    run=None if run is None else runs[id(run)],
                )
            )
        return wrapped

    def _compute(self, layer: int, compute: Callable[[list[str]], torch.Tensor], names: list[str]) -> torch.Tensor:
        """``compute(names)`` with ``layer`` loaded; the layer is freed once all its tensors are computed (and
        the memory it held handed back to the system)."""
        with self._ready:
            self._ready.wait_for(lambda: layer in self.store.loaded or len(self.store.loaded) < self.capacity)
            self.store.load(layer)
        tensor = compute(names)
        with self._ready:
            self._left[layer] -= len(names)
            freed = not self._left[layer]
            if freed:
                self.store.free(layer)
                self._ready.notify_all()
        if freed:
            release_freed_memory()
        return tensor

    def close(self) -> None:
        """Drop every layer still loaded (after an interrupted export)."""
        for layer in list(self.store.loaded):
            self.store.free(layer)

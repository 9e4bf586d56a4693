"""Peak bytes of the tensors a block of code allocates and keeps alive, measured without a GPU.

:class:`LiveBytes` is a ``TorchDispatchMode``: every tensor an operator returns whose storage is new (not one
of the operator's inputs' storages: views and in-place results are not allocations) is counted until that
storage is freed (PyTorch keeps one Python object per storage, so a finalizer on it runs when the storage
goes). Dispatch modes are per thread: run code that loads tensors in worker threads with those threads off
(``HF_DEACTIVATE_ASYNC_LOAD=1`` for transformers' loading).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storages(values) -> set[int]:
    return {t.untyped_storage()._cdata for t in tree_leaves(values) if isinstance(t, torch.Tensor)}


class LiveBytes(TorchDispatchMode):
    """Bytes of storages allocated under the mode and still alive: ``now`` and ``peak`` (meta tensors aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self._alive: set[int] = set()
        self._lock = threading.Lock()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _storages((args, kwargs))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                if storage._cdata not in inputs:
                    self._count(storage)
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        with self._lock:
            if key in self._alive:
                return
            self._alive.add(key)
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._freed, key, storage.nbytes())

    def _freed(self, key: int, nbytes: int) -> None:
        with self._lock:
            self._alive.discard(key)
            self.now -= nbytes


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())

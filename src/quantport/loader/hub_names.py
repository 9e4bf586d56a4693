"""In-memory tensor names -> checkpoint (hub) names, through transformers' own conversion mapping.

transformers 5 renames and fuses some checkpoint keys when it builds a model (Mixtral's
``block_sparse_moe`` becomes ``mlp``); checkpoints keep the hub names. The loader looks a model's
tensors up under the name transformers' ``revert_weight_conversion`` gives them (run on meta
tensors, cached per module), then under their in-memory name.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

__all__ = ["HubNames"]


class HubNames:
    """Maps names of a model's modules and tensors to the names a checkpoint stores them under."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._module = lru_cache(maxsize=None)(self._module_uncached)

    def _module_uncached(self, module_name: str) -> str:
        from transformers.core_model_loading import revert_weight_conversion

        probe = f"{module_name}.quantport_probe" if module_name else "quantport_probe"
        (renamed,) = revert_weight_conversion(self.model, {probe: torch.empty((), device="meta")})
        return renamed.rsplit(".", 1)[0] if "." in renamed else ""

    def module(self, module_name: str) -> str:
        """Checkpoint name of a module."""
        return self._module(module_name)

    def tensor(self, name: str) -> str:
        """Checkpoint name of a tensor that keeps its shape on disk (weights, scales, biases)."""
        module_name, _, leaf = name.rpartition(".")
        return f"{self.module(module_name)}.{leaf}" if module_name else leaf

    def candidates(self, module_name: str) -> tuple[str, ...]:
        """Checkpoint prefixes to try for a module: its hub name, then its in-memory name."""
        return tuple(dict.fromkeys((self.module(module_name), module_name)))

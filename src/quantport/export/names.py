"""In-memory tensor names -> checkpoint (hub) names, using transformers' own conversion mapping.

transformers 5 renames and fuses some checkpoint keys when it loads a model (Mixtral's
``block_sparse_moe`` becomes ``mlp``; per-expert weights become 3-D ``gate_up_proj``). Exported
checkpoints must use the hub names engines expect, so names go through transformers'
``revert_weight_conversion`` (the inverse of what loading did), run on meta tensors: no data is
touched, and results are cached per module.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

__all__ = ["CheckpointNames"]


class CheckpointNames:
    """Maps names of a model's tensors (or of tensors beside them, like scales) to checkpoint names."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._module = lru_cache(maxsize=None)(self._module_uncached)

    def _revert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, tensors)

    def _module_uncached(self, module_name: str) -> str:
        probe = f"{module_name}.quantport_probe" if module_name else "quantport_probe"
        (renamed,) = self._revert({probe: torch.empty((), device="meta")})
        return renamed.rsplit(".", 1)[0] if "." in renamed else ""

    def module(self, module_name: str) -> str:
        """Checkpoint name of a module (e.g. for the exclude list)."""
        return self._module(module_name)

    def tensor(self, name: str) -> str:
        """Checkpoint name of a tensor that keeps its shape on disk (weights, scales, biases)."""
        module_name, _, leaf = name.rpartition(".")
        return f"{self.module(module_name)}.{leaf}" if module_name else leaf

    def split(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Checkpoint tensors for ``name``; more than one when loading fused it (unquantized experts)."""
        return self._revert({name: tensor})

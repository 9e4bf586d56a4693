"""In-memory tensor names -> checkpoint (hub) names, through transformers' own conversion mapping.

transformers 5 renames and fuses some checkpoint keys when it builds a model (Mixtral's
``block_sparse_moe`` becomes ``mlp``; per-expert weights become 3-D ``gate_up_proj``). Checkpoints keep
the hub names: the exporter writes under them and the loader looks tensors up under them first. Names go
through transformers' ``revert_weight_conversion`` (the inverse of what loading did), run on meta tensors:
no data is touched, and results are cached per module.

:meth:`HubNames.prefetch` resolves many modules in one call: transformers rebuilds the model's conversion
mapping on every call (a walk over all modules, ~1 ms per call on a 48-layer MoE model), so one call per
expert made a 30B model's export plan take ~20 s. A module asked for before any prefetch resolves the
whole model at once for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["HubNames"]


class HubNames:
    """Maps names of a model's modules and tensors (or of tensors beside them, like scales) to checkpoint names."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._modules: dict[str, str] = {}

    def _revert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, tensors)

    def prefetch(self, module_names: Iterable[str]) -> None:
        """Resolve the checkpoint names of ``module_names`` in one call to transformers (then cached)."""
        missing = list(dict.fromkeys(n for n in module_names if n not in self._modules))
        if not missing:
            return
        probes = {_probe(name): torch.empty((), device="meta") for name in missing}
        module_of = {id(tensor): name for name, tensor in zip(missing, probes.values(), strict=True)}
        for renamed, tensor in self._revert(probes).items():
            name = module_of.get(id(tensor))
            if name is not None:
                self._modules[name] = renamed.rsplit(".", 1)[0] if "." in renamed else ""

    def module(self, module_name: str) -> str:
        """Checkpoint name of a module (e.g. for the exclude list)."""
        if module_name not in self._modules:
            known = () if self._modules else (name for name, _ in self.model.named_modules())
            self.prefetch([*known, module_name])
        return self._modules[module_name]

    def tensor(self, name: str) -> str:
        """Checkpoint name of a tensor that keeps its shape on disk (weights, scales, biases)."""
        module_name, _, leaf = name.rpartition(".")
        return f"{self.module(module_name)}.{leaf}" if module_name else leaf

    def split(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Checkpoint tensors for ``name``; more than one when loading fused it (unquantized experts)."""
        return self._revert({name: tensor})

    def candidates(self, module_name: str) -> tuple[str, ...]:
        """Checkpoint prefixes to try for a module when reading: its hub name, then its in-memory name."""
        return tuple(dict.fromkeys((self.module(module_name), module_name)))


def _probe(module_name: str) -> str:
    return f"{module_name}.quantport_probe" if module_name else "quantport_probe"

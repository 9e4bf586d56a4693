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

Names that differ only in their numbers (``layers.3.mlp.experts.17.gate_proj``) are renamed alike in every
conversion mapping transformers has; resolving each through transformers still cost ~3 s of a 30B MoE
model's export (a deep copy of a converter, regular expressions compiled, per expert projection). So the
first two names of each such shape are resolved by transformers, and when both keep their numbers in
order under the same text, that text is used for the other names of the shape; any other shape is
resolved name by name as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["HubNames"]


class HubNames:
    """Maps names of a model's modules and tensors (or of tensors beside them, like scales) to checkpoint names."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._modules: dict[str, str] = {}
        self._shapes: dict[str, list[str] | None] = {}  # shape -> text around the numbers of its hub names

    def _revert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, tensors)

    def prefetch(self, module_names: Iterable[str]) -> None:
        """Resolve the checkpoint names of ``module_names`` (then cached): two names per shape through
        transformers, in one call, the others of a shape from them (module docstring)."""
        missing = list(dict.fromkeys(n for n in module_names if n not in self._modules))
        if not missing:
            return
        shapes: dict[str, list[str]] = {}
        for name in missing:
            shapes.setdefault(_shape(name), []).append(name)
        self._resolve([n for shape, names in shapes.items() if shape not in self._shapes for n in names[:2]])
        by_transformers = []
        for shape, names in shapes.items():
            if shape not in self._shapes and len(names) > 1:
                self._shapes[shape] = _shared_text(names[:2], self._modules)
            text = self._shapes.get(shape)
            for name in names:
                if name in self._modules:
                    continue
                if text is None:
                    by_transformers.append(name)
                else:
                    self._modules[name] = _with_numbers(text, _NUMBER.findall(name))
        self._resolve(by_transformers)

    def _resolve(self, module_names: list[str]) -> None:
        """Checkpoint names of ``module_names`` from transformers, in one call."""
        if not module_names:
            return
        probes = {_probe(name): torch.empty((), device="meta") for name in module_names}
        module_of = {id(tensor): name for name, tensor in zip(module_names, probes.values(), strict=True)}
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


_NUMBER = re.compile(r"\d+")


def _shape(name: str) -> str:
    """``name`` with its numbers left out: names of one shape differ only in their numbers."""
    return _NUMBER.sub("#", name)


def _shared_text(names: list[str], resolved: dict[str, str]) -> list[str] | None:
    """The text around the numbers of the hub names of ``names`` (two names of one shape) when each hub
    name holds its own name's numbers, in order, around the same text; None otherwise."""
    texts = []
    for name in names:
        hub = resolved[name]
        if _NUMBER.findall(hub) != _NUMBER.findall(name):
            return None
        texts.append(_NUMBER.split(hub))
    return texts[0] if all(t == texts[0] for t in texts) else None


def _with_numbers(text: list[str], numbers: list[str]) -> str:
    return "".join(part + number for part, number in zip(text, [*numbers, ""], strict=True))

"""Per-expert Hessians of fused MoE experts, accumulated by forward pre-hooks on the experts modules.

Each expert is a pair of Linears: ``gate_up`` reads the tokens routed to the expert (gate and up share
that input, so one Hessian), ``down`` reads the activated intermediate ``act(gate) * up`` of those tokens.
A hook sees the module's own arguments (``hidden`` and the routing), selects each active expert's rows and
recomputes its intermediate from the expert's current weights in the model dtype, as the forward does;
the module's output is untouched.

Only the experts of the current *chunk* (a range of expert indices, the same in every layer) are
accumulated, so the Hessians held at once stay within :data:`HESSIAN_BYTES`; the caller runs one
calibration forward per chunk (:func:`expert_chunk_size`). A later chunk's forward runs after GPTQ has
updated the dense layers and the earlier chunks' experts (with their full-precision forward), so its
experts' inputs carry those updates, as in GPTQ's layer-sequential form; with one chunk (the default
whenever the Hessians fit) every Hessian comes from the unmodified model.

With ``all_tokens`` (top-k families only) every expert of the chunk also accumulates the Hessians of every
token of the batch, as if routed to it: the fallback of the ``all-experts`` policy for experts that saw few
tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ...arch.experts import ForwardContract, MoEBlock
from ...modules.expert_simulation import route_top_k, top_k_arguments
from .hessian import HessianAccumulator

__all__ = ["HESSIAN_BYTES", "ExpertHessianObserver", "ExpertHessians", "expert_chunk_size"]

HESSIAN_BYTES = 4 << 30
"""fp32 bytes of expert Hessians held at once over all MoE layers (4 GiB), when the chunk is automatic."""


def expert_chunk_size(blocks: Sequence[MoEBlock], requested: int, all_tokens: bool) -> int:
    """Experts per layer per calibration forward: ``requested``, or (0) the most whose Hessians fit
    :data:`HESSIAN_BYTES` (at least 1, at most the largest expert count)."""
    most = max((b.num_experts for b in blocks), default=1)
    if requested > 0:
        return min(requested, most)
    per_expert = 0
    for block in blocks:
        out_features, in_features = block.layout.down(block.experts.down_proj[0]).shape  # [H, I]
        per_expert += 4 * (out_features**2 + in_features**2) * (2 if all_tokens else 1)
    return max(1, min(most, HESSIAN_BYTES // max(per_expert, 1)))


@dataclass
class ExpertHessians:
    """Hessians of one experts module's experts in the current chunk.

    Attributes:
        routed: expert -> projection (``gate_up``, ``down``) -> accumulator of its routed tokens.
        all_tokens: the same from every token of the batch (filled only for the ``all-experts`` fallback).
    """

    block: MoEBlock
    routed: dict[int, dict[str, HessianAccumulator]] = field(default_factory=dict)
    all_tokens: dict[int, dict[str, HessianAccumulator]] = field(default_factory=dict)

    def start(self, experts: range, all_tokens: bool) -> None:
        self.routed = {e: self._pair() for e in experts if e < self.block.num_experts}
        self.all_tokens = {e: self._pair() for e in self.routed} if all_tokens else {}

    def _pair(self) -> dict[str, HessianAccumulator]:
        down = self.block.layout.down(self.block.experts.down_proj[0])  # [H, I]
        device = self.block.experts.down_proj.device
        return {
            "gate_up": HessianAccumulator(down.shape[0], device),
            "down": HessianAccumulator(down.shape[1], device),
        }

    def _intermediate(self, expert: int, x: Tensor) -> Tensor:
        """``act(gate) * up`` of rows ``x`` ``[n, H]`` through ``expert``, as the module computes it."""
        experts, layout = self.block.experts, self.block.layout
        weight = experts.gate_up_proj[expert].detach()
        x = x.to(weight.dtype)
        h = x @ (weight if layout.transposed else weight.T)
        if layout.contract is ForwardContract.DENSE_ROUTED:
            gate, up = h.chunk(2, dim=-1)
            return up * experts.act_fn(gate)
        if layout.has_bias:
            h = h + experts.gate_up_proj_bias[expert]
        return experts._apply_gate(h)

    def _add(self, target: dict[str, HessianAccumulator], expert: int, x: Tensor) -> None:
        target["gate_up"].add(x)
        target["down"].add(self._intermediate(expert, x))

    def observe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Accumulate the chunk's experts from one call of the experts module."""
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.block.layout.contract is ForwardContract.DENSE_ROUTED:
            rows = hidden.view(self.block.num_experts, -1, hidden.shape[-1])
            for expert, target in self.routed.items():
                x = rows[expert]
                self._add(target, expert, x[(x != 0).any(dim=-1)])  # tokens not routed to it are all zero
            return
        top_k_index, _ = top_k_arguments(args[1:], kwargs)
        routing = route_top_k(hidden, top_k_index, self.block.num_experts)
        ends = routing.offsets.tolist()
        for expert, target in self.routed.items():
            start = ends[expert - 1] if expert else 0
            if ends[expert] > start:
                self._add(target, expert, hidden[routing.token_of_row[start : ends[expert]]])
        for expert, target in self.all_tokens.items():
            self._add(target, expert, hidden)


@dataclass
class ExpertHessianObserver:
    """Pre-hooks on experts modules recording :class:`ExpertHessians` of one chunk of experts per forward."""

    modules: dict[str, ExpertHessians]
    all_tokens: bool = False
    handles: list[RemovableHandle] = field(default_factory=list)

    @classmethod
    def for_blocks(cls, blocks: Sequence[MoEBlock], all_tokens: bool = False) -> ExpertHessianObserver:
        return cls({b.experts_name: ExpertHessians(b) for b in blocks}, all_tokens)

    def attach(self, experts: range) -> None:
        """Start accumulating ``experts`` (indices, in every module) from the next forward on."""
        self.detach()
        for hessians in self.modules.values():
            hessians.start(experts, self.all_tokens)
            self.handles.append(hessians.block.experts.register_forward_pre_hook(_hook(hessians), with_kwargs=True))

    def detach(self) -> None:
        """Remove the hooks (the accumulated Hessians stay until the next :meth:`attach` or :meth:`clear`)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def clear(self) -> None:
        for hessians in self.modules.values():
            hessians.routed, hessians.all_tokens = {}, {}


def _hook(hessians: ExpertHessians):  # noqa: ANN202  (a forward pre-hook with kwargs)
    @torch.no_grad()
    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hessians.observe(args, kwargs)

    return record

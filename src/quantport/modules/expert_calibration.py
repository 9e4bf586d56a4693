"""The experts calibrator: statistics of one fused experts module, gathered in its forward.

:class:`ExpertsCalibrator` runs the experts in full precision (the routed forward of
:mod:`quantport.modules.expert_simulation`) and records, per expert, the tokens routed to it and the
max |input| of both projections. Per-expert statistics come from one segmented reduction
(``scatter_reduce``) over the rows sorted by expert: no loop over experts.
"""

from __future__ import annotations

from typing import Any

import torch

from ..arch.experts import ForwardContract, MoEBlock
from .expert_simulation import (
    PROJECTIONS,
    TopKRouting,
    dense_routed_experts_forward,
    route_top_k,
    top_k_arguments,
    top_k_experts_forward,
)

__all__ = ["ExpertsCalibrator"]


def _row_amax(x: torch.Tensor) -> torch.Tensor:
    """fp32 [rows]: max |x| over the last dim, in one pass over ``x`` (no |x| temporary)."""
    return torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=-1).float()


class ExpertsCalibrator:
    """Calibration statistics of one experts module.

    Attributes:
        block: the experts module, its name and its layout.
        all_experts: record every token through every expert (the output keeps the real routing).
        tokens: int64 ``[E]`` calibration tokens routed to each expert.
        input_amax: projection -> fp32 ``[E]`` max |input| per expert, as observed.
    """

    def __init__(self, block: MoEBlock, all_experts: bool = False) -> None:
        self.block = block
        self.all_experts = all_experts
        experts = block.num_experts
        device = block.experts.down_proj.device
        self.tokens = torch.zeros(experts, dtype=torch.int64, device=device)
        self.input_amax = {p: torch.zeros(experts, dtype=torch.float32, device=device) for p in PROJECTIONS}

    def _observe(self, projection: str, row_amax: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """Running per-expert amax: one segmented max of the rows' amax into the statistics, in place."""
        self.input_amax[projection].scatter_reduce_(0, expert_ids, row_amax, reduce="amax", include_self=True)

    def _weights(self) -> dict[str, torch.Tensor]:
        return {"gate_up": self.block.experts.gate_up_proj, "down": self.block.experts.down_proj}

    def _top_k(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        routing = route_top_k(hidden, top_k_index, self.block.num_experts)
        self.tokens += routing.counts

        def observe(projection: str, rows: torch.Tensor) -> torch.Tensor:
            if not self.all_experts:
                self._observe(projection, self._rows_amax(projection, rows, routing), routing.sorted_ids)
            return rows

        experts, layout = self.block.experts, self.block.layout
        out = top_k_experts_forward(experts, layout, routing, top_k_weights, self._weights(), observe)
        if self.all_experts:
            self._observe_all_experts(hidden)
        return out

    @staticmethod
    def _rows_amax(projection: str, rows: torch.Tensor, routing: TopKRouting) -> torch.Tensor:
        if projection == "gate_up":  # a row's amax is its token's: reduce T rows, not T*K
            return _row_amax(routing.hidden)[routing.token_of_row]
        return _row_amax(rows)

    def _observe_all_experts(self, hidden: torch.Tensor, chunk_tokens: int = 1024) -> None:
        """Statistics of every token through every expert.

        Costs one extra dense pass of all experts over the batch, in chunks of ``chunk_tokens``
        tokens so that memory stays at ``chunk_tokens x E x 2I`` activations.
        """
        experts, layout = self.block.experts, self.block.layout
        num_experts = self.block.num_experts
        gate_up_w = experts.gate_up_proj if layout.transposed else experts.gate_up_proj.transpose(-1, -2)
        token_amax = hidden.detach().abs().amax().float()
        self.input_amax["gate_up"] = torch.maximum(self.input_amax["gate_up"], token_amax.expand(num_experts))
        for chunk in hidden.split(chunk_tokens):
            x = chunk.unsqueeze(0).expand(num_experts, -1, -1)
            h = torch.bmm(x, gate_up_w)
            if layout.has_bias:
                h = h + experts.gate_up_proj_bias.unsqueeze(1)
            h = experts._apply_gate(h)
            amax = h.detach().abs().amax(dim=(1, 2)).float()
            self.input_amax["down"] = torch.maximum(self.input_amax["down"], amax)

    def _dense_routed(self, hidden: torch.Tensor) -> torch.Tensor:
        def observe(projection: str, x: torch.Tensor) -> torch.Tensor:
            if projection == "gate_up":
                self.tokens += (x != 0).any(dim=-1).sum(dim=1)
            amax = x.detach().abs().amax(dim=(1, 2)).float()
            self.input_amax[projection] = torch.maximum(self.input_amax[projection], amax)
            return x

        return dense_routed_experts_forward(self.block.experts, hidden, self._weights(), observe)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The experts module's forward in full precision, recording statistics."""
        if self.block.layout.contract is ForwardContract.DENSE_ROUTED:
            return self._dense_routed(hidden)
        return self._top_k(hidden, *top_k_arguments(args, kwargs))

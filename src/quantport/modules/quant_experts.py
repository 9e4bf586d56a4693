"""ExpertsQuantizer: calibration statistics and simulation for one fused experts module.

The quantizer replaces the experts module's ``forward`` on the instance (the class and the
parameters are untouched) with a forward generic over its :class:`ExpertLayout`:

* ``TOP_K`` layouts (transformers-5 ``@use_experts_implementation``): tokens are sorted by expert and
  both projections run as one grouped GEMM each (transformers' grouped-mm kernel), as the model's own
  ``grouped_mm`` implementation does. Per-expert token counts and input amax of both projections come
  from one segmented reduction (``scatter_reduce``) over the sorted rows: no loop over experts.
* ``DENSE_ROUTED`` layouts (Llama 4): every expert gets every token pre-scaled by its router score,
  computed with ``bmm``; per-expert amax is a reduction over the token dimension.

Gating and activation are the module's own (``_apply_gate`` / ``act_fn``), so GPT-OSS's clamped,
interleaved SwiGLU needs no special case here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..arch.experts import ExpertLayout, ExpertNaming, ForwardContract, MoEBlock
from ..schemes import SchemeCodec, quantizes_stacks
from .quant_linear import QuantMode

__all__ = ["ExpertsQuantizer", "expert_weight_amax", "experts_quantizer_of", "install_experts_quantizer"]

_ATTR = "_quantport_experts"
STACK_BYTES = 64 << 20  # fp32 bytes of expert weights quantized in one call on the CPU
STACK_BYTES_CUDA = 1 << 30  # and on a GPU
PROJECTIONS = ("gate_up", "down")


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias, transposed: bool):
    from transformers.integrations.moe import _grouped_linear as transformers_grouped_linear

    return transformers_grouped_linear(x, weight, offsets, bias=bias, is_transposed=transposed)


def _row_amax(x: torch.Tensor) -> torch.Tensor:
    """fp32 [rows]: max |x| over the last dim, in one pass over ``x`` (no |x| temporary)."""
    return torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=-1).float()


def _expert_offsets(sorted_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 counts [E] and end offsets [E] of ids sorted ascending, without a host sync
    (``bincount`` on CUDA reads the largest id back to the host)."""
    bounds = torch.arange(1, num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    ends = torch.searchsorted(sorted_ids, bounds, out_int32=True)
    return torch.diff(ends, prepend=ends.new_zeros(1)), ends


def expert_weight_amax(block: MoEBlock) -> dict[str, torch.Tensor]:
    """Projection -> fp32 [E] per-expert weight amax, from the weights themselves (valid with or
    without calibration tokens; NaN or inf when the weights hold them).

    Gate and up share one amax per expert (engines fuse them); layouts exported fused share one
    amax per projection across all experts, as ModelOpt's single quantizer does.
    """
    experts = block.experts
    amax = {
        "gate_up": experts.gate_up_proj.detach().abs().amax(dim=(-1, -2)).float(),
        "down": experts.down_proj.detach().abs().amax(dim=(-1, -2)).float(),
    }
    if block.layout.naming is ExpertNaming.FUSED:
        amax = {p: a.amax().expand_as(a).clone() for p, a in amax.items()}
    return amax


class ExpertsQuantizer:
    """Statistics and simulation state of one experts module.

    Attributes:
        block: the MoE block (names, experts module, layout).
        codec: the Linear scheme's codec, applied to each expert's 2-D projections.
        tokens: int64 [E] calibration tokens routed to each expert.
        input_amax: projection -> fp32 [E] max |input| per expert, as observed.
        export_input_amax: projection -> fp32 [E] amax used for ``input_scale`` after the
            uncalibrated-expert policy (set by :func:`quantport.calibrate.moe_policy.apply_input_policy`).
        weight_amax: projection -> fp32 [E] per-tensor weight amax per expert (gate and up share one).
        mode: current :class:`QuantMode`.
    """

    def __init__(
        self,
        block: MoEBlock,
        codec: SchemeCodec,
        original_forward: Callable[..., Any],
        weight_amax: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.block = block
        self.codec = codec
        self.original_forward = original_forward
        experts = block.num_experts
        device = block.experts.down_proj.device
        self.tokens = torch.zeros(experts, dtype=torch.int64, device=device)
        self.input_amax = {p: torch.zeros(experts, dtype=torch.float32, device=device) for p in PROJECTIONS}
        self.export_input_amax: dict[str, torch.Tensor] | None = None
        self.weight_amax = expert_weight_amax(block) if weight_amax is None else weight_amax
        self.mode = QuantMode.OFF
        self.all_experts_statistics = False
        self._simulated: dict[str, torch.Tensor] | None = None
        self._stored_input_scales: dict[str, torch.Tensor] | None = None

    @property
    def layout(self) -> ExpertLayout:
        return self.block.layout

    # --- weights -------------------------------------------------------------------------------------------

    def expert_weights(self, expert: int | slice) -> dict[str, torch.Tensor]:
        """``[out, in]`` weights of expert ``expert`` (``[n, out, in]`` for a slice): gate, up, down.

        Experts exported fused are quantized from fp32 (one rounding of ``w / scale``), as ModelOpt
        quantizes its fused 3-D experts; per-expert exports quantize in the model dtype like a Linear.
        """
        experts, layout = self.block.experts, self.layout
        gate_up = experts.gate_up_proj[expert].detach()
        down = experts.down_proj[expert].detach()
        if layout.naming is ExpertNaming.FUSED:
            gate_up, down = gate_up.float(), down.float()
        return {"gate": layout.gate(gate_up), "up": layout.up(gate_up), "down": layout.down(down)}

    def expert_chunks(self) -> list[range]:
        """Consecutive experts quantized together by :meth:`quantized_experts`: all of a chunk's weights
        in fp32 fit ``STACK_BYTES`` (more on a GPU); one expert per chunk for codecs without stacks."""
        n = self.block.num_experts
        size = 1
        if quantizes_stacks(self.codec):
            experts = self.block.experts
            per_expert = 4 * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel())
            budget = STACK_BYTES_CUDA if experts.down_proj.is_cuda else STACK_BYTES
            size = max(1, min(n, budget // per_expert))
        return [range(start, min(start + size, n)) for start in range(0, n, size)]

    def quantized_experts(
        self, experts: range, device: torch.device | str | None = None
    ) -> list[dict[str, dict[str, torch.Tensor]]]:
        """Exported tensors (projection -> suffix -> tensor) of each expert of ``experts`` (consecutive),
        optionally moved to ``device``. Codecs that take stacks quantize each projection of the range in
        one call (one kernel launch and one device-to-host copy per tensor kind, not one per expert)."""
        if len(experts) > 1 and not quantizes_stacks(self.codec):
            return [self.quantized_experts(range(e, e + 1), device)[0] for e in experts]
        index = slice(experts.start, experts.stop) if len(experts) > 1 else experts.start
        out: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in experts]
        input_scales = {projection: self.input_scale(projection) for projection in PROJECTIONS}
        for name, weight in self.expert_weights(index).items():
            projection = "down" if name == "down" else "gate_up"
            tensors = self.codec.quantize_weight(weight, self.weight_amax[projection][index])
            scale = input_scales[projection]
            if scale is not None:
                tensors["input_scale"] = scale[index]
            if device is not None:
                tensors = {k: v.to(device) for k, v in tensors.items()}
            for i in range(len(experts)):
                out[i][name] = {k: v[i] for k, v in tensors.items()} if len(experts) > 1 else tensors
        return out

    def use_stored(self, input_scales: dict[str, torch.Tensor] | None) -> None:
        """Simulate a loaded checkpoint: the module's parameters already are the dequantized weights and
        ``input_scales`` (projection -> fp32 [E]) are the stored ones."""
        self._simulated = {"gate_up": self.block.experts.gate_up_proj, "down": self.block.experts.down_proj}
        self._stored_input_scales = input_scales

    def input_scale(self, projection: str) -> torch.Tensor | None:
        """fp32 [E] ``input_scale`` per expert (None for weight-only / dynamic schemes)."""
        if not self.codec.static_input_scale:
            return None
        if self._stored_input_scales is not None:
            return self._stored_input_scales[projection]
        if self.export_input_amax is None:
            raise RuntimeError(f"{self.block.experts_name}: no calibrated input amax; run calibration first")
        return self.codec.input_scale(self.export_input_amax[projection])

    def simulated_parameters(self) -> dict[str, torch.Tensor]:
        """``gate_up_proj`` and ``down_proj`` as dequantize(quantize(.)) in the model's own layout."""
        if self._simulated is not None:
            return self._simulated
        dtype = self.block.experts.down_proj.dtype
        gates, ups, downs = [], [], []
        for tensors in (t for chunk in self.expert_chunks() for t in self.quantized_experts(chunk)):
            gates.append(self.codec.dequantize_weight(tensors["gate"], dtype))
            ups.append(self.codec.dequantize_weight(tensors["up"], dtype))
            downs.append(self.codec.dequantize_weight(tensors["down"], dtype))
        layout = self.layout
        simulated = {
            "gate_up": layout.fuse(torch.stack(gates), torch.stack(ups)).contiguous(),
            "down": layout.unorient_down(torch.stack(downs)).contiguous(),
        }
        self._simulated = simulated
        return simulated

    def drop_simulation_cache(self) -> None:
        self._simulated = None

    # --- activations ---------------------------------------------------------------------------------------

    def _fake_quant_rows(self, x: torch.Tensor, counts: torch.Tensor, projection: str) -> torch.Tensor:
        """Fake-quantize rows sorted by expert with each expert's input scale."""
        scales = self.input_scale(projection)
        if scales is None or bool((scales == scales[0]).all()):
            return self.codec.fake_quantize_input(x, None if scales is None else scales[0])
        pieces = torch.split(x, counts.tolist())
        return torch.cat([self.codec.fake_quantize_input(p, scales[e]) for e, p in enumerate(pieces)])

    def _observe(self, projection: str, row_amax: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """Running per-expert amax: one segmented max of the rows' amax into the statistics, in place."""
        self.input_amax[projection].scatter_reduce_(0, expert_ids, row_amax, reduce="amax", include_self=True)

    # --- forward contracts --------------------------------------------------------------------------------

    def _parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        experts = self.block.experts
        if self.mode is QuantMode.SIMULATE:
            simulated = self.simulated_parameters()
            return simulated["gate_up"], simulated["down"]
        return experts.gate_up_proj, experts.down_proj

    def top_k_forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Grouped forward of a ``TOP_K`` experts module; returns ``[T, H]``."""
        experts, layout = self.block.experts, self.layout
        num_experts, top_k = self.block.num_experts, top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1)
        sorted_ids, order = torch.sort(expert_ids, stable=True)
        token_of_row = order // top_k
        rows = hidden[token_of_row]
        counts, offsets = _expert_offsets(sorted_ids, num_experts)
        gate_up_w, down_w = self._parameters()
        gate_up_b = experts.gate_up_proj_bias[sorted_ids] if layout.has_bias else None
        down_b = experts.down_proj_bias[sorted_ids] if layout.has_bias else None
        if self.mode is QuantMode.CALIBRATE:
            self.tokens += counts
            if not self.all_experts_statistics:  # a row's amax is its token's: reduce T rows, not T*K
                self._observe("gate_up", _row_amax(hidden)[token_of_row], sorted_ids)
        elif self.mode is QuantMode.SIMULATE:
            rows = self._fake_quant_rows(rows, counts, "gate_up")
        h = experts._apply_gate(_grouped_linear(rows, gate_up_w, offsets, gate_up_b, layout.transposed))
        if self.mode is QuantMode.CALIBRATE and not self.all_experts_statistics:
            self._observe("down", _row_amax(h), sorted_ids)
        elif self.mode is QuantMode.SIMULATE:
            h = self._fake_quant_rows(h, counts, "down")
        out = _grouped_linear(h, down_w, offsets, down_b, layout.transposed)
        weighted = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)  # promotes like transformers' kernel
        unsorted = torch.empty_like(weighted)
        unsorted[order] = weighted
        if self.mode is QuantMode.CALIBRATE and self.all_experts_statistics:
            self._observe_all_experts(hidden)
        return unsorted.view(hidden.shape[0], top_k, -1).sum(dim=1).to(hidden.dtype)

    def _observe_all_experts(self, hidden: torch.Tensor, chunk_tokens: int = 1024) -> None:
        """Statistics of every token through every expert (the output keeps the real routing).

        Costs one extra dense pass of all experts over the batch, in chunks of ``chunk_tokens``
        tokens so that memory stays at ``chunk_tokens x E x 2I`` activations.
        """
        experts, layout = self.block.experts, self.layout
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

    def dense_routed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Batched forward of a ``DENSE_ROUTED`` experts module (Llama 4); returns ``[E*T, H]``."""
        experts = self.block.experts
        num_experts = self.block.num_experts
        x = hidden.view(num_experts, -1, hidden.shape[-1])
        gate_up_w, down_w = self._parameters()
        if self.mode is QuantMode.CALIBRATE:
            routed = (x != 0).any(dim=-1)
            self.tokens += routed.sum(dim=1)
            self.input_amax["gate_up"] = torch.maximum(
                self.input_amax["gate_up"], x.detach().abs().amax(dim=(1, 2)).float()
            )
        elif self.mode is QuantMode.SIMULATE:
            x = self._fake_quant_experts(x, "gate_up")
        gate_up = torch.bmm(x, gate_up_w)
        gate, up = gate_up.chunk(2, dim=-1)
        h = up * experts.act_fn(gate)
        if self.mode is QuantMode.CALIBRATE:
            self.input_amax["down"] = torch.maximum(self.input_amax["down"], h.detach().abs().amax(dim=(1, 2)).float())
        elif self.mode is QuantMode.SIMULATE:
            h = self._fake_quant_experts(h, "down")
        return torch.bmm(h, down_w).view(-1, hidden.shape[-1])

    def _fake_quant_experts(self, x: torch.Tensor, projection: str) -> torch.Tensor:
        scales = self.input_scale(projection)
        if scales is None or bool((scales == scales[0]).all()):
            return self.codec.fake_quantize_input(x, None if scales is None else scales[0])
        return torch.stack([self.codec.fake_quantize_input(x[e], scales[e]) for e in range(x.shape[0])])

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.mode is QuantMode.OFF:
            return self.original_forward(*args, **kwargs)
        if self.layout.contract is ForwardContract.DENSE_ROUTED:
            return self.dense_routed_forward(*args, **kwargs)
        return self.top_k_forward(*args, **kwargs)


def install_experts_quantizer(
    block: MoEBlock, codec: SchemeCodec, weight_amax: dict[str, torch.Tensor] | None = None
) -> ExpertsQuantizer:
    """Attach an :class:`ExpertsQuantizer` to ``block.experts`` and route its forward through it.

    ``weight_amax``: :func:`expert_weight_amax` of the block when the caller already computed it.
    """
    experts = block.experts
    existing = experts.__dict__.get(_ATTR)
    if existing is not None:
        return existing
    quantizer = ExpertsQuantizer(block, codec, experts.forward, weight_amax)
    experts.__dict__[_ATTR] = quantizer
    experts.forward = quantizer.forward
    return quantizer


def experts_quantizer_of(module: nn.Module) -> ExpertsQuantizer | None:
    """The experts module's quantizer, if one is installed."""
    return module.__dict__.get(_ATTR)

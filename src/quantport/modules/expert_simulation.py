"""The experts simulator: a fused experts module's forward as the engine computes it.

:class:`ExpertsSimulator` is built from weights and input scales alone: the (dequantized) expert
weights in the model's own layout and the per-expert input scales. It does not know where they came
from, so the two users share it:

* ``quantport.simulate(model)`` after :func:`quantport.quantize`: weights are dequantize(quantize(.))
  of the model's experts and the scales come from calibration;
* ``quantport.load(..., simulate_activations=True)``: the module's parameters already are the
  dequantized checkpoint weights and the scales are the stored ones
  (:meth:`ExpertsSimulator.from_parameters`).

This module imports neither ``quantport.calibrate`` nor ``quantport.export`` (a test guards it). It
also holds the routed forward that the experts calibrator (:mod:`quantport.modules.expert_calibration`)
runs in full precision: :func:`top_k_experts_forward` and :func:`dense_routed_experts_forward` take a
callback that sees (and may replace) each projection's input.

* ``TOP_K`` layouts (transformers-5 ``@use_experts_implementation``): rows ``(token, k)`` are sorted by
  expert and each projection runs as one grouped GEMM (:func:`grouped_linear`).
* ``DENSE_ROUTED`` layouts (Llama 4): every expert gets every token pre-scaled by its router score,
  computed with ``bmm``.

Gating and activation are the module's own (``_apply_gate`` / ``act_fn``), so GPT-OSS's clamped,
interleaved SwiGLU needs no special case here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.experts import ExpertLayout, ForwardContract
from ..errors import InvalidArgumentError
from .attach import attach_forward, attached_forward

if TYPE_CHECKING:
    from ..arch.experts import MoEBlock
    from ..schemes import SchemeCodec

__all__ = [
    "PROJECTIONS",
    "ExpertsSimulator",
    "ProjectionInput",
    "TopKRouting",
    "attach_experts_simulator",
    "dense_routed_experts_forward",
    "grouped_linear",
    "route_top_k",
    "top_k_arguments",
    "top_k_experts_forward",
]

PROJECTIONS = ("gate_up", "down")
"""The two projections of a gated experts module; keys of every per-projection dict."""

ProjectionInput = Callable[[str, torch.Tensor], torch.Tensor]
"""``(projection, x) -> x``: sees a projection's input before its GEMM (observe it, or fake-quantize it)."""


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned start and strides, which ``grouped_mm`` requires."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(stride * size % 16 == 0 for stride in t.stride() if stride != 1)


def _grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or not (_aligned(x) and _aligned(w) and w.shape[-1] * w.element_size() % 16 == 0):
        return False
    if w.device.type == "cuda":
        return torch.cuda.get_device_capability(w.device) >= (8, 0)
    return w.device.type == "cpu"


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    transposed: bool,
) -> torch.Tensor:
    """Rows sorted by expert times each row's expert weight.

    Args:
        x: ``[S, in]`` rows, sorted by expert.
        weight: ``[E, in, out]`` when ``transposed``, else ``[E, out, in]``.
        offsets: int32 ``[E]`` end offset of each expert's rows in ``x``.
        bias: ``[S, out]`` bias of each row (already gathered), or None.
        transposed: the weight layout, as above.

    Returns:
        ``[S, out]`` in ``weight``'s dtype. Uses ``torch.nn.functional.grouped_mm`` (one kernel) where
        torch has it (GPUs of compute capability 8.0 and later, and the CPU) and the tensors are 16-byte
        aligned, else one ``mm`` per expert.
    """
    w = weight if transposed else weight.transpose(-2, -1)  # [E, in, out]
    x = x.to(w.dtype)
    if _grouped_mm_available(x, w):
        out = F.grouped_mm(x, w, offs=offsets)
    else:
        out = x.new_zeros(x.shape[0], w.shape[-1])
        start = 0
        for expert, end in enumerate(offsets.tolist()):  # one host read of the offsets
            if end > start:
                torch.mm(x[start:end], w[expert], out=out[start:end])
            start = end
    if bias is not None:
        out.add_(bias)
    return out


@dataclass(frozen=True, slots=True)
class TopKRouting:
    """Rows ``(token, k)`` of a top-k routed batch, sorted by expert.

    Attributes:
        hidden: ``[T, H]`` the tokens.
        sorted_ids: int64 ``[T*K]`` expert of each sorted row, ascending.
        order: int64 ``[T*K]`` position of each sorted row in the flattened ``top_k_index``.
        token_of_row: int64 ``[T*K]`` token of each sorted row.
        counts: int32 ``[E]`` rows per expert.
        offsets: int32 ``[E]`` end offset of each expert's rows.
    """

    hidden: torch.Tensor
    sorted_ids: torch.Tensor
    order: torch.Tensor
    token_of_row: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def route_top_k(hidden: torch.Tensor, top_k_index: torch.Tensor, num_experts: int) -> TopKRouting:
    """Sort the rows of ``hidden [T, H]`` routed by ``top_k_index [T, K]``, without a host sync
    (``bincount`` on CUDA would read the largest id back to the host)."""
    sorted_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
    bounds = torch.arange(1, num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    ends = torch.searchsorted(sorted_ids, bounds, out_int32=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    return TopKRouting(hidden, sorted_ids, order, order // top_k_index.shape[-1], counts, ends)


def top_k_experts_forward(
    experts: nn.Module,
    layout: ExpertLayout,
    routing: TopKRouting,
    top_k_weights: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    on_input: ProjectionInput | None = None,
) -> torch.Tensor:
    """Forward of a ``TOP_K`` experts module over ``routing``'s rows; returns ``[T, H]``.

    ``weights``: ``gate_up`` and ``down`` in the model's own layout; ``on_input`` sees each
    projection's sorted rows (``[T*K, H]`` and ``[T*K, I]``) and returns what the GEMM reads.
    """
    transposed, has_bias = layout.transposed, layout.has_bias
    rows = routing.hidden[routing.token_of_row]
    if on_input is not None:
        rows = on_input("gate_up", rows)
    gate_up_b = experts.gate_up_proj_bias[routing.sorted_ids] if has_bias else None
    h = experts._apply_gate(grouped_linear(rows, weights["gate_up"], routing.offsets, gate_up_b, transposed))
    if on_input is not None:
        h = on_input("down", h)
    down_b = experts.down_proj_bias[routing.sorted_ids] if has_bias else None
    out = grouped_linear(h, weights["down"], routing.offsets, down_b, transposed)
    weighted = out * top_k_weights.reshape(-1)[routing.order].unsqueeze(-1)  # promotes like transformers' kernel
    unsorted = torch.empty_like(weighted)
    unsorted[routing.order] = weighted
    tokens = routing.hidden.shape[0]
    return unsorted.view(tokens, top_k_weights.shape[-1], -1).sum(dim=1).to(routing.hidden.dtype)


def dense_routed_experts_forward(
    experts: nn.Module,
    hidden: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    on_input: ProjectionInput | None = None,
) -> torch.Tensor:
    """Forward of a ``DENSE_ROUTED`` experts module (Llama 4): ``hidden [E*T, H] -> [E*T, H]``.

    ``on_input`` sees each projection's input per expert (``[E, T, H]`` and ``[E, T, I]``).
    """
    num_experts = weights["down"].shape[0]
    x = hidden.view(num_experts, -1, hidden.shape[-1])
    if on_input is not None:
        x = on_input("gate_up", x)
    gate, up = torch.bmm(x, weights["gate_up"]).chunk(2, dim=-1)
    h = up * experts.act_fn(gate)
    if on_input is not None:
        h = on_input("down", h)
    return torch.bmm(h, weights["down"]).view(-1, hidden.shape[-1])


class ExpertsSimulator:
    """Fake-quantized forward of one experts module: what the engine computes.

    Attributes:
        block: the experts module, its name and its layout (the module's biases, gate and activation
            are used; its weight parameters are not, unless they are the ``weights``).
        codec: the scheme codec whose ``fake_quantize_input`` quantizes the activations.
        weights: ``gate_up`` and ``down``: the dequantized weights in the model's own layout.
        input_scales: projection -> fp32 ``[E]`` input scale of each expert; None for weight-only or
            dynamic schemes.
    """

    def __init__(
        self,
        block: MoEBlock,
        codec: SchemeCodec,
        weights: Mapping[str, torch.Tensor],
        input_scales: Mapping[str, torch.Tensor] | None,
    ) -> None:
        if codec.static_input_scale and input_scales is None:
            raise InvalidArgumentError(
                f"{block.experts_name}: simulating {codec.scheme.value} experts needs their input scales"
            )
        self.block = block
        self.codec = codec
        self.weights = dict(weights)
        self.input_scales = None if input_scales is None else dict(input_scales)

    @classmethod
    def from_parameters(
        cls, block: MoEBlock, codec: SchemeCodec, input_scales: Mapping[str, torch.Tensor] | None
    ) -> ExpertsSimulator:
        """A simulator of a loaded checkpoint: the module's parameters already are the dequantized weights."""
        weights = {"gate_up": block.experts.gate_up_proj, "down": block.experts.down_proj}
        return cls(block, codec, weights, input_scales)

    def _scales(self, projection: str) -> torch.Tensor | None:
        if not self.codec.static_input_scale or self.input_scales is None:
            return None
        return self.input_scales[projection]

    def _fake_quant_sorted_rows(self, counts: torch.Tensor) -> ProjectionInput:
        def fake_quant(projection: str, x: torch.Tensor) -> torch.Tensor:
            scales = self._scales(projection)
            if scales is None or bool((scales == scales[0]).all()):
                return self.codec.fake_quantize_input(x, None if scales is None else scales[0])
            pieces = torch.split(x, counts.tolist())
            return torch.cat([self.codec.fake_quantize_input(p, scales[e]) for e, p in enumerate(pieces)])

        return fake_quant

    def _fake_quant_per_expert(self, projection: str, x: torch.Tensor) -> torch.Tensor:
        scales = self._scales(projection)
        if scales is None or bool((scales == scales[0]).all()):
            return self.codec.fake_quantize_input(x, None if scales is None else scales[0])
        return torch.stack([self.codec.fake_quantize_input(x[e], scales[e]) for e in range(x.shape[0])])

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The experts module's forward, with the module's own call signature (see :class:`ForwardContract`)."""
        experts, layout = self.block.experts, self.block.layout
        if layout.contract is ForwardContract.DENSE_ROUTED:
            return dense_routed_experts_forward(experts, hidden, self.weights, self._fake_quant_per_expert)
        top_k_index, top_k_weights = top_k_arguments(args, kwargs)
        routing = route_top_k(hidden, top_k_index, self.weights["down"].shape[0])
        on_input = self._fake_quant_sorted_rows(routing.counts)
        return top_k_experts_forward(experts, layout, routing, top_k_weights, self.weights, on_input)

    __call__ = forward


def top_k_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_index, top_k_weights)`` of a transformers-5 experts call, positional or by keyword."""
    names = ("top_k_index", "top_k_weights")
    values = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
    return values["top_k_index"], values["top_k_weights"]


def attach_experts_simulator(
    block: MoEBlock, codec: SchemeCodec, input_scales: Mapping[str, torch.Tensor] | None
) -> ExpertsSimulator:
    """Make a loaded checkpoint's experts module compute as the engine does.

    The module's parameters must already be the dequantized weights; ``input_scales`` are the stored
    ones (projection -> fp32 ``[E]``; None for weight-only or dynamic schemes). Returns the simulator.
    """
    existing = attached_forward(block.experts)
    if isinstance(existing, ExpertsSimulator):
        return existing
    simulator = ExpertsSimulator.from_parameters(block, codec, input_scales)
    attach_forward(block.experts, simulator)
    return simulator

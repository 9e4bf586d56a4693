"""GPTQ on fused MoE experts: each expert against its own Hessians, the result written into the module.

Gate and up read the same input, so they are quantized as one ``[2I, H]`` weight against the ``gate_up``
Hessian (their scale units are rows or groups of a row, and they share one per-tensor amax, so stacking
changes no scale); ``down`` has its own Hessian. The weight GPTQ returns (the one the codec quantizes to
GPTQ's codes and scales, see :mod:`.gptq`) replaces the expert's slices of ``gate_up_proj`` and
``down_proj``; the quantizer's weight amax is kept, so the simulation and the exporters, which both
quantize the module's parameters (:mod:`quantport.modules.expert_weights`), decode to GPTQ's ``Q``
(checked per expert).

Experts with fewer routed tokens than the threshold follow :class:`~quantport.algorithm_options.ExpertGptqPolicy`
and are always named: in ``left_at_rtn`` when they keep round-to-nearest, in ``notes`` otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ...algorithm_options import ExpertGptqPolicy, GptqOptions
from ...arch.experts import ExpertScales
from ...modules.expert_weights import oriented_expert_weights, quantize_expert_range
from ...modules.quant_experts import ExpertsQuantizer
from .expert_hessians import ExpertHessians
from .gptq import NotPositiveDefiniteError, gptq_weight

__all__ = ["ExpertGptqRecord", "expert_min_tokens", "gptq_experts", "unsupported_layout_reason"]

logger = logging.getLogger(__name__)

_MAX_DAMP = 0.5


@dataclass
class ExpertGptqRecord:
    """What GPTQ did with the experts: how many it updated, and the ones it treated otherwise (name -> why)."""

    updated: int = 0
    left_at_rtn: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def unsupported_layout_reason(quantizer: ExpertsQuantizer) -> str | None:
    """Why GPTQ cannot update this module's experts (None when it can)."""
    layout = quantizer.block.layout
    if layout.scales is ExpertScales.ONE_PER_PROJECTION:
        return (
            f"gptq is not implemented for {layout.family} experts (one scale per projection, quantized from fp32); "
            "they keep round-to-nearest"
        )
    return None


def expert_min_tokens(quantizer: ExpertsQuantizer, options: GptqOptions) -> int:
    """Routed tokens an expert needs for its own Hessian: the option, or the expert's hidden size."""
    if options.expert_min_tokens:
        return options.expert_min_tokens
    return int(quantizer.block.layout.down(quantizer.block.experts.down_proj[0]).shape[0])


def _hessians_for(
    tokens: int, threshold: int, hessians: ExpertHessians, expert: int, options: GptqOptions
) -> tuple[dict | None, float, str | None, str | None]:
    """(Hessian pair, damp, note, reason to keep round-to-nearest) of one expert, by the policy."""
    routed = hessians.routed[expert]
    if tokens >= threshold:
        return routed, options.damp, None, None
    few = f"{tokens} routed calibration tokens (< {threshold})"
    policy = options.expert_policy
    if policy is ExpertGptqPolicy.RTN:
        return None, options.damp, None, f"{few}; --gptq-expert-policy rtn"
    if policy is ExpertGptqPolicy.ALL_EXPERTS:
        fallback = hessians.all_tokens.get(expert)
        if fallback is not None and fallback["gate_up"].tokens:
            note = f"{few}: GPTQ with the Hessian of all {fallback['gate_up'].tokens} calibration tokens"
            return fallback, options.damp, note, None
        return None, options.damp, None, f"{few} and no all-token Hessian"
    if tokens == 0:
        return None, options.damp, None, "no calibration token routed to it (no Hessian)"
    damp = min(_MAX_DAMP, options.damp * threshold / tokens)
    return routed, damp, f"{few}: GPTQ with dampening raised to {damp:.3g}", None


def _writable(experts: nn.Module, parameter: str) -> torch.Tensor:
    """The module's parameter as a tensor quantport owns (a copy, once: checkpoint weights may be read-only maps)."""
    owned = experts.__dict__.setdefault("_quantport_gptq_owned", set())
    if parameter not in owned:
        old = getattr(experts, parameter)
        setattr(experts, parameter, nn.Parameter(old.detach().clone(), requires_grad=False))
        owned.add(parameter)
    return getattr(experts, parameter).data


def _write(quantizer: ExpertsQuantizer, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Write the ``[2I, H]`` gate/up rows (gate first) and ``[H, I]`` down of ``expert`` in the model's layout."""
    layout, experts = quantizer.block.layout, quantizer.block.experts
    half = gate_up.shape[0] // 2
    _writable(experts, "gate_up_proj")[expert] = layout.fuse(gate_up[:half], gate_up[half:])
    _writable(experts, "down_proj")[expert] = layout.unorient_down(down)


def _check_decodes(quantizer: ExpertsQuantizer, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """The module's expert, quantized as the export does, decodes to GPTQ's ``Q``."""
    codec, dtype = quantizer.codec, quantizer.block.experts.down_proj.dtype
    tensors = quantize_expert_range(quantizer.block, codec, quantizer.weight_amax, range(expert, expert + 1))[0]
    half = gate_up.shape[0] // 2
    expected = {"gate": gate_up[:half], "up": gate_up[half:], "down": down}
    for projection, q in expected.items():
        if not torch.equal(codec.dequantize_weight(tensors[projection], dtype), q):
            raise RuntimeError(
                f"gptq: expert {expert} {projection} of {quantizer.block.experts_name} does not decode to GPTQ's "
                "choice (a bug)"
            )


def gptq_experts(
    quantizer: ExpertsQuantizer, hessians: ExpertHessians, options: GptqOptions, record: ExpertGptqRecord
) -> None:
    """GPTQ every expert of ``hessians``' chunk of ``quantizer``'s module, by the policy; fills ``record``."""
    threshold = expert_min_tokens(quantizer, options)
    amax = quantizer.weight_amax
    for expert in sorted(hessians.routed):
        name = f"{quantizer.block.experts_name}.{expert}"
        tokens = hessians.routed[expert]["gate_up"].tokens
        chosen, damp, note, rtn_reason = _hessians_for(tokens, threshold, hessians, expert, options)
        if chosen is None:
            record.left_at_rtn[name] = rtn_reason or ""
            logger.warning("gptq: %s keeps round-to-nearest: %s", name, rtn_reason)
            continue
        expert_options = dataclasses.replace(options, damp=damp)
        weights = oriented_expert_weights(quantizer.block, expert)
        try:
            gate_up = gptq_weight(
                quantizer.codec,
                torch.cat([weights["gate"], weights["up"]]),
                amax["gate_up"][expert],
                chosen["gate_up"].hessian(),
                expert_options,
            )
            down = gptq_weight(
                quantizer.codec, weights["down"], amax["down"][expert], chosen["down"].hessian(), expert_options
            )
        except NotPositiveDefiniteError as exc:
            record.left_at_rtn[name] = f"Hessian not positive definite ({exc})"
            logger.warning("gptq: %s keeps round-to-nearest: %s", name, exc)
            continue
        _write(quantizer, expert, gate_up.weight, down.weight)
        _check_decodes(quantizer, expert, gate_up.dequantized, down.dequantized)
        record.updated += 1
        if note is not None or max(gate_up.damp, down.damp) > damp:
            note = note or f"{tokens} routed calibration tokens"
            if max(gate_up.damp, down.damp) > damp:
                note += f" (dampening raised to {max(gate_up.damp, down.damp):.3g} for a positive definite Hessian)"
            record.notes[name] = note
            logger.warning("gptq: %s: %s", name, note)
    quantizer.weights_changed()

"""Llama 4 and GPT-OSS layout rules (engine-contract.md §3.3, §3.4, §8.6, §8.7).

Which GPT-OSS forms load at all is data (:mod:`quantport.arch.engines`), checked by ``rules/engines.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

from quantport.formats.mx import MX_BLOCK

from ..findings import Engine, Finding, Rule, Severity
from ..qconfig import Format
from ..specs import Spec
from ..structure import Context, StoredExperts, is_quantized
from .tensors import ct_group_for

__all__ = ["check"]

LLAMA4_ARCH = Rule(
    "llama4.fused-architecture",
    "ModelOpt fused Llama 4 expert names without Llama4ForConditionalGeneration",
    'declare architectures ["Llama4ForConditionalGeneration"] '
    "(only it renames ModelOpt's fused scales), or export the experts per expert",
)
LLAMA4_QK = Rule(
    "llama4.qk-block-scale",
    "Llama 4 q_proj / k_proj carry per-block scales",
    "quantize q_proj / k_proj per tensor, per channel or per group (or exclude them): vLLM permutes "
    "q/k for rotary and cannot permute 128x128 block scales",
)
GPTOSS_MXFP4 = Rule(
    "gptoss.mxfp4-layout",
    "native mxfp4 GPT-OSS expert tensors are missing or misshaped",
    "write *_blocks uint8 [E, out, in/32, 16], *_scales uint8 [E, out, in/32] and *_bias "
    "[E, out] for gate_up_proj (out = 2I, interleaved) and down_proj (out = H)",
)

_LLAMA4_TYPES = ("llama4", "llama4_text")
_CONDITIONAL = "Llama4ForConditionalGeneration"


def _is_llama4(ctx: Context) -> bool:
    return ctx.facts.model_type in _LLAMA4_TYPES or any(a.startswith("Llama4") for a in ctx.facts.architectures)


def _llama4(ctx: Context) -> Iterator[Finding]:
    fused_quantized = [b for b in ctx.moe_blocks.values() if b.fused and is_quantized(ctx.modules[b.prefix])]
    arch = ctx.facts.architectures[0] if ctx.facts.architectures else None
    if ctx.qcfg.format is Format.MODELOPT and fused_quantized and arch != _CONDITIONAL:
        severity = Severity.WARNING if ctx.engine is Engine.SGLANG else None
        yield LLAMA4_ARCH.finding(
            fused_quantized[0].prefix,
            f"{len(fused_quantized)} MoE layers use ModelOpt fused "
            f"names (experts.gate_up_proj_*) but architectures is {arch!r}; vLLM's "
            "Llama4ForCausalLM fails with KeyError ...w13_weight_input_scale",
            severity=severity,
        )
    for module, params in sorted(ctx.weight_modules.items()):
        if module.rsplit(".", 1)[-1] not in ("q_proj", "k_proj") or not is_quantized(params):
            continue
        scale = params.get("weight_scale")
        if ctx.qcfg.format is Format.MODELOPT:
            algo = ctx.modelopt_algo(module)
            blocked = algo in ("FP8_PB_WO", "FP8_BLOCK_SCALES") or (scale is not None and scale.ndim == 4)
        else:
            group = ct_group_for(ctx, module)
            blocked = bool(group and group.weights and group.weights.get("strategy") == "block")
        if blocked:
            yield LLAMA4_QK.finding(module, f"{module} has per-block weight scales")


def _mxfp4_block(ctx: Context, block: StoredExperts) -> Iterator[Finding]:
    params = ctx.modules.get(block.prefix, {})
    count = ctx.facts.num_experts
    hidden = ctx.facts.hidden_size
    gate_up = params.get("gate_up_proj_blocks")
    if gate_up is None or gate_up.ndim != 4 or count is None or hidden is None:
        yield GPTOSS_MXFP4.finding(
            f"{block.prefix}.gate_up_proj_blocks",
            "missing or not 4-D (or config lacks num_local_experts / hidden_size)",
        )
        return
    two_i = gate_up.shape[1]
    inter = two_i // 2
    nb_h, nb_i = hidden // MX_BLOCK, inter // MX_BLOCK
    expected = {
        "gate_up_proj_blocks": Spec(("U8",), ((count, two_i, nb_h, 16),)),
        "gate_up_proj_scales": Spec(("U8", "F8_E8M0"), ((count, two_i, nb_h),)),
        "gate_up_proj_bias": Spec(("BF16", "F16", "F32"), ((count, two_i),)),
        "down_proj_blocks": Spec(("U8",), ((count, hidden, nb_i, 16),)),
        "down_proj_scales": Spec(("U8", "F8_E8M0"), ((count, hidden, nb_i),)),
        "down_proj_bias": Spec(("BF16", "F16", "F32"), ((count, hidden),)),
    }
    for param, spec in expected.items():
        info = params.get(param)
        name = f"{block.prefix}.{param}"
        if info is None:
            yield GPTOSS_MXFP4.finding(name, f"{param} is missing")
        elif info.dtype not in spec.dtypes or not spec.shape_ok(info.shape):
            yield GPTOSS_MXFP4.finding(name, f"{info.dtype} {list(info.shape)}, expected {spec.describe()}")


def _gpt_oss(ctx: Context) -> Iterator[Finding]:
    """Native mxfp4 layout. ModelOpt and compressed-tensors GPT-OSS experts are judged by the known-failure
    table (rules/engines.py, ``engine.known-failure``)."""
    if ctx.qcfg.format is Format.MXFP4:
        for block in ctx.moe_blocks.values():
            yield from _mxfp4_block(ctx, block)


def check(ctx: Context) -> Iterator[Finding]:
    if _is_llama4(ctx):
        yield from _llama4(ctx)
    if ctx.facts.model_type == "gpt_oss" or ctx.facts.text_model_type == "gpt_oss":
        yield from _gpt_oss(ctx)

"""Every expert of every MoE layer is present and complete (engine-contract.md §3, §8.5, §8.8).

vLLM fills a missing expert tensor with its init value (1.0, ``finfo.min`` or uninitialised memory)
without an error, so a checkpoint missing one expert's ``input_scale`` loads and computes garbage.
The expert count comes from config.json (``num_experts`` / ``num_local_experts`` /
``n_routed_experts``); the expert leaf names from the family's :class:`ExpertLayout`.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

from ..findings import Finding, Severity
from ..qconfig import Format
from ..structure import QPARAMS, Context, StoredExperts, is_quantized
from .fused_experts import fused_findings
from .moe_rules import (
    COUNT_UNKNOWN,
    EXPERT_INCOMPLETE,
    EXPERT_MISSING,
    EXPERT_UNEXPECTED,
    FUSED_NAMING,
    FUSED_SHAPE,
    OUTLIER,
    SCHEME,
)
from .tensors import ct_group_for, spec_for

__all__ = ["EXPERT_INCOMPLETE", "FUSED_SHAPE", "check"]

_OUTLIER_FACTOR = 10.0
_CT_STATIC = {("tensor", "tensor"), ("tensor", None), ("channel", "token"), ("block", "group"), ("block", "token")}


def _weight(params: dict) -> bool:
    return "weight" in params or "weight_packed" in params


def _per_expert_findings(ctx: Context, block: StoredExperts, count: int) -> Iterator[Finding]:
    for e in range(count):
        leaves = block.experts.get(e, {})
        missing = [leaf for leaf in block.leaves if not _weight(ctx.modules.get(leaves.get(leaf, ""), {}))]
        if missing:
            what = "no tensors" if len(missing) == len(block.leaves) else f"no {', '.join(missing)}"
            yield EXPERT_MISSING.finding(
                f"{block.prefix}.{e}", f"expert {e} of {block.prefix} has {what} ({count} experts expected)"
            )
    for e in sorted(i for i in block.experts if i >= count):
        yield EXPERT_UNEXPECTED.finding(f"{block.prefix}.{e}", f"expert {e} but the config has {count} experts")
    for leaf in block.leaves:
        modules = [m for m in (block.experts[e].get(leaf) for e in sorted(block.experts)) if m]
        params = {m: ctx.modules[m] for m in modules}
        if not any(is_quantized(p) for p in params.values()):
            continue
        expected = set().union(*((QPARAMS & p.keys()) | ({"weight"} & p.keys()) for p in params.values()))
        for module, p in params.items():
            spec = spec_for(ctx, module, p)
            if spec is not None:
                expected |= {k for k, s in spec.params.items() if s.required}
            for param in sorted(expected - p.keys()):
                yield EXPERT_INCOMPLETE.finding(f"{module}.{param}", f"{module} has no {param}")
        yield from _outliers(ctx, modules)


def _outliers(ctx: Context, modules: list[str]) -> Iterator[Finding]:
    inverse = ctx.qcfg.format is Format.COMPRESSED_TENSORS and any(
        "input_global_scale" in ctx.modules[m] for m in modules
    )
    param = "input_global_scale" if inverse else "input_scale"
    values = {m: ctx.load_scalar(f"{m}.{param}") for m in modules if param in ctx.modules[m]}
    finite = {m: v for m, v in values.items() if v is not None and v > 0 and v != float("inf")}
    if len(finite) < 3:
        return
    median = statistics.median(finite.values())
    for module, value in finite.items():
        ratio = (median / value) if inverse else (value / median)
        if ratio > _OUTLIER_FACTOR:
            yield OUTLIER.finding(
                f"{module}.{param}",
                f"{param} {value:.6g} is {ratio:.1f}x the layer median "
                f"{median:.6g}" + (" (global scales are divisors)" if inverse else ""),
            )


def _scheme_findings(ctx: Context, block: StoredExperts) -> Iterator[Finding]:
    modules = block.modules() if not block.fused else [block.prefix]
    if not modules or not is_quantized(ctx.modules.get(modules[0], {})):
        return
    q = ctx.qcfg
    if q.format is Format.MODELOPT and q.quant_algo in ("FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO"):
        yield SCHEME.finding(
            block.prefix,
            f"vLLM runs ModelOpt {q.quant_algo} experts with its per-tensor FP8 "
            "MoE method, which cannot load per-channel / per-block expert scales",
        )
    elif q.format is Format.COMPRESSED_TENSORS:
        group = ct_group_for(ctx, modules[0])
        if group is None or group.weights is None:
            return
        w, a = group.weights, group.input_activations
        if w.get("num_bits") == 8 and a is not None:
            pair = (w.get("strategy"), a.get("strategy"))
            static_channel = pair == ("channel", "token") and a.get("dynamic") is not True
            if pair not in _CT_STATIC or static_channel or (w.get("type") == "int" and pair != ("channel", "token")):
                yield SCHEME.finding(
                    block.prefix,
                    f"{w.get('type')}8 experts with weight strategy {pair[0]} and "
                    f"activation strategy {pair[1]} (dynamic={a.get('dynamic')}) have no vLLM "
                    "MoE kernel",
                )


def _fused_findings(ctx: Context, block: StoredExperts, count: int | None) -> Iterator[Finding]:
    layout = ctx.layout
    params = ctx.modules.get(block.prefix, {})
    if layout is None or not layout.transposed:
        if layout is not None or is_quantized(params):
            family = layout.family if layout else "unknown"
            yield FUSED_NAMING.finding(
                block.prefix,
                f"{block.prefix} stores experts as fused 3-D tensors; "
                f"family {family} is loaded per expert (experts.{{e}}.*)",
                severity=Severity.WARNING if layout is None else None,
            )
        return
    if ctx.qcfg.format is Format.MXFP4:
        return  # the native GPT-OSS layout is checked by the family rules
    yield from fused_findings(ctx, block.prefix, params, layout, count)


def _router_findings(ctx: Context, count: int) -> Iterator[Finding]:
    layout = ctx.layout
    if layout is None:
        return
    for module, params in ctx.modules.items():
        parent, _, leaf = module.rpartition(".")
        weight = params.get("weight")
        router = leaf == layout.router and weight is not None and weight.ndim == 2 and weight.shape[0] == count
        if router and f"{parent}.experts" not in ctx.moe_blocks:
            yield EXPERT_MISSING.finding(
                f"{parent}.experts", f"{parent} has a router for {count} experts but no expert tensors at all"
            )


def check(ctx: Context) -> Iterator[Finding]:
    if not ctx.moe_blocks and ctx.facts.num_experts is None:
        return
    count = ctx.facts.num_experts
    if count is None:
        yield COUNT_UNKNOWN.finding(
            "config.json",
            "MoE experts are stored but no expert count is configured; expert coverage cannot be verified",
        )
    else:
        yield from _router_findings(ctx, count)
    for _, block in sorted(ctx.moe_blocks.items()):
        if block.fused:
            yield from _fused_findings(ctx, block, count)
        else:
            n = count if count is not None else max(block.experts) + 1
            yield from _per_expert_findings(ctx, block, n)
            if block.also_fused:
                yield FUSED_NAMING.finding(
                    block.prefix,
                    f"{block.prefix} holds both per-expert modules and fused "
                    "3-D expert tensors; the engine loads one layout",
                )
        yield from _scheme_findings(ctx, block)

"""Members of a fused group share what the engine fuses (engine-contract.md §2, §3.1, §8.4).

q/k/v, gate/up and each expert's gate/up run as one GEMM with one activation scale and, for NVFP4,
one global weight scale. vLLM takes the max of differing ``input_scale``s (with a warning) and, for
NVFP4 MoE, uses the *gate's* ``weight_scale_2`` for the whole w13 without rescaling the up half
(issue #54974), so any difference silently changes the numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..findings import Finding, Rule
from ..qconfig import Format
from ..structure import Context, FusedGroup, is_quantized

__all__ = ["check"]

INPUT_SCALE = Rule(
    "group.input-scale-mismatch",
    "members of a fused group have different activation scales",
    "give every member the max input scale of the group (unify before export)",
)
GLOBAL_SCALE = Rule(
    "group.global-scale-mismatch",
    "members of a fused group have different NVFP4 global weight scales",
    "unify weight_scale_2 (CT: weight_global_scale) over the group before computing the per-block scales",
)

_CT_EXPERT_TOLERANCE = 1e-5
"""compressed-tensors' own check for an expert's gate/up input_scale (vLLM routed_experts.py)."""


def _scalar_params(ctx: Context) -> list[tuple[str, Rule, float]]:
    """(parameter, rule, absolute tolerance) compared over every fused group."""
    if ctx.qcfg.format is Format.COMPRESSED_TENSORS:
        return [
            ("input_scale", INPUT_SCALE, 0.0),
            ("input_global_scale", INPUT_SCALE, 0.0),
            ("weight_global_scale", GLOBAL_SCALE, 0.0),
        ]
    return [("input_scale", INPUT_SCALE, 0.0), ("weight_scale_2", GLOBAL_SCALE, 0.0)]


def _group_findings(ctx: Context, group: FusedGroup) -> Iterator[Finding]:
    params = [ctx.modules.get(m, {}) for m in group.members]
    if not all(is_quantized(p) for p in params):
        return  # mixed groups are reported by the exclusion rules
    expert = group.members[0] in ctx.expert_of
    for param, rule, tolerance in _scalar_params(ctx):
        if not all(param in p for p in params):
            continue  # missing tensors are reported by the tensor and MoE rules
        values = [ctx.load_scalar(f"{m}.{param}") for m in group.members]
        if any(v is None for v in values):
            continue  # non-scalar: reported by the shape rule
        if expert and ctx.qcfg.format is Format.COMPRESSED_TENSORS and param == "input_scale":
            tolerance = _CT_EXPERT_TOLERANCE
        lo, hi = min(values), max(values)  # type: ignore[type-var]
        if hi - lo > tolerance:
            shown = ", ".join(f"{m.rsplit('.', 1)[-1]}={v:.6g}" for m, v in zip(group.members, values, strict=True))
            ratio = hi / lo if lo else float("inf")
            yield rule.finding(
                group.members[0].rsplit(".", 1)[0],
                f"{param} differs within {group.engine_name} ({shown}; max/min {ratio:.4g})",
            )


def check(ctx: Context) -> Iterator[Finding]:
    if ctx.qcfg.format not in (Format.MODELOPT, Format.COMPRESSED_TENSORS):
        return
    for group in ctx.fused_groups:
        yield from _group_findings(ctx, group)

"""Fused 3-D experts in the model's own layout (Llama 4, GPT-OSS; engine-contract.md §3.3-§3.4).

``experts.gate_up_proj`` is ``[E, H, 2I]`` and ``experts.down_proj`` ``[E, I, H]`` (``[E, in, out]``);
NVFP4 packs two codes per byte along the input dimension (``[E, H/2, 2I]``) with FP8 block scales
``[E, H/16, 2I]``. ModelOpt names the scales ``gate_up_proj_weight_scale`` and so on, one scalar
(or one per expert) for ``weight_scale_2`` and ``input_scale``.
"""

from __future__ import annotations

from collections.abc import Iterator

from quantport.arch.experts import ExpertLayout
from quantport.formats.mx import MX_BLOCK
from quantport.formats.nvfp4 import NVFP4_BLOCK

from ..checkpoint import TensorInfo
from ..findings import Finding
from ..qconfig import Format
from ..specs import SCALAR, Spec
from ..structure import Context, is_quantized
from .moe_rules import EXPERT_INCOMPLETE, FUSED_SHAPE

__all__ = ["fused_findings"]

_FLOAT = ("BF16", "F16", "F32")


def _scale_specs(algo: str | None, e: int, dims: tuple[int, int]) -> dict[str, Spec]:
    """Scale suffix -> spec for one fused projection with (in, out) = ``dims``."""
    per_expert = (SCALAR, (e,))
    if algo == "FP8":
        return {"weight_scale": Spec(("F32",), per_expert), "input_scale": Spec(("F32",), per_expert)}
    if algo in ("NVFP4", "W4A16_NVFP4"):
        specs = {
            "weight_scale": Spec(("F8_E4M3",), ((e, dims[0] // NVFP4_BLOCK, dims[1]),)),
            "weight_scale_2": Spec(("F32",), per_expert),
        }
        specs["input_scale"] = Spec(("F32",), per_expert, required=algo == "NVFP4")
        return specs
    if algo == "MXFP8":
        return {"weight_scale": Spec(("U8", "F8_E8M0"), ((e, dims[0] // MX_BLOCK, dims[1]),))}
    return {"weight_scale": Spec(("F32",), per_expert + ((e, dims[1]), (e, dims[1], 1)), required=True)}


def _check(ctx: Context, name: str, info: TensorInfo | None, spec: Spec) -> Iterator[Finding]:
    if info is None:
        if spec.required:
            yield EXPERT_INCOMPLETE.finding(name, f"fused experts have no {name.rsplit('.', 1)[-1]}")
    elif info.dtype not in spec.dtypes or not spec.shape_ok(info.shape):
        yield FUSED_SHAPE.finding(name, f"{info.dtype} {list(info.shape)}, expected {spec.describe()}")


def fused_findings(
    ctx: Context, prefix: str, params: dict[str, TensorInfo], layout: ExpertLayout, count: int | None
) -> Iterator[Finding]:
    """dtype and shape of every tensor of one fused experts module."""
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if gate_up is None or down is None:
        missing = "gate_up_proj" if gate_up is None else "down_proj"
        yield EXPERT_INCOMPLETE.finding(f"{prefix}.{missing}", f"fused experts {prefix} have no {missing}")
        return
    if gate_up.ndim != 3 or down.ndim != 3:
        yield FUSED_SHAPE.finding(
            prefix, f"gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} must both be 3-D [E, in, out]"
        )
        return
    quantized = is_quantized(params)
    algo = ctx.modelopt_algo(prefix) if ctx.qcfg.format is Format.MODELOPT and quantized else None
    packed = 2 if algo in ("NVFP4", "W4A16_NVFP4") else 1  # MXFP8 / FP8 keep one code per byte
    weight_dtypes = _FLOAT if not quantized else (("U8",) if packed == 2 else ("F8_E4M3",))
    e, h, two_i = gate_up.shape[0], gate_up.shape[1] * packed, gate_up.shape[2]
    inter = two_i // 2
    yield from _check(ctx, f"{prefix}.gate_up_proj", gate_up, Spec(weight_dtypes, ((e, h // packed, two_i),)))
    yield from _check(ctx, f"{prefix}.down_proj", down, Spec(weight_dtypes, ((e, inter // packed, h),)))
    if count is not None and e != count:
        yield FUSED_SHAPE.finding(f"{prefix}.gate_up_proj", f"{e} experts stored, config has {count}")
    hidden = ctx.facts.hidden_size
    if hidden is not None and h != hidden:
        yield FUSED_SHAPE.finding(f"{prefix}.gate_up_proj", f"hidden dimension {h}, config hidden_size {hidden}")
    if layout.has_bias:
        yield from _check(
            ctx, f"{prefix}.gate_up_proj_bias", params.get("gate_up_proj_bias"), Spec(_FLOAT, ((e, two_i),))
        )
        yield from _check(ctx, f"{prefix}.down_proj_bias", params.get("down_proj_bias"), Spec(_FLOAT, ((e, h),)))
    if not quantized:
        return
    for proj, dims in (("gate_up_proj", (h, two_i)), ("down_proj", (inter, h))):
        for suffix, spec in _scale_specs(algo, e, dims).items():
            name = f"{proj}_{suffix}"
            yield from _check(ctx, f"{prefix}.{name}", params.get(name), spec)

"""Every scale is finite, and every per-tensor scale is positive (engine-contract.md §3.2, §8.5).

vLLM divides by input and global scales and takes maxima over experts: one NaN or inf poisons a
whole layer, a zero gives ``1/0``. Block scales may be zero (an all-zero block) but never negative
or NaN. E8M0 scales (uint8) are NaN when 255.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..checkpoint import TensorInfo
from ..findings import Finding, Rule
from ..structure import Context, fused_expert_param

__all__ = ["SCALE_PARAMS", "check", "is_scale"]

NOT_FINITE = Rule(
    "scale.not-finite",
    "a scale tensor holds NaN or inf",
    "recalibrate the layer (an expert that saw no tokens needs a fallback scale: the max over "
    "the other experts, or one from the weight)",
)
NOT_POSITIVE = Rule(
    "scale.not-positive",
    "a scale is zero or negative",
    "recalibrate the layer; per-tensor scales must be > 0 (the engine divides by them)",
)

SCALE_PARAMS = frozenset(
    {
        "weight_scale",
        "weight_scale_2",
        "input_scale",
        "weight_global_scale",
        "input_global_scale",
        "k_scale",
        "v_scale",
        "q_scale",
        "kv_scale",
    }
)
_E8M0 = ("U8", "F8_E8M0")
_E8M0_NAN = 255
_FLOATS = ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2")


def is_scale(info: TensorInfo) -> bool:
    param = info.name.rpartition(".")[2]
    if param in SCALE_PARAMS:
        return True
    fused = fused_expert_param(param)
    return fused is not None and (fused[1] in SCALE_PARAMS or fused[1] == "scales")


def _scalar_findings(ctx: Context, info: TensorInfo) -> Iterator[Finding]:
    value = ctx.load_scalar(info.name)  # cached: the group and MoE rules read the same scalars
    if value is None:
        return
    if math.isnan(value) or math.isinf(value):
        yield NOT_FINITE.finding(info.name, f"per-tensor scale is {value}")
    elif value <= 0:
        yield NOT_POSITIVE.finding(info.name, f"per-tensor scale is {value:.6g}")


def _findings(ctx: Context, info: TensorInfo) -> Iterator[Finding]:
    if info.numel == 1 and info.dtype in _FLOATS:
        yield from _scalar_findings(ctx, info)
        return
    tensor = ctx.ckpt.load(info.name)
    if tensor is None:
        return
    if info.dtype in _E8M0:
        raw = tensor.view(torch.uint8) if tensor.dtype != torch.uint8 else tensor
        bad = int((raw == _E8M0_NAN).sum())
        if bad:
            yield NOT_FINITE.finding(info.name, f"{bad} E8M0 scale bytes are 255 (NaN)")
        return
    if not (tensor.is_floating_point()):
        return
    values = tensor.to(torch.float32)
    nan, inf = int(values.isnan().sum()), int(values.isinf().sum())
    if nan or inf:
        yield NOT_FINITE.finding(info.name, f"{nan} NaN and {inf} inf of {values.numel()} values")
        return
    if values.numel() == 1 and float(values.reshape(())) <= 0:
        yield NOT_POSITIVE.finding(info.name, f"per-tensor scale is {float(values.reshape(())):.6g}")
    elif values.numel() > 1 and bool((values < 0).any()):
        yield NOT_POSITIVE.finding(info.name, f"{int((values < 0).sum())} negative values")


def check(ctx: Context) -> Iterator[Finding]:
    for _, info in sorted(ctx.ckpt.tensors.items()):
        if is_scale(info):
            yield from _findings(ctx, info)

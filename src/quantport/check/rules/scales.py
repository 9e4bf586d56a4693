"""Every scale is finite, and every per-tensor scale is positive (engine-contract.md §3.2, §8.5).

vLLM divides by input and global scales and takes maxima over experts: one NaN or inf poisons a
whole layer, a zero gives ``1/0``. Block scales may be zero (an all-zero block) but never negative
or NaN. E8M0 scales (uint8) are NaN when 255.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from quantport.read import UnreadableFileError

from ..checkpoint import TORCH_DTYPES, TensorInfo
from ..findings import Finding, Rule
from ..structure import Context, fused_expert_param
from ..tensor_batch import BATCH_BYTES, BufferPool, TensorBatch, read_batch
from .scale_values import clean_dtypes

__all__ = ["SCALAR_SCALE_DTYPES", "SCALE_PARAMS", "check", "is_scale", "is_scale_name"]

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
SCALAR_SCALE_DTYPES = frozenset(_FLOATS)
"""Dtypes of a one-element scale that is tested as a per-tensor value (:meth:`Context.load_scalar`), not as an array."""
_SCALE_PARAM: dict[str, bool] = {}
"""parameter name (last component) -> whether it names a scale; a model has a few dozen."""
_SCALE_PARAM_CACHE = 4096


def is_scale(info: TensorInfo) -> bool:
    return is_scale_name(info.name)


def is_scale_name(name: str) -> bool:
    """Whether tensor ``name`` is a scale (its last component, or a fused experts' scale parameter)."""
    param = name.rpartition(".")[2]
    known = _SCALE_PARAM.get(param)
    if known is None:
        fused = fused_expert_param(param)
        known = param in SCALE_PARAMS or (fused is not None and (fused[1] in SCALE_PARAMS or fused[1] == "scales"))
        if len(_SCALE_PARAM) < _SCALE_PARAM_CACHE:
            _SCALE_PARAM[param] = known
    return known


def _scalar_findings(ctx: Context, info: TensorInfo) -> Iterator[Finding]:
    value = ctx.load_scalar(info.name)  # cached: the group and MoE rules read the same scalars
    if value is None:
        return
    if math.isnan(value) or math.isinf(value):
        yield NOT_FINITE.finding(info.name, f"per-tensor scale is {value}")
    elif value <= 0:
        yield NOT_POSITIVE.finding(info.name, f"per-tensor scale is {value:.6g}")


def _tensor_findings(info: TensorInfo, tensor: torch.Tensor) -> Iterator[Finding]:
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


def _findings(ctx: Context, info: TensorInfo, batch: TensorBatch | None, clean: frozenset[str]) -> Iterator[Finding]:
    """The per-tensor test of one non-scalar scale, skipped when its dtype is clean in the batch."""
    if batch is not None and info.name in batch:
        if info.dtype not in clean:
            yield from _tensor_findings(info, batch.tensor(info.name))
        return
    tensor = ctx.ckpt.load(info.name)
    if tensor is not None:
        yield from _tensor_findings(info, tensor)


def _read_arrays(ctx: Context, arrays: list[TensorInfo], pool: BufferPool) -> TensorBatch | None:
    """Non-scalar scales in one batch; None when a read fails (they are then read one at a time, so
    the failure is reported exactly where a single read reports it)."""
    try:
        return read_batch(ctx.ckpt, [i for i in arrays if i.dtype in TORCH_DTYPES], pool) if arrays else None
    except (UnreadableFileError, OSError):
        return None


def _chunk_findings(ctx: Context, chunk: list[tuple[TensorInfo, bool]], pool: BufferPool) -> Iterator[Finding]:
    """Findings of a run of scales in name order; (info, is a per-tensor float scale) pairs."""
    batch = _read_arrays(ctx, [info for info, scalar in chunk if not scalar], pool)
    clean = clean_dtypes(batch) if batch is not None else frozenset()
    for info, scalar in chunk:
        if scalar:
            yield from _scalar_findings(ctx, info)
        else:
            yield from _findings(ctx, info, batch, clean)


def check(ctx: Context) -> Iterator[Finding]:
    """Scales in name order, read in runs of at most :data:`BATCH_BYTES` of non-scalar tensors."""
    chunk: list[tuple[TensorInfo, bool]] = []
    size, pool = 0, BufferPool()
    clean = ctx.ckpt.witnessed.clean  # tested as they were written: nothing to report
    for info in ctx.sorted_tensors:
        if not is_scale(info):
            continue
        scalar = info.dtype in _FLOATS and info.numel == 1
        if not scalar:
            if info.name in clean:
                continue
            if size and size + info.nbytes > BATCH_BYTES:
                yield from _chunk_findings(ctx, chunk, pool)
                chunk, size = [], 0
            size += info.nbytes
        chunk.append((info, scalar))
    yield from _chunk_findings(ctx, chunk, pool)

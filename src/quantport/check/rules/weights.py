"""Unquantized float tensors hold finite values (embeddings, ``lm_head``, norms, biases, bf16 layers).

A NaN in ``lm_head.weight`` or a norm loads without complaint and turns every logit into NaN. The
quantized weights are the quantizer's business (it refuses non-finite inputs) and scales are the scale
rules'; this rule reads the other float tensors, one at a time and in slices of at most
:data:`CHUNK_ELEMENTS` elements, so memory stays bounded whatever the tensor's size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ...formats.finite import all_finite
from ..findings import Finding, Rule
from ..structure import Context
from .scales import is_scale

__all__ = ["CHUNK_ELEMENTS", "FLOAT_DTYPES", "check"]

NOT_FINITE = Rule(
    "weight.not-finite",
    "an unquantized float tensor holds NaN or inf",
    "repair the source model's tensor (or re-export from a model without NaN/inf); engines load it "
    "and compute NaN logits",
)
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32", "F64"})
CHUNK_ELEMENTS = 1 << 24
"""Elements read at once (64 MB of float32)."""


def _bad_values(ctx: Context, name: str) -> tuple[int, int]:
    """(NaN count, inf count) of tensor ``name``; the values are counted only in a chunk that is not finite."""
    nans = infs = 0
    for chunk in ctx.ckpt.iter_rows(name, CHUNK_ELEMENTS):
        if all_finite(chunk):
            continue
        nan = int(torch.isnan(chunk).sum())
        nans, infs = nans + nan, infs + int(torch.isinf(chunk).sum())
    return nans, infs


def check(ctx: Context) -> Iterator[Finding]:
    clean = ctx.ckpt.witnessed.clean  # tested as they were written: finite
    for info in ctx.sorted_tensors:
        name = info.name
        if info.dtype not in FLOAT_DTYPES or info.numel == 0 or name in clean or is_scale(info):
            continue
        nans, infs = _bad_values(ctx, name)
        if nans or infs:
            yield NOT_FINITE.finding(
                name, f"{name} ({info.dtype}{list(info.shape)}) holds {nans} NaN and {infs} infinite values"
            )

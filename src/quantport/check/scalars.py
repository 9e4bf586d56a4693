"""Every one-element tensor of a checkpoint read at once, as the floats the rules compare.

The group, scale and MoE rules read the per-tensor scales (``input_scale``, ``weight_scale_2``,
``k_scale`` ...) of every quantized Linear: about 37,000 of them in a Qwen3-30B-A3B NVFP4 export.
Read together (:func:`~quantport.check.tensor_batch.read_batch`) and converted by one ``to(float32)``
per dtype, they cost a fraction of reading them one by one; the values are those a single read gives.
"""

from __future__ import annotations

import logging

import torch

from quantport.read import UnreadableFileError

from .checkpoint import Checkpoint
from .tensor_batch import read_batch

__all__ = ["SCALAR_DTYPES", "read_scalars"]

logger = logging.getLogger(__name__)

SCALAR_DTYPES = frozenset({"F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2", "I8", "U8", "I16", "I32", "I64"})
"""The dtypes read in the batch (the others, rare for a scale, are read one at a time)."""


def read_scalars(ckpt: Checkpoint) -> dict[str, float]:
    """tensor name -> float32 value of every one-element tensor of ``ckpt`` with a dtype in
    :data:`SCALAR_DTYPES`; the values ``ckpt.witnessed`` holds are taken from there, the others read in one
    batch (left out when it cannot be read: each is then read alone, so a failure is reported where a single
    read reports it)."""
    known = ckpt.witnessed.scalars
    out = {name: known[name] for name, info in ckpt.tensors.items() if info.numel == 1 and name in known}
    infos = [i for i in ckpt.tensors.values() if i.numel == 1 and i.dtype in SCALAR_DTYPES and i.name not in out]
    if not infos:
        return out
    try:
        batch = read_batch(ckpt, infos)
    except (UnreadableFileError, OSError) as exc:
        logger.debug("one-element tensors of %s not read in one batch: %s", ckpt.path, exc)
        return out
    values = {dtype: batch.typed(dtype).to(torch.float32).tolist() for dtype in batch.buffers}
    for name, (dtype, begin, _) in batch.slots.items():
        out[name] = values[dtype][begin // batch.itemsize(dtype)]
    return out

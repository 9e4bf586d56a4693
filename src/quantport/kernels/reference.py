"""The pure-torch backend: each op composed from :mod:`quantport.formats`, the definition of the numerics.

Every other backend must return exactly what these functions return (same dtypes, shapes and bytes).
"""

from __future__ import annotations

import torch

from ..formats import fp8, integer, mx, nvfp4

__all__ = ["fp8_per_tensor", "int4_modelopt", "matrix_amax", "mxfp4", "nvfp4_quantize"]


def fp8_per_tensor(w: torch.Tensor, scale: torch.Tensor, *, in_range: bool = False) -> torch.Tensor:
    """float8_e4m3fn codes of ``w [..., out, in]``: ``scale`` is one element, or one per leading matrix
    (each matrix quantized as :func:`quantport.formats.fp8.quantize_fp8_per_tensor` with its own scale)."""
    scale = torch.as_tensor(scale, device=w.device)
    if scale.numel() == 1:
        return fp8.quantize_fp8_per_tensor(w, scale, in_range=in_range)
    matrices = w.reshape(-1, *w.shape[-2:])
    if scale.numel() != matrices.shape[0]:
        raise ValueError(f"need one scale or one per matrix ({tuple(w.shape[:-2])}), got {scale.numel()}")
    scales = scale.reshape(-1)
    codes = [fp8.quantize_fp8_per_tensor(m, s, in_range=in_range) for m, s in zip(matrices, scales, strict=True)]
    return torch.stack(codes).reshape(w.shape)


def nvfp4_quantize(w: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantport.formats.nvfp4.quantize_nvfp4`: (packed ``[..., in/2]``, fp8 scale ``[..., in/16]``)."""
    return nvfp4.quantize_nvfp4(w, global_scale)


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantport.formats.mx.quantize_mxfp4`: (packed ``[..., in/2]``, E8M0 ``[..., in/32]``)."""
    return mx.quantize_mxfp4(w)


def int4_modelopt(w: torch.Tensor, group: int = integer.INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt INT4 (AWQ export): (uint8 ``[..., out/2, in]`` packed along the output dim,
    fp32 scale ``[..., out, in/group]``)."""
    scale = integer.int4_group_scales(w, group)
    return integer.pack_int4_modelopt(integer.quantize_int4(w, scale, group)), scale


def matrix_amax(w: torch.Tensor, matrix_dims: int = 2) -> torch.Tensor:
    """fp32 max |w| over the last ``matrix_dims`` dims (one value per expert of a ``[E, out, in]`` stack)."""
    dims = tuple(range(w.dim() - matrix_dims, w.dim()))
    return w.detach().abs().amax(dim=dims).float()

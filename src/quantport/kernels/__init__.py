"""Weight quantization at memory bandwidth: every op is a pure function with a pure-torch reference.

The reference (:mod:`quantport.kernels.reference`, built from :mod:`quantport.formats`) defines each
op's result; the Triton backend computes the same bytes in one pass on CUDA. Calls dispatch by input
(see :mod:`quantport.kernels.backends`), so CPU tensors and unsupported shapes always take the reference.

Ops (``w`` is ``[..., out, in]``, e.g. ``[E, out, in]`` experts; inputs are never modified):

* :func:`quantize_fp8_per_tensor` ``(w, scale, *, in_range=False) -> codes float8_e4m3fn``
* :func:`quantize_nvfp4` ``(w, global_scale) -> (packed uint8 [..., in/2], scale fp8 [..., in/16])``
* :func:`quantize_mxfp4` ``(w) -> (packed uint8 [..., in/2], scale uint8 E8M0 [..., in/32])``
* :func:`quantize_int4_modelopt` ``(w, group) -> (packed uint8 [..., out/2, in], scale fp32 [..., out, in/group])``
* :func:`matrix_amax` ``(w, matrix_dims) -> fp32 max |w| per leading index``

``scale`` / ``global_scale`` are one fp32 element, or one per leading matrix (per expert).
"""

from __future__ import annotations

import torch

from .backends import BACKENDS, Backend, register_backend, select, use_backend

__all__ = [
    "BACKENDS",
    "Backend",
    "matrix_amax",
    "quantize_fp8_per_tensor",
    "quantize_int4_modelopt",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "register_backend",
    "select",
    "use_backend",
]


def quantize_fp8_per_tensor(w: torch.Tensor, scale: torch.Tensor, *, in_range: bool = False) -> torch.Tensor:
    """FP8 E4M3 codes of ``w`` with a per-tensor (or per-matrix) fp32 ``scale``, as
    :func:`quantport.formats.fp8.quantize_fp8_per_tensor` computes them (``in_range``: its promise that
    ``w`` is finite and within ``448 * scale``, which lets the reference skip sanitising)."""
    return select("fp8_per_tensor", w, scale=scale).load("fp8_per_tensor")(w, scale, in_range=in_range)


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantport.formats.nvfp4.quantize_nvfp4`: packed E2M1 codes and FP8 block scales."""
    return select("nvfp4", w, global_scale=global_scale).load("nvfp4")(w, global_scale)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantport.formats.mx.quantize_mxfp4`: packed E2M1 codes and E8M0 scales per 32."""
    return select("mxfp4", w).load("mxfp4")(w)


def quantize_int4_modelopt(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt INT4 group quantization and packing along the output dim (``pack_int4_modelopt``)."""
    return select("int4_modelopt", w, group=group).load("int4_modelopt")(w, group)


def matrix_amax(w: torch.Tensor, matrix_dims: int = 2) -> torch.Tensor:
    """fp32 max |w| over the last ``matrix_dims`` dims (per-expert weight amax of a 3-D stack)."""
    return select("matrix_amax", w, matrix_dims=matrix_dims).load("matrix_amax")(w, matrix_dims)

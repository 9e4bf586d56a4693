"""Integer packings: INT4 two per byte along the output dim (ModelOpt), and 4- / 8-bit codes in int32 words
(compressed-tensors' ``pack_to_int32``). Pure functions in inverse pairs; :mod:`quantport.formats.integer`
re-exports them.

* ModelOpt ``pack_int4_in_uint8``: rows ``2k`` and ``2k+1`` share a byte, row ``2k`` in the low nibble, two's
  complement nibbles: ``uint8 [out/2, in]``.
* compressed-tensors ``pack_to_int32``: offset binary (``code + 2**(bits-1)``), ``32/bits`` codes per int32 along
  the packed dim, element ``i`` at bits ``i*bits..``; the tail is padded with raw zeros and words are
  reinterpreted as signed int32.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "pack_int4_ct",
    "pack_int4_modelopt",
    "pack_int_ct",
    "unpack_int4_ct",
    "unpack_int4_modelopt",
    "unpack_int_ct",
]


def _check_code_range(codes: torch.Tensor, lo: int, hi: int, name: str) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"{name}: codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"{name}: codes must lie in [{lo}, {hi}]")


def pack_int4_modelopt(codes: torch.Tensor) -> torch.Tensor:
    """Pack INT4 ``codes [..., out, in]`` (in [-8, 7]) to ``uint8 [..., out/2, in]`` along the OUTPUT dim.

    Byte ``[k, j]`` has ``codes[2k, j] & 0xF`` in the low nibble and ``codes[2k+1, j] & 0xF`` in the
    high nibble (two's complement nibbles), as modelopt's ``pack_int4_in_uint8`` does.
    """
    if codes.dim() < 2:
        raise ValueError("pack_int4_modelopt: expected codes of shape [..., out, in]")
    if codes.shape[-2] % 2 != 0:
        raise ValueError(f"pack_int4_modelopt: output dimension ({codes.shape[-2]}) must be even")
    _check_code_range(codes, -8, 7, "pack_int4_modelopt")
    c = codes.to(torch.int16) & 0x0F
    return (c[..., 0::2, :] | (c[..., 1::2, :] << 4)).to(torch.uint8)


def unpack_int4_modelopt(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_modelopt`: ``uint8 [..., out/2, in]`` to ``int8 [..., out, in]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4_modelopt: packed must be torch.uint8, got {packed.dtype}")
    if packed.dim() < 2:
        raise ValueError("unpack_int4_modelopt: expected packed of shape [..., out/2, in]")
    p = packed.to(torch.int16)
    low = ((p & 0x0F) ^ 8) - 8
    high = ((p >> 4) ^ 8) - 8
    out = torch.stack((low, high), dim=-2)  # [..., out/2, 2, in]
    return out.flatten(-3, -2).to(torch.int8)


def _packed_dim(codes: torch.Tensor, dim: int, name: str) -> int:
    if codes.dim() < 2:
        raise ValueError(f"{name}: expected a tensor of shape [..., rows, cols]")
    if dim not in (-1, -2):
        raise ValueError(f"{name}: dim must be -1 (input dim) or -2 (output dim), got {dim}")
    return dim


def pack_int4_ct(codes: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """Pack INT4 ``codes [..., out, in]`` (in [-8, 7]) to ``int32`` as CT's ``pack_to_int32`` does.

    With ``dim=-1`` (the weight layout) the result is ``[..., out, ceil(in/8)]``. Word ``w`` holds
    ``codes[..., 8w + i] + 8`` in bits ``4i..4i+3``. The tail is zero-padded (raw nibble 0). With
    ``dim=-2`` (how compressed-tensors packs zero points, ``packed_dim=0``) the output dim is
    packed instead: ``[..., ceil(out/8), in]``.
    """
    dim = _packed_dim(codes, dim, "pack_int4_ct")
    _check_code_range(codes, -8, 7, "pack_int4_ct")
    v = codes.to(torch.int64) + 8
    if dim == -2:
        v = v.transpose(-1, -2)
    n = v.shape[-1]
    nwords = -(-n // 8)
    if nwords * 8 != n:
        v = torch.nn.functional.pad(v, (0, nwords * 8 - n))
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=v.device)
    words = (v.unflatten(-1, (nwords, 8)) << shifts).sum(dim=-1)  # disjoint bits: sum == or
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    if dim == -2:
        words = words.transpose(-1, -2)
    return words.contiguous()


def unpack_int4_ct(packed: torch.Tensor, in_features: int, *, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int4_ct`: ``int32 [..., out, ceil(in/8)]`` to ``int8 [..., out, in_features]``.

    ``in_features`` is the original length of the packed dim (for ``dim=-2``, the output dim).
    """
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int4_ct: packed must be torch.int32, got {packed.dtype}")
    dim = _packed_dim(packed, dim, "unpack_int4_ct")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == -2:
        w = w.transpose(-1, -2)
    nwords = w.shape[-1]
    if in_features < 0 or -(-in_features // 8) != nwords:
        raise ValueError(
            f"unpack_int4_ct: {nwords} int32 words cannot hold {in_features} int4 values "
            f"(need ceil({in_features}/8) words)"
        )
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=w.device)
    nibbles = (w.unsqueeze(-1) >> shifts) & 0x0F
    out = (nibbles.flatten(-2)[..., :in_features] - 8).to(torch.int8)
    if dim == -2:
        out = out.transpose(-1, -2)
    return out.contiguous()


_SHIFTS8 = (0, 8, 16, 24)


def _check_pack_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit packing is supported, got {bits}")


def pack_int_ct(codes: torch.Tensor, bits: int, *, dim: int = -1) -> torch.Tensor:
    """Pack signed ``bits``-bit codes ``[..., rows, cols]`` into int32 as compressed-tensors does.

    ``dim=-1`` packs along the last dim (``[..., rows, ceil(cols*bits/32)]``), ``dim=-2`` along the rows
    (zero points). 4-bit is :func:`pack_int4_ct`; 8-bit stores ``q + 128`` with element ``i`` of each word
    in bits ``8i..8i+7``.
    """
    _check_pack_bits(bits)
    if bits == 4:
        return pack_int4_ct(codes, dim=dim)
    if codes.dim() < 2 or dim not in (-1, -2):
        raise ValueError("pack_int_ct: expected [..., rows, cols] codes and dim -1 or -2")
    if codes.numel() and (int(codes.min()) < -128 or int(codes.max()) > 127):
        raise ValueError("pack_int_ct: 8-bit codes must lie in [-128, 127]")
    v = codes.to(torch.int64) + 128
    if dim == -2:
        v = v.transpose(-1, -2)
    words = math.ceil(v.shape[-1] / 4)
    v = torch.nn.functional.pad(v, (0, words * 4 - v.shape[-1]))
    shifts = torch.tensor(_SHIFTS8, dtype=torch.int64, device=v.device)
    packed = (v.unflatten(-1, (words, 4)) << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return (packed.transpose(-1, -2) if dim == -2 else packed).contiguous()


def unpack_int_ct(packed: torch.Tensor, bits: int, length: int, *, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int_ct`: int32 words -> int8 codes, ``length`` long along ``dim``."""
    _check_pack_bits(bits)
    if bits == 4:
        return unpack_int4_ct(packed, length, dim=dim)
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int_ct: packed must be torch.int32, got {packed.dtype}")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == -2:
        w = w.transpose(-1, -2)
    if math.ceil(length / 4) != w.shape[-1]:
        raise ValueError(f"unpack_int_ct: {w.shape[-1]} words cannot hold {length} 8-bit values")
    shifts = torch.tensor(_SHIFTS8, dtype=torch.int64, device=w.device)
    out = (((w.unsqueeze(-1) >> shifts) & 0xFF).flatten(-2)[..., :length] - 128).to(torch.int8)
    return (out.transpose(-1, -2) if dim == -2 else out).contiguous()

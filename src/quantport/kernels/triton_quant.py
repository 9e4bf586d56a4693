"""Triton kernels for weight quantization on CUDA: one pass over the weight, codes and scales written once.

Each kernel reproduces one pure function of :mod:`quantport.formats` bit for bit (the tests in
``tests/kernels`` compare every output byte): the same fp32 operations in the same order, divisions
correctly rounded (``div_rn``: Triton's ``/`` is an approximate division), explicit intermediate
roundings where the reference rounds (the bf16 quotient of per-tensor FP8), and exponent arithmetic on
the bits instead of ``log2`` (MXFP4, exact for bf16/fp16 weights). Element-wise divisions by a per-block
divisor use its correctly rounded reciprocal and one FMA correction (still the correctly rounded
quotient), or an exact product by a power of two (MXFP4): a full division per element would make the
kernels compute-bound. Contiguous weights ``[..., out, in]`` are read as flat blocks of element pairs
(NVFP4, MXFP4: one integer per two elements, so codes pack without a shuffle) or as ``[M, K]`` rows
(INT4, FP8); scales that change per matrix (per expert) are indexed by block or row.

Import this module only where Triton is installed (see :mod:`quantport.kernels.backends`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "fp8_per_tensor_triton",
    "int4_modelopt_triton",
    "matrix_amax_triton",
    "mxfp4_triton",
    "nvfp4_triton",
]

# The dtype code the kernels branch on (FP8's bf16/fp16 quotient rounding, the pair unpacking).
_KIND = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 0}
# finfo(dtype).tiny / .max of the weight dtype: modelopt sanitises the INT4 group amax in that dtype.
_LIMITS = {
    torch.bfloat16: (torch.finfo(torch.bfloat16).tiny, torch.finfo(torch.bfloat16).max),
    torch.float16: (torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max),
    torch.float32: (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max),
}


@triton.jit
def _fp8_per_tensor_kernel(x_ptr, scale_ptr, out_ptr, per_matrix, BLOCK: tl.constexpr, KIND: tl.constexpr):
    matrix = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_matrix
    base = matrix.to(tl.int64) * per_matrix
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + matrix)
    q = tl.math.div_rn(x, tl.full([BLOCK], 1.0, tl.float32) * scale)
    if KIND == 1:  # the reference's quotient is a bf16 tensor (0-d fp32 scale does not promote)
        q = q.to(tl.bfloat16).to(tl.float32)
    elif KIND == 2:
        q = q.to(tl.float16).to(tl.float32)
    q = tl.where(q != q, 0.0, q)
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    tl.store(out_ptr + base + offs, q.to(tl.float8e4nv), mask=mask)


@triton.jit
def _e2m1_index(q, TIES_DOWN: tl.constexpr, NAN_TO_ZERO: tl.constexpr):
    """E2M1 magnitude index 0..7 (int32) of |q|, saturating at 6: ties to even (NVFP4) or toward zero (MXFP4).

    From 1 up, E2M1 is a float with one mantissa bit: rounding the fp32 bits of |q| to their top mantissa
    bit (add just under half a unit, plus the kept bit's value for ties to even) and shifting leaves
    ``2 * exponent + mantissa bit``, the index plus 252. Below 1 the grid is 0, 0.5, 1: the index is
    ``2|q|`` rounded to an integer (by adding 2**23, ties to even), or two comparisons for ties down.
    NaN gives index 0 with ``NAN_TO_ZERO`` (NVFP4's reference; MXFP4's reference leaves NaN unspecified).
    """
    mag = tl.abs(q)
    m = tl.minimum(mag, 6.0)
    bits = m.to(tl.int32, bitcast=True)
    if TIES_DOWN:
        normal = ((bits + 0x1FFFFF) >> 22) - 252
        small = (m > 0.25).to(tl.int32) + (m > 0.75).to(tl.int32)
    else:
        normal = ((bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22) - 252
        small = (m * 2.0 + 8388608.0).to(tl.int32, bitcast=True) & 0xFF
    index = tl.where(m < 1.0, small, normal)
    if NAN_TO_ZERO:
        index = tl.where(mag != mag, 0, index)
    return index


@triton.jit
def _quotient(x, d, rd):
    """RN(x / d) from ``rd = RN(1 / d)``: one product and two FMAs (Markstein's correction), instead of a
    full division per element. Correctly rounded while ``d`` and ``x / d`` stay far from under/overflow;
    callers check that range per tile and divide exactly (``div_rn``) otherwise."""
    q0 = x * rd
    return tl.fma(tl.fma(-d, q0, x), rd, q0)


@triton.jit
def _pairs(v, KIND: tl.constexpr):
    """fp32 values of the even and odd elements packed in ``v``: two bf16 (KIND 1) or fp16 (KIND 2) in an
    int32, or two fp32 (KIND 0) in an int64, the even element in the low half (little-endian).

    Loading pairs as one integer keeps each row's codes in registers in input order: the even and odd
    codes come out as two tensors that pack into bytes with a shift and an or (no reshape, no shuffle).
    """
    if KIND == 1:
        lo = (v << 16).to(tl.float32, bitcast=True)
        hi = (v & -65536).to(tl.float32, bitcast=True)
    elif KIND == 2:
        lo = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        lo = v.to(tl.int32).to(tl.float32, bitcast=True)
        hi = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _nvfp4_code(q):
    return (_e2m1_index(q, False, True) | ((q < 0).to(tl.int32) << 3)).to(tl.uint8)


@triton.jit
def _nvfp4_bytes(lo, hi, d, rd, FAST: tl.constexpr):
    """One little-endian int32 per row of the four packed bytes of 4 pairs ``(lo, hi)`` ``[BLOCK_R, 4]``."""
    if FAST:
        q_lo, q_hi = _quotient(lo, d, rd), _quotient(hi, d, rd)
    else:
        q_lo, q_hi = tl.math.div_rn(lo, d), tl.math.div_rn(hi, d)
    pairs = (_nvfp4_code(q_lo) | (_nvfp4_code(q_hi) << 4)).to(tl.int32)
    return tl.sum(pairs << (tl.arange(0, 4)[None, :] * 8), axis=1)


@triton.jit
def _nvfp4_kernel(
    v_ptr, g_ptr, packed_ptr, scale_ptr, n_blocks, blocks_per_g,
    BLOCK_R: tl.constexpr, KIND: tl.constexpr, G_PER_TILE: tl.constexpr,
):  # fmt: skip
    """One row of the tile per NVFP4 block of 16 consecutive inputs, read as two halves of 4 pairs
    (``_pairs``), so one thread holds a whole block: its amax, scales and reciprocal are computed once, with
    no shuffle, and its 8 packed bytes leave as one int64 store.

    ``G_PER_TILE``: no tile straddles two global scales (``blocks_per_g`` is a multiple of ``BLOCK_R``), so
    the tile loads its one global scale instead of one per block.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < n_blocks
    r64 = r.to(tl.int64)
    offs = r64[:, None] * 8 + tl.arange(0, 4)[None, :]
    a_lo, a_hi = _pairs(tl.load(v_ptr + offs, mask=ok[:, None], other=0), KIND)
    b_lo, b_hi = _pairs(tl.load(v_ptr + offs + 4, mask=ok[:, None], other=0), KIND)
    if G_PER_TILE:
        g = tl.full((BLOCK_R,), 1.0, tl.float32) * tl.load(g_ptr + (tl.program_id(0) * BLOCK_R) // blocks_per_g)
    else:
        g = tl.load(g_ptr + r // blocks_per_g, mask=ok, other=1.0)
    amax_a = tl.maximum(tl.max(tl.abs(a_lo), axis=1), tl.max(tl.abs(a_hi), axis=1))
    amax = tl.maximum(amax_a, tl.maximum(tl.max(tl.abs(b_lo), axis=1), tl.max(tl.abs(b_hi), axis=1)))
    block_scale = tl.math.div_rn(amax, 6.0 * g)
    block_scale = tl.where((block_scale == 0.0) | (block_scale != block_scale), 1.0, block_scale)
    block_scale = tl.minimum(tl.maximum(block_scale, 0.001953125), 448.0).to(tl.float8e4nv)
    d = block_scale.to(tl.float32) * g
    rd = tl.math.div_rn(tl.full((BLOCK_R,), 1.0, tl.float32), d)
    safe = (d > 1e-30) & (d < 1e30) & (amax * rd < 1e30)
    dd = tl.broadcast_to(d[:, None], (BLOCK_R, 4))
    rdd = tl.broadcast_to(rd[:, None], (BLOCK_R, 4))
    if tl.min(safe.to(tl.int32), axis=0) == 1:
        word_a = _nvfp4_bytes(a_lo, a_hi, dd, rdd, True)
        word_b = _nvfp4_bytes(b_lo, b_hi, dd, rdd, True)
    else:
        word_a = _nvfp4_bytes(a_lo, a_hi, dd, rdd, False)
        word_b = _nvfp4_bytes(b_lo, b_hi, dd, rdd, False)
    word = word_a.to(tl.uint32).to(tl.int64) | (word_b.to(tl.uint32).to(tl.int64) << 32)
    tl.store(packed_ptr + r64, word, mask=ok)
    tl.store(scale_ptr + r64, block_scale, mask=ok)


@triton.jit
def _mxfp4_code(q):
    return (_e2m1_index(q, True, False) | ((q <= 0).to(tl.int32) << 3)).to(tl.uint8)  # +-0: sign bit set


@triton.jit
def _mxfp4_kernel(v_ptr, packed_ptr, scale_ptr, n_blocks, BLOCK_R: tl.constexpr, KIND: tl.constexpr):
    """One row of the tile per MX block of 32 consecutive inputs, read as 16 pairs (``_pairs``)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < n_blocks
    offs = r.to(tl.int64)[:, None] * 16 + tl.arange(0, 16)[None, :]
    lo, hi = _pairs(tl.load(v_ptr + offs, mask=ok[:, None], other=0), KIND)
    amax = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))
    descale = tl.math.div_rn(amax, tl.full((BLOCK_R,), 6.0, tl.float32))
    # ceil(log2(descale)) from the bits: the exponent, plus one unless the mantissa is zero
    bits = descale.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    exponent = biased - 127 + (mantissa != 0).to(tl.int32)
    subnormal = tl.where(mantissa > 0x400000, -126, -127)  # zero or below 2**-126
    exponent = tl.where(biased == 0, subnormal, exponent)
    exponent = tl.where(descale != descale, -127, exponent)
    scale = tl.minimum(tl.maximum(exponent, -127), 127) + 127  # biased E8M0, 0..254
    # x / 2**e == x * 2**-e exactly (both correctly rounded, same real value); 2**-127 is subnormal
    inverse = tl.where(scale < 254, (254 - scale) << 23, 0x400000).to(tl.float32, bitcast=True)
    inverse = tl.broadcast_to(inverse[:, None], (BLOCK_R, 16))
    tl.store(packed_ptr + offs, _mxfp4_code(lo * inverse) | (_mxfp4_code(hi * inverse) << 4), mask=ok[:, None])
    tl.store(scale_ptr + r.to(tl.int64), scale.to(tl.uint8), mask=ok)


@triton.jit
def _int4_modelopt_kernel(x_ptr, packed_ptr, scale_ptr, M, K, tiny, huge, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * K + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    amax = tl.where((amax == 0.0) | (amax != amax), 7.0, amax)
    amax = tl.minimum(tl.maximum(amax, tiny), huge)
    scale = tl.math.div_rn(amax, tl.full((BLOCK_M,), 7.0, tl.float32))
    rs = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), scale)
    safe = (scale > 1e-30) & (scale < 1e30)
    ss = tl.broadcast_to(scale[:, None], (BLOCK_M, GROUP))
    if tl.min(safe.to(tl.int32), axis=0) == 1:
        q = _quotient(x, ss, tl.broadcast_to(rs[:, None], (BLOCK_M, GROUP)))
    else:
        q = tl.math.div_rn(x, ss)
    q = tl.minimum(tl.maximum(q, -9.0), 8.0)  # round(clamp(q)) == round(q) after the final clamp
    q = (q + 12582912.0) - 12582912.0  # round half to even (1.5 * 2**23: unit spacing), exact for |q| < 2**22
    codes = (tl.minimum(tl.maximum(q, -8.0), 7.0).to(tl.int32) & 0xF).to(tl.uint8)
    pairs = tl.permute(tl.reshape(codes, (BLOCK_M // 2, 2, GROUP)), (0, 2, 1))
    low, high = tl.split(pairs)
    prows = tl.program_id(0) * (BLOCK_M // 2) + tl.arange(0, BLOCK_M // 2)
    tl.store(
        packed_ptr + prows.to(tl.int64)[:, None] * K + cols[None, :],
        low | (high << 4),
        mask=(prows < M // 2)[:, None],
    )
    tl.store(scale_ptr + rows64 * (K // GROUP) + tl.program_id(1), scale, mask=row_ok)


@triton.jit
def _amax_kernel(x_ptr, partial_ptr, per_matrix, chunks, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    matrix = tl.program_id(1)
    chunk = tl.program_id(0)
    base = matrix.to(tl.int64) * per_matrix
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(ITERS):
        offs = (chunk * ITERS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + offs, mask=offs < per_matrix, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    tl.store(partial_ptr + matrix * chunks + chunk, tl.max(acc, axis=0))


# --- launchers ------------------------------------------------------------------------------------------------


def _rows(w: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    w = w.detach().contiguous()
    k = w.shape[-1]
    return w, w.numel() // k if k else 0, k


def _as_pairs(w: torch.Tensor) -> torch.Tensor:
    """Contiguous ``w`` (even last dim) seen as one integer per pair of elements (see ``_pairs``)."""
    pair = torch.int64 if w.element_size() == 4 else torch.int32
    if w.storage_offset() % 2:
        w = w.clone()
    return w.view(pair)


def _fp4_outputs(w: torch.Tensor, block: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Empty packed codes ``[..., in/2]`` and scales ``[..., in/block]`` for ``w``, and its block count."""
    k = w.shape[-1]
    packed = torch.empty((*w.shape[:-1], k // 2), dtype=torch.uint8, device=w.device)
    scale = torch.empty((*w.shape[:-1], k // block), dtype=scale_dtype, device=w.device)
    return packed, scale, w.numel() // block


def _per_matrix(value: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """fp32 values per leading matrix (one element: one for all) and the number of rows each covers."""
    value = value.detach().to(device=w.device, dtype=torch.float32).reshape(-1).contiguous()
    rows = w.numel() // w.shape[-1]
    if value.numel() == 1:
        return value, max(rows, 1)
    matrices = w[..., 0, 0].numel()
    if w.dim() < 2 or value.numel() != matrices:
        raise ValueError(f"need one scale or one per matrix ({tuple(w.shape[:-2])}), got {value.numel()}")
    return value, w.shape[-2]


def fp8_per_tensor_triton(w: torch.Tensor, scale: torch.Tensor, in_range: bool = False) -> torch.Tensor:
    """float8_e4m3fn codes of ``w [..., out, in]``; ``scale``: one fp32 element or one per leading matrix.
    ``in_range`` is accepted and not needed: the kernel sanitises in the same pass."""
    scale, rows_per = _per_matrix(scale, w)
    w = w.detach().contiguous()
    out = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    per_matrix = rows_per * w.shape[-1] if scale.numel() > 1 else w.numel()
    if w.numel():
        block = 4096
        grid = (triton.cdiv(per_matrix, block), scale.numel())
        _fp8_per_tensor_kernel[grid](w, scale, out, per_matrix, BLOCK=block, KIND=_KIND[w.dtype], num_warps=8)
    return out


def nvfp4_triton(
    w: torch.Tensor, global_scale: torch.Tensor, block_r: int = 128, num_warps: int = 2, g_per_tile: bool = False
):
    """(packed uint8 ``[..., in/2]``, fp8 block scale ``[..., in/16]``) of ``w [..., in]``."""
    g, rows_per = _per_matrix(global_scale, w)
    w, _, k = _rows(w)
    packed, scale, n_blocks = _fp4_outputs(w, 16, torch.float8_e4m3fn)
    if n_blocks:
        grid = (triton.cdiv(n_blocks, block_r),)
        blocks_per_g = rows_per * (k // 16)
        _nvfp4_kernel[grid](
            _as_pairs(w), g, packed.view(torch.int64), scale, n_blocks, blocks_per_g,
            BLOCK_R=block_r, KIND=_KIND[w.dtype], G_PER_TILE=g_per_tile and blocks_per_g % block_r == 0,
            num_warps=num_warps,
        )  # fmt: skip
    return packed, scale


def mxfp4_triton(w: torch.Tensor, block_r: int = 128, num_warps: int = 4):
    """(packed uint8 ``[..., in/2]``, E8M0 uint8 scale ``[..., in/32]``) of ``w [..., in]``."""
    w, _, _ = _rows(w)
    packed, scale, n_blocks = _fp4_outputs(w, 32, torch.uint8)
    if n_blocks:
        grid = (triton.cdiv(n_blocks, block_r),)
        _mxfp4_kernel[grid](
            _as_pairs(w), packed, scale, n_blocks, BLOCK_R=block_r, KIND=_KIND[w.dtype], num_warps=num_warps
        )
    return packed, scale


def int4_modelopt_triton(w: torch.Tensor, group: int = 128, block_m: int = 32, num_warps: int = 4):
    """(uint8 ``[..., out/2, in]`` packed along the output dim, fp32 scale ``[..., out, in/group]``)."""
    w, m, k = _rows(w)
    packed = torch.empty((*w.shape[:-2], w.shape[-2] // 2, k), dtype=torch.uint8, device=w.device)
    scale = torch.empty((*w.shape[:-1], k // group), dtype=torch.float32, device=w.device)
    if m:
        tiny, huge = _LIMITS[w.dtype]
        grid = (triton.cdiv(m, block_m), k // group)
        _int4_modelopt_kernel[grid](
            w, packed, scale, m, k, tiny, huge, BLOCK_M=block_m, GROUP=group, num_warps=num_warps
        )
    return packed, scale


def matrix_amax_triton(w: torch.Tensor, matrix_dims: int = 2) -> torch.Tensor:
    """fp32 max |w| over the last ``matrix_dims`` dims: shape ``w.shape[:-matrix_dims]``."""
    w = w.detach().contiguous()
    lead = w.shape[: w.dim() - matrix_dims]
    matrices = max(1, lead.numel())
    per_matrix = w.numel() // matrices if w.numel() else 0
    if per_matrix == 0:
        return torch.zeros(lead, dtype=torch.float32, device=w.device)
    block, iters = 2048, 8
    chunks = triton.cdiv(per_matrix, block * iters)
    partial = torch.empty((matrices, chunks), dtype=torch.float32, device=w.device)
    _amax_kernel[(chunks, matrices)](w, partial, per_matrix, chunks, BLOCK=block, ITERS=iters, num_warps=8)
    return partial.amax(dim=1).reshape(lead)

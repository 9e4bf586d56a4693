"""The Triton kernels return exactly the bytes of the pure-torch reference (quantport.formats).

Run on a CUDA GPU (skipped elsewhere). Every output (codes, packed bytes, scales) is compared byte for
byte with the reference computed on the CPU, the definition of the numerics, over random weights of
realistic and extreme magnitudes, 2-D and 3-D (per-expert scales), every weight dtype the kernel takes,
partial tiles, zero blocks and exact rounding ties.
"""

from __future__ import annotations

import pytest
import torch

from quantport import kernels
from quantport.kernels import reference
from quantport.kernels.backends import select

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHAPES = ((256, 512), (3, 96, 320), (2, 64, 2880), (5, 16, 128))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _assert_same(name: str, ours, expected) -> None:
    ours = ours if isinstance(ours, tuple) else (ours,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(ours) == len(expected)
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, i, a.dtype, b.dtype, a.shape, b.shape)
        diff = (_bytes(a) != _bytes(b)).sum().item()
        assert diff == 0, f"{name} output {i}: {diff} of {a.numel()} elements differ"


def _weights(shape, dtype, seed: int) -> torch.Tensor:
    """Gaussian weights with a random power-of-two magnitude per 16-block, plus planted edge blocks."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    lo = -40 if dtype is not torch.float16 else -14
    hi = 30 if dtype is not torch.float16 else 10
    exps = torch.randint(lo, hi, (*shape[:-1], shape[-1] // 16), generator=gen).float()
    w = w * torch.exp2(exps).repeat_interleave(16, dim=-1)
    flat = w.view(-1, shape[-1])
    flat[0, :32] = 0.0  # zero blocks
    flat[1, :16] = -0.0
    ties = torch.tensor([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -0.0])
    flat[2, :16] = ties
    flat[2, 16:32] = torch.tensor([7, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -3.5, -4.5, -5.5, -6.5, 0])
    flat[3, :16] = torch.tensor([448, 1.0625, 1.1875, 3.0625, 0.001953125, 2**-10, 2**-7, 2**-9] * 2)
    flat[4, :128] = torch.randn(128, generator=gen) * 1e-39  # fp32/bf16 subnormals: exact-division fallbacks
    return w.to(dtype)


def _run_both(op: str, function, w: torch.Tensor, **arguments):
    """(Triton on the GPU, reference on the CPU) of ``function(w, **arguments)``."""
    gpu = w.cuda()
    gpu_arguments = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in arguments.items()}
    assert select(op, gpu, **gpu_arguments).name == "triton"
    return function(gpu, **gpu_arguments), function(w, **arguments)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nvfp4_matches_reference(shape, dtype):
    w = _weights(shape, dtype, seed=1)
    amax = reference.matrix_amax(w) if len(shape) == 3 else w.abs().amax().float()
    for global_scale in (amax / 2688, torch.ones_like(amax), amax / 2688 * 0.37, amax / 2688 * 1e-30):
        ours, expected = _run_both("nvfp4", kernels.quantize_nvfp4, w, global_scale=global_scale)
        _assert_same(f"nvfp4 {shape} {dtype}", ours, expected)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("shape", SHAPES)
def test_mxfp4_matches_reference(shape, dtype):
    w = _weights(shape, dtype, seed=2)
    ours, expected = _run_both("mxfp4", kernels.quantize_mxfp4, w)
    _assert_same(f"mxfp4 {shape} {dtype}", ours, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[-1] % 128 == 0])
def test_int4_modelopt_matches_reference(shape, dtype):
    w = _weights(shape, dtype, seed=3)
    ours, expected = _run_both("int4_modelopt", kernels.quantize_int4_modelopt, w, group=128)
    _assert_same(f"int4 {shape} {dtype}", ours, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_per_tensor_matches_reference(shape, dtype):
    w = _weights(shape, dtype, seed=4)
    if dtype is torch.float16:
        w = w.clamp(-60000, 60000)
    amax = reference.matrix_amax(w) if len(shape) == 3 else w.abs().amax().float()
    for scale in (amax / 448, torch.ones_like(amax), amax / 448 * 0.01):
        ours, expected = _run_both("fp8_per_tensor", kernels.quantize_fp8_per_tensor, w, scale=scale)
        _assert_same(f"fp8 {shape} {dtype}", ours, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matrix_amax_matches_reference(shape, dtype):
    w = _weights(shape, dtype, seed=5)
    ours, expected = _run_both("matrix_amax", kernels.matrix_amax, w, matrix_dims=2)
    _assert_same(f"amax {shape} {dtype}", ours, expected)


def test_large_expert_stack_matches_reference():
    """One layer of Qwen3-30B-A3B-shaped experts (gate/up [128, 1536, 2048]), NVFP4 with per-expert scales."""
    w = (torch.randn(128, 1536, 2048, device="cuda") * 0.02).to(torch.bfloat16)
    g = kernels.matrix_amax(w) / 2688
    ours = kernels.quantize_nvfp4(w, g)
    with kernels.use_backend("torch"):
        expected = kernels.quantize_nvfp4(w, g)
    _assert_same("nvfp4 layer", ours, expected)

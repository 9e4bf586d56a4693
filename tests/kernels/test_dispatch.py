"""Kernel dispatch: CPU tensors and unsupported inputs take the pure-torch reference (runs everywhere)."""

from __future__ import annotations

import pytest
import torch

from quantport import kernels
from quantport.formats import fp8, integer, mx, nvfp4
from quantport.kernels.backends import select


def _w(*shape):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)


def test_cpu_tensors_take_the_reference():
    w = _w(2, 32, 64)
    for op, arguments in (("nvfp4", {"global_scale": torch.tensor(0.001)}), ("mxfp4", {}), ("matrix_amax", {})):
        assert select(op, w, **arguments).name == "torch"


def test_ops_equal_the_format_functions_on_cpu():
    w = _w(3, 32, 256)
    amax = w.abs().amax(dim=(-1, -2)).float()
    g = nvfp4.nvfp4_global_scale(amax)
    packed, scale = kernels.quantize_nvfp4(w, g)
    expected = nvfp4.quantize_nvfp4(w, g)
    assert torch.equal(packed, expected[0]) and torch.equal(scale.view(torch.uint8), expected[1].view(torch.uint8))
    assert torch.equal(kernels.matrix_amax(w), amax)
    for a, b in zip(kernels.quantize_mxfp4(w), mx.quantize_mxfp4(w), strict=True):
        assert torch.equal(a, b)
    packed, scale = kernels.quantize_int4_modelopt(w, 128)
    s = integer.int4_group_scales(w, 128)
    assert torch.equal(scale, s)
    assert torch.equal(packed, integer.pack_int4_modelopt(integer.quantize_int4(w, s, 128)))
    per_expert = fp8.fp8_scale_from_amax(amax)
    codes = kernels.quantize_fp8_per_tensor(w, per_expert)
    for e in range(3):
        expected = fp8.quantize_fp8_per_tensor(w[e], per_expert[e])
        assert torch.equal(codes[e].view(torch.uint8), expected.view(torch.uint8))


def test_use_backend_forces_and_rejects_unknown():
    with kernels.use_backend("torch"):
        assert select("nvfp4", _w(16, 16), global_scale=torch.tensor(1.0)).name == "torch"
    with pytest.raises(KeyError), kernels.use_backend("cuda-magic"):
        pass


def test_reference_errors_pass_through():
    with pytest.raises(ValueError):
        kernels.quantize_nvfp4(_w(4, 24), torch.tensor(1.0))
    with pytest.raises(ValueError):
        kernels.quantize_fp8_per_tensor(_w(2, 4, 8), torch.ones(3))

"""Codecs that take expert stacks give, slice for slice, what each matrix alone gives (every byte)."""

from __future__ import annotations

import pytest
import torch

from quantport.schemes import CODECS, quantizes_stacks

STACKING = [scheme for scheme, codec in CODECS.items() if quantizes_stacks(codec)]


def _stack(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 64, 256, generator=gen) * torch.tensor([0.02, 3.0, 1e-4, 1.0]).view(4, 1, 1)
    w[3] = 0.0  # an all-zero expert
    return w.to(dtype)


def test_the_stacking_codecs_are_the_expected_ones():
    assert {s.value for s in STACKING} == {
        "fp8", "nvfp4", "w4a16-nvfp4", "mxfp4", "mxfp8", "w4a16-modelopt", "w8a16-modelopt",
    }  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scheme", STACKING, ids=lambda s: s.value)
def test_stacked_quantization_equals_one_matrix_at_a_time(scheme, dtype):
    codec = CODECS[scheme]
    w = _stack(dtype)
    amax = w.float().abs().amax(dim=(1, 2)) * torch.tensor([1.0, 1.0, 2.0, 1.0])  # one shared (larger) amax
    stacked = codec.quantize_weight(w, amax)
    for e in range(w.shape[0]):
        alone = codec.quantize_weight(w[e], amax[e])
        assert alone and stacked.keys() == alone.keys()
        for key, tensor in alone.items():
            got = stacked[key][e]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, (key, got.shape, tensor.shape)
            assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), (key, e)

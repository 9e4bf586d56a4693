"""Exporting on a CUDA GPU writes the same checkpoint as exporting on the CPU.

Weight quantization on CUDA runs through the Triton kernels (:mod:`quantport.kernels`), which return the
pure-torch reference's CPU bytes; so every weight and weight scale must be bit-identical whichever device
the model sits on. Calibration on the GPU rounds activations differently (cuBLAS vs CPU GEMMs), so input
and KV scales are compared within a tolerance. Run on a CUDA GPU (skipped elsewhere).
"""

from __future__ import annotations

import copy

import pytest
import torch

import quantport
from checkpoint_files import is_activation_scale, load_tensors
from moe_models import tiny_moe
from tiny_models import _tiny_llama, make_calibration_batches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _export_on(model, device: str, recipe: str, out, fmt: str, vocab: int) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).to(device)
    batches = [b.to(device) for b in make_calibration_batches(vocab_size=vocab, n=2)]
    # byte comparison only: GPT-OSS in the ModelOpt format is a known failure in vLLM, written anyway
    quantport.quantize(model, recipe, calib_data=batches, format=fmt, progress=False, allow_check_errors=True)
    quantport.export(model, out, format=fmt, progress=False, allow_check_errors=True)
    return load_tensors(out)


def _assert_same_checkpoint(gpu: dict, cpu: dict) -> None:
    assert cpu and gpu.keys() == cpu.keys()
    for name, expected in cpu.items():
        actual = gpu[name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        if is_activation_scale(name):
            torch.testing.assert_close(actual, expected, rtol=0.02, atol=0, msg=name)
        else:
            same = torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
            assert same, f"{name}: GPU export differs from CPU export"


@pytest.mark.parametrize(
    ("recipe", "fmt"),
    [
        ("fp8", "modelopt"),
        ("nvfp4", "modelopt"),
        ("w4a16", "modelopt"),
        ("mxfp4", "compressed-tensors"),
        ("mxfp8", "modelopt"),
    ],
)
def test_dense_gpu_export_equals_cpu_export(tmp_path, recipe, fmt):
    model = _tiny_llama(seed=3).to(torch.bfloat16)
    cpu = _export_on(model, "cpu", recipe, tmp_path / "cpu", fmt, model.config.vocab_size)
    gpu = _export_on(model, "cuda", recipe, tmp_path / "gpu", fmt, model.config.vocab_size)
    _assert_same_checkpoint(gpu, cpu)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4_text"])
@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
def test_moe_gpu_export_equals_cpu_export(tmp_path, family, recipe):
    model = tiny_moe(family)
    vocab = model.config.get_text_config().vocab_size
    cpu = _export_on(model, "cpu", recipe, tmp_path / "cpu", "modelopt", vocab)
    gpu = _export_on(model, "cuda", recipe, tmp_path / "gpu", "modelopt", vocab)
    _assert_same_checkpoint(gpu, cpu)

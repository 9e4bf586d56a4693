"""Weight sources read onto a CUDA device: the same bytes as on the CPU (checkpoints), deterministic (synthetic)."""

from __future__ import annotations

import time

import pytest
import torch

from quantport.sources import SyntheticSource, TensorInfo, dequantize_fp8_block, model_tensor_infos, open_source
from sources.published_layouts import deepseek_config, write_fp8_checkpoint, write_mxfp4_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("layout", ["fp8-partial-blocks", "fp8-whole-blocks", "mxfp4"])
def test_checkpoint_read_onto_cuda_equals_the_cpu_read(tmp_path, layout):
    if layout == "mxfp4":
        directory, _ = write_mxfp4_checkpoint(tmp_path)
    else:
        directory, _ = write_fp8_checkpoint(tmp_path, divisible=layout == "fp8-whole-blocks")
    with open_source(directory) as source:
        names = list(source.tensors())
        on_gpu = source.read(names, "cuda")
        on_cpu = source.read(names, "cpu")
    for name in names:
        assert on_gpu[name].device.type == "cuda", name
        assert TensorInfo(tuple(on_gpu[name].shape), on_gpu[name].dtype) == source.tensors()[name]
        assert torch.equal(bits(on_gpu[name].cpu()), bits(on_cpu[name])), name


def test_synthetic_on_cuda_is_deterministic_and_dequantized_as_on_the_cpu():
    infos = model_tensor_infos(deepseek_config(divisible=False))
    names = ["model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.experts.2.up_proj.weight"]
    source = SyntheticSource(infos, seed=11, fp8_block=True)
    first = source.read(names, torch.device("cuda"))
    second = SyntheticSource(infos, seed=11, fp8_block=True).read(names, "cuda:0")
    other = SyntheticSource(infos, seed=12, fp8_block=True).read(names, "cuda")
    for name in names:
        assert first[name].device.type == "cuda"
        assert torch.equal(bits(first[name]), bits(second[name])), name
        assert not torch.equal(first[name], other[name]), name
        codes, scale_inv = source.fp8_parts(name, "cuda")
        on_cpu = dequantize_fp8_block(codes.cpu(), scale_inv.cpu(), torch.bfloat16)
        assert torch.equal(bits(first[name].cpu()), bits(on_cpu)), name
        assert abs(first[name].float().std().item() - 0.02) < 0.002


def test_synthetic_fp8_generation_is_fast_on_the_gpu():
    """One DeepSeek-V3 routed-expert set (3 x 2048 x 7168 x 32 experts, 1.4B parameters), FP8-block, in well
    under a second (the 671B model is about 480 such sets)."""
    infos = {
        f"e.{i}.{p}.weight": TensorInfo((7168, 2048) if p == "down_proj" else (2048, 7168), torch.bfloat16)
        for i in range(32)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    source = SyntheticSource(infos, fp8_block=True, quantized=lambda name, info: True)
    source.read(list(infos)[:3], "cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for name in infos:
        source.read([name], "cuda")
    torch.cuda.synchronize()
    assert time.perf_counter() - start < 1.0

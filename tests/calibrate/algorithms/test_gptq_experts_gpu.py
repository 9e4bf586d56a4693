"""GPTQ on MoE experts with the model on a GPU: the Hessians are taken there, the exported checkpoint loads
back (on the same GPU) to the logits of the simulation of the quantized model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantport
from moe_models import tiny_moe
from quantport.algorithm_options import GptqOptions
from quantport.arch.experts import find_moe_blocks
from quantport.loader import load
from quantport.state import state_of
from tiny_models import make_calibration_batches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text"])
def test_gptq_experts_on_gpu_export_and_load_back(tmp_path, family):
    # saved and read back first, as the CPU test does: the loaded checkpoint has the dtype of the saved config,
    # so the in-memory model must have it too (built from the config it kept fp32 and differed in 1% of logits)
    tiny = tiny_moe(family)
    tiny.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype="auto").eval().cuda()
    original = {b.experts_name: b.experts.down_proj.detach().clone() for b in find_moe_blocks(model)}
    batches = [b.cuda() for b in make_calibration_batches(vocab_size=256)[:2]]
    quantport.quantize(model, "nvfp4", batches, progress=False, algorithm=GptqOptions(expert_chunk=3))
    assert not state_of(model).left_at_rtn
    for block in find_moe_blocks(model):
        assert block.experts.down_proj.is_cuda
        assert not torch.equal(block.experts.down_proj, original[block.experts_name])
    out = quantport.export(model, tmp_path / "out", progress=False)
    with torch.no_grad(), quantport.simulate(model):
        expected = model(batches[0]).logits.float().cpu()
    loaded = load(out, simulate_activations=True, device="cuda")
    with torch.no_grad():
        got = loaded(batches[0]).logits.float().cpu()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)

"""AWQ on the experts' down_proj inputs: intermediates, choices and folding that keeps the model's function."""

from __future__ import annotations

import pytest
import torch

from moe_models import tiny_moe
from quantport.algorithm_options import AwqOptions
from quantport.arch.experts import find_moe_blocks
from quantport.calibrate.algorithms.expert_down import awq_expert_down, expert_intermediate
from quantport.calibrate.algorithms.folding import fold_expert_down
from quantport.calibrate.algorithms.routing import Routing
from quantport.recipes import get_recipe
from quantport.schemes import codec_for
from tiny_models import make_calibration_batches


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(b).logits.float() for b in batches])


def test_intermediate_is_act_of_gate_times_up():
    gate = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    up = torch.tensor([[3.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([[1.0, -1.0]])
    h = expert_intermediate(gate, up, torch.relu, x)
    # gate x = [1, -2] -> relu [1, 0]; up x = [2, 0]
    assert torch.equal(h, torch.tensor([[2.0, 0.0]]))


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text", "mixtral"])
def test_folding_expert_down_scales_keeps_fp32_logits(family):
    model = tiny_moe(family).float().eval()
    batches = make_calibration_batches(vocab_size=256, n=1)
    before = _logits(model, batches)
    generator = torch.Generator().manual_seed(0)
    for block in find_moe_blocks(model):
        experts, inter = block.num_experts, block.layout.down(block.experts.down_proj).shape[-1]
        fold_expert_down(block, torch.exp(torch.randn(experts, inter, generator=generator) * 0.5))
    after = _logits(model, batches)
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())


def test_fold_expert_down_divides_up_rows_and_multiplies_down_columns():
    model = tiny_moe("qwen3_moe").float()
    block = next(find_moe_blocks(model))
    layout = block.layout
    gate_up, down = block.experts.gate_up_proj.detach().clone(), block.experts.down_proj.detach().clone()
    scales = torch.ones(block.num_experts, layout.down(down).shape[-1])
    scales[1, 3] = 4.0
    fold_expert_down(block, scales)
    new_up, new_down = layout.up(block.experts.gate_up_proj), layout.down(block.experts.down_proj)
    assert torch.equal(new_up[1, 3], layout.up(gate_up)[1, 3] / 4)
    assert torch.equal(new_down[1][:, 3], layout.down(down)[1][:, 3] * 4)
    assert torch.equal(layout.gate(block.experts.gate_up_proj), layout.gate(gate_up))
    assert torch.equal(new_up[0], layout.up(gate_up)[0])


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text"])
def test_awq_expert_down_never_loses_to_scale_one_and_skips_unreached_experts(family):
    model = tiny_moe(family)
    block = next(find_moe_blocks(model))
    codec = codec_for(get_recipe("nvfp4").scheme)  # 16-input blocks: the tiny experts' 32 intermediates fit
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=generator).to(torch.bfloat16)
    experts = block.num_experts
    indices = (torch.arange(64) % (experts - 1))[:, None]  # the last expert gets no token
    routing = Routing(indices, torch.full((64, 1), 0.5), weighs_input=family == "llama4_text")
    chosen = awq_expert_down(codec, block, routing, x, AwqOptions())
    assert chosen.choices[-1] is None and torch.equal(chosen.scales[-1], torch.ones_like(chosen.scales[-1]))
    for choice in chosen.choices[:-1]:
        assert choice is not None and choice.error <= choice.error_unscaled


def test_row_weights_scale_each_token_error_by_the_square_of_its_weight():
    """Two tokens, one reader: a token of weight 2 counts 4 times in the scored error (hand-computed)."""
    from quantport.calibrate.algorithms.awq import Reader, _Scorer

    codec = codec_for(get_recipe("w4a16").scheme)
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    ones = torch.ones(128)
    plain = _Scorer(codec, x, [Reader(w)])
    first, second = _Scorer(codec, x[:1], [Reader(w)]).error(ones), _Scorer(codec, x[1:], [Reader(w)]).error(ones)
    assert plain.error(ones) == pytest.approx(first + second, rel=1e-5)
    weighted = _Scorer(codec, x, [Reader(w, torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))])
    assert weighted.error(ones) == pytest.approx(first + 4 * second, rel=1e-3)


def test_quantize_folds_every_reached_experts_down_scale_keeping_the_function():
    import quantport
    from quantport.state import state_of

    model = tiny_moe("qwen3_moe")
    batches = make_calibration_batches(vocab_size=256)
    quantport.quantize(model, "nvfp4", batches, progress=False, algorithm="awq")
    smoothing = state_of(model).smoothing
    assert smoothing["output_change"] < 0.05  # folding alone (bf16 rounding), before quantization
    for layer in (0, 1):
        for expert in range(4):
            key = f"model.layers.{layer}.mlp.experts.{expert}.down_proj"
            assert key in smoothing["folded"] or key in smoothing["skipped"]
    assert any(".experts." in key for key in smoothing["folded"])
    without = tiny_moe("qwen3_moe")
    quantport.quantize(without, "nvfp4", batches, progress=False, algorithm=AwqOptions(fold_expert_down=False))
    assert not any(".experts." in key for key in state_of(without).smoothing["folded"])


def test_clip_experts_never_raises_an_experts_output_error_and_leaves_unreached_experts():
    from quantport.calibrate.algorithms.expert_down import clip_experts

    model = tiny_moe("qwen3_moe")
    block = next(find_moe_blocks(model))
    layout, codec = block.layout, codec_for(get_recipe("nvfp4").scheme)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    routing = Routing((torch.arange(64) % 3)[:, None], torch.ones(64, 1))  # expert 3 gets no token
    before_gate_up, before_down = block.experts.gate_up_proj.detach().clone(), block.experts.down_proj.detach().clone()

    def gate_up_error(gate_up, expert):
        w = torch.cat([layout.gate(gate_up)[expert], layout.up(gate_up)[expert]])
        q = codec.dequantize_weight(codec.quantize_weight(w, w.float().abs().amax()), w.dtype).float()
        rows = routing.tokens(expert)[0]
        return float(
            (
                x[rows].float()
                @ (q - torch.cat([layout.gate(before_gate_up), layout.up(before_gate_up)], 1)[expert].float()).T
            )
            .square()
            .sum()
        )

    assert clip_experts(codec, block, routing, x, AwqOptions(clip=True)) == 3
    for expert in range(3):
        assert gate_up_error(block.experts.gate_up_proj.detach(), expert) <= gate_up_error(before_gate_up, expert)
    assert torch.equal(block.experts.gate_up_proj[3], before_gate_up[3])
    assert torch.equal(block.experts.down_proj[3], before_down[3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_expert_scales_and_clipping_reach_the_same_experts():
    import quantport
    from quantport.state import state_of

    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_moe("qwen3_moe").to(device)
        batches = [b.to(device) for b in make_calibration_batches(vocab_size=256)]
        quantport.quantize(model, "nvfp4", batches, progress=False, algorithm="awq")
        results[device] = state_of(model).smoothing
    cpu, gpu = results["cpu"], results["cuda"]
    assert set(cpu["folded"]) == set(gpu["folded"]) and cpu["clipped_experts"] == gpu["clipped_experts"]
    assert gpu["clipped_experts"] and gpu["output_change"] < 0.1

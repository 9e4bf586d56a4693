"""AWQ and SmoothQuant in quantize(): the scale choices, and checkpoints that load back to the simulated model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantport
from checkpoint_files import load_tensors
from moe_models import tiny_moe
from quantport.algorithm_options import AwqOptions, GptqOptions, SmoothQuantOptions, algorithm_options
from quantport.calibrate.algorithms.awq import Reader, awq_clipped_weight, awq_scale
from quantport.calibrate.algorithms.smoothquant import smoothquant_scale
from quantport.errors import InvalidArgumentError
from quantport.loader import load
from quantport.modules.quant_linear import QuantLinear
from quantport.recipes import get_recipe
from quantport.schemes import codec_for
from quantport.state import state_of
from tiny_models import make_calibration_batches

CASES = [
    ("w4a16", "awq"),
    ("w4a16", AwqOptions(clip=True, then=GptqOptions())),
    ("nvfp4", "smoothquant"),
    ("int8", "smoothquant"),
    ("fp8", "smoothquant+gptq"),
]


def _as_loaded(model, directory):
    copy.deepcopy(model).save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()


def _round_trip(model, recipe, algorithm, batches, directory):
    quantport.quantize(model, recipe, batches, progress=False, algorithm=algorithm)
    out = quantport.export(model, directory, progress=False)  # the checker runs on it before it is kept
    loaded = load(out, simulate_activations=True)
    with torch.no_grad(), quantport.simulate(model):
        expected = model(batches[0]).logits
    with torch.no_grad():
        assert torch.equal(loaded(batches[0]).logits, expected)
    return out


@pytest.mark.parametrize(("recipe", "algorithm"), CASES, ids=lambda v: str(getattr(v, "name", v)))
def test_round_trip_gives_the_simulated_model(tmp_path, tiny_model, calib_batches, recipe, algorithm):
    model = _as_loaded(tiny_model("llama"), tmp_path / "base")
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    out = _round_trip(model, recipe, algorithm, calib_batches, tmp_path / "out")
    state = state_of(model)
    name = algorithm_options(algorithm).name
    assert state.algorithm == name and state.smoothing["skipped"] == {}
    assert len(state.smoothing["folded"]) == 8  # norm -> q/k/v, v -> o, norm -> gate/up, up -> down; 2 layers
    assert state.smoothing["output_change"] < 0.05  # bf16 rounding of the folded weights only
    if name.startswith("smoothquant"):  # SmoothQuant always moves the norm; AWQ may keep scale 1 on a random model
        assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    report = json.loads((out / "quantport_report.json").read_text())
    assert report["algorithm"] == name and report["left_at_round_to_nearest"] == {}
    assert report["smoothing"]["folded"] == state.smoothing["folded"]
    plain = tiny_model("llama")
    quantport.quantize(plain, recipe, calib_batches, progress=False)
    reference = load_tensors(quantport.export(plain, tmp_path / "max", progress=False))
    tensors = load_tensors(out)
    assert sorted(tensors) == sorted(reference)  # the scales are folded: no new tensor in the checkpoint
    assert all(tensors[k].shape == reference[k].shape and tensors[k].dtype == reference[k].dtype for k in tensors)


def test_moe_experts_share_the_norm_scale_and_routing_is_reported(tmp_path):
    model = _as_loaded(tiny_moe("qwen3_moe"), tmp_path / "base")  # hidden size 64: NVFP4's 16-input blocks fit
    batches = make_calibration_batches(vocab_size=256)
    _round_trip(model, "nvfp4", "awq", batches, tmp_path / "out")
    state = state_of(model)
    assert state.left_at_rtn == {}  # the scales reach the experts: none is left at plain round to nearest
    norms = [f"model.layers.{i}.post_attention_layernorm" for i in (0, 1)]
    assert set(norms) <= set(state.smoothing["folded"])
    assert set(state.smoothing["routing_flips"]) == set(norms)
    assert all(0 <= f <= 0.1 for f in state.smoothing["routing_flips"].values())


def test_awq_finds_the_outlier_channels_and_never_loses_to_no_scale():
    codec = codec_for(get_recipe("w4a16").scheme)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=generator)
    x[:, :4] *= 30  # four salient input channels
    w = (torch.randn(64, 128, generator=generator) * 0.05).to(torch.bfloat16)
    choice = awq_scale(codec, x, x.abs().mean(dim=0), [Reader(w)], AwqOptions())
    assert choice.alpha is not None and choice.alpha > 0
    assert choice.error < 0.8 * choice.error_unscaled
    assert float(choice.scale[:4].min()) > float(choice.scale[4:].max())  # the salient channels are scaled up
    flat = torch.ones(256, 128)  # no salient channel: scale 1 (or an equally good one) is kept
    assert awq_scale(codec, flat, flat.mean(dim=0), [Reader(w)], AwqOptions()).error <= choice.error_unscaled


def test_awq_clipping_never_raises_the_output_error():
    codec = codec_for(get_recipe("w4a16").scheme)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(128, 256, generator=generator)
    w = torch.randn(32, 256, generator=generator).to(torch.bfloat16)
    w[0, 5] = 8.0  # an outlier weight that stretches its group's scale
    amax = w.float().abs().amax()

    def error(weight):
        decoded = codec.dequantize_weight(codec.quantize_weight(weight, amax), torch.bfloat16).float()
        return float((x @ (decoded - w.float()).T).square().sum())

    clipped = awq_clipped_weight(codec, w, amax, x, AwqOptions(clip=True))
    assert error(clipped) <= error(w)
    assert clipped.abs().amax() <= w.abs().amax()


def test_smoothquant_scale_balances_the_ranges():
    x_max = torch.tensor([16.0, 1.0, 0.0])
    w = torch.tensor([[1.0, 4.0, 2.0], [0.5, 1.0, 1.0]])
    scale = smoothquant_scale(x_max, [w], 0.5)
    assert torch.allclose(scale[:2], torch.tensor([4.0, 0.5]))
    assert scale[2] == 1  # a channel that never fired keeps scale 1
    assert torch.allclose(smoothquant_scale(x_max, [w], 1.0)[:2], x_max[:2])


def test_options_and_combinations():
    assert algorithm_options("awq+gptq") == AwqOptions(then=GptqOptions())
    assert algorithm_options("smoothquant+gptq").name == "smoothquant+gptq"
    assert AwqOptions().alphas() == tuple(i / 10 for i in range(11))
    with pytest.raises(InvalidArgumentError, match="choose one of: awq\\+gptq, smoothquant\\+gptq"):
        algorithm_options("gptq+awq")
    with pytest.raises(InvalidArgumentError, match="alpha must be in"):
        SmoothQuantOptions(alpha=1.5)
    with pytest.raises(InvalidArgumentError, match="grid"):
        AwqOptions(grid=0)


def test_folding_reaches_layers_left_unquantized_without_changing_them(tiny_model, calib_batches):
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    quantport.quantize(model, "w4a16", calib_batches, progress=False, algorithm="smoothquant", exclude=["*mlp*"])
    assert not isinstance(model.model.layers[0].mlp.gate_proj, QuantLinear)
    skipped = state_of(model).smoothing["skipped"]
    assert skipped["model.layers.0.post_attention_layernorm"] == "none of its readers is quantized"
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, base.model.layers[0].mlp.gate_proj.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# nvfp4 for both: the tiny MoE's 64-wide inputs have nothing w4a16 (128-input groups) can quantize
@pytest.mark.parametrize(("recipe", "algorithm"), [("nvfp4", "awq"), ("nvfp4", "smoothquant")])
def test_on_the_gpu_folding_matches_the_cpu_choices(recipe, algorithm):
    """The same folding places, and scales within rounding of the CPU's (the GPU's matmuls round differently,
    so AWQ's grid may pick a neighbouring strength: the chosen strengths may differ by one step at most)."""
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_moe("qwen3_moe").to(device)
        batches = [b.to(device) for b in make_calibration_batches(vocab_size=256)]
        quantport.quantize(model, recipe, batches, progress=False, algorithm=algorithm)
        results[device] = state_of(model).smoothing
    cpu, gpu = results["cpu"], results["cuda"]
    assert set(cpu["folded"]) == set(gpu["folded"]) and cpu["skipped"] == gpu["skipped"]
    for place, alpha in cpu["folded"].items():
        other = gpu["folded"][place]
        assert (alpha is None) == (other is None) or abs((alpha or 0) - (other or 0)) <= 0.1 + 1e-9, place
    assert gpu["output_change"] < 0.1

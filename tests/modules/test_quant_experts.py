"""MoE quantization for every family: calibration, dead experts, policies, round trip, coverage."""

from __future__ import annotations

import json

import pytest
import torch

import quantport
from checkpoint_files import load_tensors
from moe_models import EXPERTS, FAMILIES, silence_expert, tiny_moe
from quantport.arch.experts import ExpertNaming, UnsupportedExpertsError, find_moe_blocks, layout_for
from quantport.check import check_checkpoint
from quantport.dialects.modelopt import pieces_of
from quantport.errors import InvalidArgumentError
from quantport.modules.quant_experts import experts_quantizer_of
from quantport.modules.quant_linear import QuantMode
from quantport.state import set_mode, state_of
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=256)
DEAD = 2


def _logits(model, ids):
    target = getattr(model, "language_model", model)
    with torch.no_grad():
        return target(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_forward_matches_the_model(family):
    model = tiny_moe(family)
    reference = _logits(model, BATCHES[0])
    quantport.quantize(model, "fp8", BATCHES, progress=False)
    set_mode(model, QuantMode.CALIBRATE)
    calibrated = _logits(model, BATCHES[0])
    set_mode(model, QuantMode.OFF)
    torch.testing.assert_close(calibrated, reference, rtol=2e-2, atol=2e-2)


def _per_expert_scales(tensors, block, layout, suffix):
    """{(expert, leaf): value} for per-expert names; fused names give one value for every expert."""
    values = {}
    for expert in range(EXPERTS):
        for leaf in layout.leaf_names:
            if layout.naming is ExpertNaming.FUSED:
                fused = "down_proj" if leaf == layout.leaf_names[2] else "gate_up_proj"
                key = f"{block}.experts.{fused}_{suffix}"
            else:
                key = f"{block}.experts.{expert}.{leaf}.{suffix}"
            values[(expert, leaf)] = tensors.get(key)
    return values


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dead_expert_and_one_token_calibration(tmp_path, family, recipe):
    model = tiny_moe(family)
    silence_expert(model, DEAD)
    quantport.quantize(model, recipe, [torch.tensor([[17]])], progress=False)
    state = state_of(model)
    for layer in state.coverage.layers:
        assert DEAD in layer.dead_experts and layer.tokens[DEAD] == 0
    # GPT-OSS in ModelOpt: a known failure in vLLM (arch/engines.py), written for the numerics
    quantport.export(model, tmp_path / "out", progress=False, allow_check_errors=family == "gpt_oss")
    report = json.loads((tmp_path / "out" / "quantport_report.json").read_text())
    assert all(DEAD in dead for dead in report["coverage"]["experts_without_tokens"].values())
    check = check_checkpoint(tmp_path / "out")
    allowed = {"engine.known-failure"} if family == "gpt_oss" else set()  # vLLM cannot load it: the checker says so
    assert {f.rule for f in check.errors} <= allowed, [str(f) for f in check.errors]

    tensors = load_tensors(tmp_path / "out")
    blocks = list(find_moe_blocks(model))
    hub = {b.name: b.name.replace(".mlp", ".block_sparse_moe") if family == "mixtral" else b.name for b in blocks}
    for block in blocks:
        layout = block.layout
        scale_names = ["input_scale", "weight_scale"] + (["weight_scale_2"] if recipe == "nvfp4" else [])
        for suffix in scale_names:
            values = _per_expert_scales(tensors, hub[block.name], layout, suffix)
            for (expert, leaf), value in values.items():
                assert value is not None, (block.name, expert, leaf, suffix)
                assert torch.isfinite(value.float()).all() and (value.float() > 0).all(), (expert, leaf, suffix)
            gate, up = layout.leaf_names[:2]
            for expert in range(EXPERTS):
                if suffix != "weight_scale" or recipe == "fp8":  # NVFP4 block scales differ by design
                    assert torch.equal(values[(expert, gate)], values[(expert, up)]), (expert, suffix)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_exported_experts_decode_to_the_simulated_weights(tmp_path, family):
    model = tiny_moe(family)
    quantport.quantize(model, "nvfp4", BATCHES, progress=False)
    # GPT-OSS in ModelOpt: a known failure in vLLM (arch/engines.py), written for the numerics
    quantport.export(model, tmp_path / "out", progress=False, allow_check_errors=family == "gpt_oss")
    tensors = load_tensors(tmp_path / "out")
    for block in find_moe_blocks(model):
        quantizer = experts_quantizer_of(block.experts)
        simulated = quantizer.simulated_parameters()
        codec, layout = quantizer.codec, block.layout
        if layout.naming is ExpertNaming.FUSED:
            prefix = f"{block.experts_name}.down_proj"
            packed = tensors[prefix].transpose(-1, -2) if layout.transposed else tensors[prefix]
            scale = tensors[f"{prefix}_weight_scale"]
            scale = scale.transpose(-1, -2) if layout.transposed else scale
            decoded = codec.dequantize_weight(
                pieces_of(
                    {"weight": packed, "weight_scale": scale, "weight_scale_2": tensors[f"{prefix}_weight_scale_2"]}
                ),
                torch.bfloat16,
            )
            assert torch.equal(layout.unorient_down(decoded), simulated["down"])
            continue
        hub = block.experts_name.replace(".mlp.", ".block_sparse_moe.") if family == "mixtral" else block.experts_name
        gates, ups, downs = [], [], []
        for expert in range(EXPERTS):
            decoded = []
            for leaf in layout.leaf_names:
                prefix = f"{hub}.{expert}.{leaf}"
                exported = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
                decoded.append(codec.dequantize_weight(pieces_of(exported), torch.bfloat16))
            gates.append(decoded[0])
            ups.append(decoded[1])
            downs.append(decoded[2])
        assert torch.equal(layout.fuse(torch.stack(gates), torch.stack(ups)), simulated["gate_up"])
        assert torch.equal(layout.unorient_down(torch.stack(downs)), simulated["down"])


def test_per_expert_policy_fills_dead_experts_from_siblings():
    model = tiny_moe("qwen3_moe")
    silence_expert(model, DEAD)
    quantport.quantize(model, "fp8", BATCHES, moe_input_scales="per-expert", progress=False)
    for block in find_moe_blocks(model):
        quantizer = experts_quantizer_of(block.experts)
        for projection, observed in quantizer.input_amax.items():
            exported = quantizer.export_input_amax[projection]
            assert observed[DEAD] == 0
            assert exported[DEAD] == observed.max()
            alive = [e for e in range(EXPERTS) if e != DEAD]
            assert torch.equal(exported[alive], observed[alive])
            if projection == "down":  # the down input differs per expert: really per expert
                assert len(set(exported[alive].tolist())) > 1


def test_shared_policy_is_the_layer_max():
    model = tiny_moe("mixtral")
    quantport.quantize(model, "nvfp4", BATCHES, progress=False)
    for block in find_moe_blocks(model):
        quantizer = experts_quantizer_of(block.experts)
        for projection, observed in quantizer.input_amax.items():
            assert torch.equal(quantizer.export_input_amax[projection], observed.max().expand(EXPERTS))


@pytest.mark.parametrize(("family", "policy"), [("qwen3_moe", "per-expert"), ("gpt_oss", "shared")])
def test_all_experts_calibration_sees_every_expert_and_keeps_the_output(family, policy):
    model = tiny_moe(family)
    silence_expert(model, DEAD)
    reference = _logits(model, BATCHES[0])
    quantport.quantize(model, "fp8", BATCHES[:1], moe_calib="all-experts", moe_input_scales=policy, progress=False)
    for block in find_moe_blocks(model):
        quantizer = experts_quantizer_of(block.experts)
        assert quantizer.tokens[DEAD] == 0  # routing is real
        assert (quantizer.input_amax["down"] > 0).all() and (quantizer.input_amax["gate_up"] > 0).all()
    set_mode(model, QuantMode.CALIBRATE)
    torch.testing.assert_close(_logits(model, BATCHES[0]), reference, rtol=2e-2, atol=2e-2)


def test_all_experts_is_refused_for_llama4():
    with pytest.raises(InvalidArgumentError, match="all-experts is not available for llama4_text"):
        quantport.quantize(tiny_moe("llama4_text"), "fp8", BATCHES, moe_calib="all-experts", progress=False)


def test_simulation_stays_close_to_bf16():
    model = tiny_moe("qwen3_moe")
    reference = _logits(model, BATCHES[0]).float()
    quantport.quantize(model, "fp8", BATCHES, progress=False)
    with quantport.simulate(model):
        simulated = _logits(model, BATCHES[0]).float()
    assert 0 < ((simulated - reference).norm() / reference.norm()).item() < 0.1


def test_unclassifiable_experts_are_a_clear_error():
    class OddExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down_proj = torch.nn.Parameter(torch.zeros(4, 8, 8))

    with pytest.raises(UnsupportedExpertsError, match="OddExperts.*ExpertLayout"):
        layout_for("odd_moe", OddExperts())


def test_structural_detection_of_an_undescribed_family():
    model = tiny_moe("qwen3_moe")
    layout = layout_for("brand_new_moe", model.model.layers[0].mlp.experts)
    assert layout.family == "brand_new_moe (structural)" and not layout.transposed and not layout.has_bias


def test_llama4_attention_gets_no_block_scales():
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(__file__).resolve().parents[3] / "shared" / "models" / "llama4_tiny"
    if not path.is_dir():
        pytest.skip("../shared/models/llama4_tiny is not available")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    quantport.quantize(model, "fp8-block", progress=False)
    excluded = state_of(model).excluded
    assert "rotary" in excluded["model.layers.0.self_attn.q_proj"]
    assert "model.layers.0.self_attn.v_proj" in excluded  # fused with q/k
    assert "model.layers.0.self_attn.o_proj" not in excluded
    assert "model.layers.0.feed_forward.experts" not in excluded


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_modelopt_format_refuses_experts_engines_cannot_read(tmp_path, family):
    from quantport.export.targets import UnsupportedFormatError

    model = tiny_moe(family)
    quantport.quantize(model, "fp8-dynamic", BATCHES, progress=False)  # per-channel experts
    with pytest.raises(UnsupportedFormatError, match="compressed-tensors"):
        quantport.export(model, tmp_path / "out", format="modelopt", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "mixtral"])
@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
def test_expert_chunks_do_not_change_the_checkpoint(tmp_path, monkeypatch, family, recipe):
    """Experts quantized in one stack, in stacks of two, or one by one: the same bytes on disk."""
    from quantport.export import expert_tensors
    from quantport.modules import expert_weights

    model = tiny_moe(family)
    quantport.quantize(model, recipe, make_calibration_batches(vocab_size=256, n=2), progress=False)
    block = next(iter(find_moe_blocks(model)))
    per_expert_fp32 = 4 * (block.experts.gate_up_proj[0].numel() + block.experts.down_proj[0].numel())
    outputs = {}
    for label, budget in (("all", 1 << 40), ("two", 2 * per_expert_fp32), ("one", 1)):
        monkeypatch.setattr(expert_weights, "STACK_BYTES", budget)
        chunks = expert_tensors.expert_chunks(experts_quantizer_of(block.experts))
        assert len(chunks) == {"all": 1, "two": EXPERTS // 2, "one": EXPERTS}[label]
        written = quantport.export(model, tmp_path / label, progress=False, allow_check_errors=family == "gpt_oss")
        outputs[label] = load_tensors(written)
    for label in ("two", "one"):
        assert outputs[label].keys() == outputs["all"].keys()
        for name, tensor in outputs["all"].items():
            same = torch.equal(outputs[label][name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
            assert same, (label, name)


def test_each_expert_chunk_is_quantized_once_per_export(tmp_path, monkeypatch):
    """Twelve experts in chunks of five: the export quantizes three chunks per layer, not one per
    change of expert in the file's tensor order (``experts.1``, ``experts.10``, ``experts.11``, ...)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from quantport.modules import expert_weights

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        moe_intermediate_size=32,
        intermediate_size=64,
        num_experts=12,
        num_experts_per_tok=2,
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    quantport.quantize(model, "fp8", make_calibration_batches(vocab_size=256, n=1), progress=False)
    block = next(iter(find_moe_blocks(model)))
    per_expert_fp32 = 4 * (block.experts.gate_up_proj[0].numel() + block.experts.down_proj[0].numel())
    monkeypatch.setattr(expert_weights, "STACK_BYTES", 5 * per_expert_fp32)
    calls = []

    def counting(original):
        def counted(block, codec, weight_amax, experts, *args):
            calls.append((block.experts_name, experts))
            return original(block, codec, weight_amax, experts, *args)

        return counted

    # a chunk is quantized as stacks (its tensors written as one run), or per expert where a shard holds one alone
    for name in ("quantize_expert_range", "quantize_expert_stacks"):
        monkeypatch.setattr(expert_weights, name, counting(getattr(expert_weights, name)))
    quantport.export(model, tmp_path / "out", progress=False)
    chunks = (range(0, 5), range(5, 10), range(10, 12))
    expected = [(f"model.layers.{layer}.mlp.experts", chunk) for layer in range(2) for chunk in chunks]
    assert sorted(calls, key=str) == sorted(expected, key=str)

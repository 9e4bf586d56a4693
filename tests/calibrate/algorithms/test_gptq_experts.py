"""GPTQ on MoE experts: per-expert Hessians from routed tokens, the low-token policy (always named), the
exported checkpoint loading back to the simulated logits, and a lower layer error than round-to-nearest."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import quantport
from moe_models import silence_expert, tiny_moe
from quantport.algorithm_options import ExpertGptqPolicy, GptqOptions
from quantport.arch.experts import ForwardContract, find_moe_blocks
from quantport.calibrate.algorithms.expert_hessians import ExpertHessianObserver, expert_chunk_size
from quantport.errors import InvalidArgumentError
from quantport.loader import load
from quantport.modules.quant_experts import experts_quantizer_of
from quantport.state import state_of
from tiny_models import make_calibration_batches

ATTENTION = ["*self_attn*"]  # only the experts (and dense MLPs) are quantized: keeps these tests fast


@pytest.fixture(autouse=True)
def _one_thread():
    """GPTQ's column loop makes many small calls: on a shared machine, extra threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(count: int = 2):
    return make_calibration_batches(vocab_size=256)[:count]


def _capture_inputs(block):
    """Pre-hook recording every call's arguments of the experts module."""
    calls = []

    def record(module, args, kwargs):
        calls.append((args, kwargs))

    return calls, block.experts.register_forward_pre_hook(record, with_kwargs=True)


def _direct(block, calls, expert):
    """X^T X / n of the expert's routed rows and of its intermediate, computed here from the layout's own pieces."""
    layout, experts = block.layout, block.experts
    gate_up = experts.gate_up_proj[expert].detach()
    if layout.transposed:  # Llama 4: [H, 2I], gate first
        gate_w, up_w = gate_up[:, : gate_up.shape[1] // 2].T, gate_up[:, gate_up.shape[1] // 2 :].T
    else:  # [2I, H], gate first
        gate_w, up_w = gate_up[: gate_up.shape[0] // 2], gate_up[gate_up.shape[0] // 2 :]
    rows = []
    for args, kwargs in calls:
        hidden = args[0]
        if layout.contract is ForwardContract.DENSE_ROUTED:
            x = hidden.view(block.num_experts, -1, hidden.shape[-1])[expert]
            rows.append(x[x.abs().sum(dim=-1) > 0])
        else:
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            rows.append(hidden[(index == expert).any(dim=-1)])
    x = torch.cat(rows)
    h = F.silu(x @ gate_w.T) * (x @ up_w.T)
    x, h = x.float(), h.float()
    return x.shape[0], x.T @ x / x.shape[0], h.T @ h / h.shape[0]


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text"])
def test_expert_hessians_equal_a_direct_computation_from_routed_tokens(family):
    model = tiny_moe(family)
    blocks = list(find_moe_blocks(model))
    observer = ExpertHessianObserver.for_blocks(blocks)
    calls, handle = _capture_inputs(blocks[0])
    observer.attach(range(1, 3))  # a chunk: experts 1 and 2 only
    with torch.no_grad():
        for batch in _batches():
            model(batch)
    observer.detach()
    handle.remove()
    hessians = observer.modules[blocks[0].experts_name]
    assert sorted(hessians.routed) == [1, 2]
    for expert in (1, 2):
        tokens, gate_up, down = _direct(blocks[0], calls, expert)
        assert tokens > 0 and hessians.routed[expert]["gate_up"].tokens == tokens
        assert hessians.routed[expert]["down"].tokens == tokens
        torch.testing.assert_close(hessians.routed[expert]["gate_up"].hessian(), gate_up, rtol=1e-4, atol=1e-6)
        scale = float(down.abs().max())
        torch.testing.assert_close(hessians.routed[expert]["down"].hessian(), down, rtol=2e-2, atol=2e-2 * scale)


def test_chunk_size_fits_the_budget_or_the_option():
    blocks = list(find_moe_blocks(tiny_moe("qwen3_moe")))
    assert expert_chunk_size(blocks, 0, all_tokens=False) == 4  # tiny Hessians: every expert at once
    assert expert_chunk_size(blocks, 3, all_tokens=False) == 3 and expert_chunk_size(blocks, 9, False) == 4


def _quantize(model, options, recipe="nvfp4"):
    return quantport.quantize(model, recipe, _batches(), progress=False, algorithm=options, exclude=ATTENTION)


def test_low_token_experts_are_named_by_each_policy(tmp_path):
    names = {}
    for policy in ExpertGptqPolicy:
        model = tiny_moe("qwen3_moe")
        silence_expert(model, 1)
        options = GptqOptions(expert_policy=policy, expert_min_tokens=10_000, expert_chunk=2)  # every expert is "few"
        _quantize(model, options)
        state = state_of(model)
        names[policy] = (dict(state.left_at_rtn), dict(state.algorithm_notes))
        experts = [f"{e}.{i}" for e in state.experts for i in range(4)]
        assert sorted([*state.left_at_rtn, *state.algorithm_notes]) == sorted(experts)  # every expert is named
        if policy is ExpertGptqPolicy.DAMPEN:
            out = quantport.export(model, tmp_path / "out", progress=False)
            report = json.loads((out / "quantport_report.json").read_text())
            assert report["left_at_round_to_nearest"] == state.left_at_rtn
            assert report["algorithm_notes"] == state.algorithm_notes
    rtn, notes = names[ExpertGptqPolicy.RTN]
    assert not notes and all("--gptq-expert-policy rtn" in why for why in rtn.values())
    rtn, notes = names[ExpertGptqPolicy.DAMPEN]
    assert sorted(rtn) == ["model.layers.0.mlp.experts.1", "model.layers.1.mlp.experts.1"]  # no token: no Hessian
    assert all("dampening raised" in why for why in notes.values())
    rtn, notes = names[ExpertGptqPolicy.ALL_EXPERTS]
    assert not rtn and all("Hessian of all" in why for why in notes.values())


def test_all_experts_policy_is_refused_for_llama4_experts():
    with pytest.raises(InvalidArgumentError, match="all-experts is not available for llama4_text"):
        _quantize(tiny_moe("llama4_text"), GptqOptions(expert_policy="all-experts"))


def _as_loaded(model, directory):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()


@pytest.mark.parametrize(("family", "recipe"), [("qwen3_moe", "nvfp4"), ("llama4_text", "fp8"), ("mixtral", "int8")])
def test_export_check_and_load_give_the_simulated_logits(tmp_path, family, recipe):
    model = _as_loaded(tiny_moe(family), tmp_path / "base")
    original = {b.experts_name: b.experts.gate_up_proj.detach().clone() for b in find_moe_blocks(model)}
    _quantize(model, GptqOptions(expert_chunk=3), recipe)  # two chunks: two calibration forwards
    state = state_of(model)
    assert not state.left_at_rtn
    for block in find_moe_blocks(model):
        assert not torch.equal(block.experts.gate_up_proj, original[block.experts_name])  # GPTQ moved weights
    out = quantport.export(model, tmp_path / "out", progress=False)  # the checker runs before it is kept
    loaded = load(out, simulate_activations=True)
    batch = _batches(1)[0]
    with torch.no_grad(), quantport.simulate(model):
        expected = model(batch).logits
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, expected)


def _experts_error(family, options, recipe="nvfp4"):
    """Mean squared error of the first MoE layer's experts output (simulated) against full precision."""
    model = tiny_moe(family, seed=3)
    block = next(iter(find_moe_blocks(model)))
    calls, handle = _capture_inputs(block)
    with torch.no_grad():
        for batch in _batches():
            model(batch)
    handle.remove()
    with torch.no_grad():
        reference = [block.experts(*a, **k).float() for a, k in calls]
    _quantize(model, options, recipe)
    assert experts_quantizer_of(block.experts) is not None
    with torch.no_grad(), quantport.simulate(model):
        quantized = [block.experts(*a, **k).float() for a, k in calls]
    return float(sum((q - r).square().mean() for q, r in zip(quantized, reference, strict=True)))


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text"])
def test_gptq_on_experts_lowers_the_layer_error_against_round_to_nearest(family):
    rtn = _experts_error(family, GptqOptions(experts=False))
    gptq = _experts_error(family, GptqOptions())
    assert gptq < 0.9 * rtn, (gptq, rtn)

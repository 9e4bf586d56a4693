"""Folding places found from the family names, and folding that keeps the unquantized model's outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_models import tiny_moe
from quantport.calibrate.algorithms.folding import SourceKind, expand_heads, find_fold_targets, fold_scale
from tiny_models import TINY_MODELS, make_calibration_batches


def _model(family):
    return TINY_MODELS[family](0) if family in TINY_MODELS else tiny_moe(family)


def _channels(model, target):
    modules = dict(model.named_modules())
    if target.kind is SourceKind.VALUE_HEADS:
        return modules[target.source].out_features
    if target.linears:
        return modules[target.linears[0]].in_features
    return target.experts.layout.gate(target.experts.experts.gate_up_proj).shape[-1]


def _fold_everything(model, seed=0):
    """Fold a random log-normal scale (factors of about 0.2 to 5) into every folding place."""
    generator = torch.Generator().manual_seed(seed)
    targets = find_fold_targets(model)
    for target in targets:
        assert target.skipped is None, target
        scale = torch.exp(torch.randn(_channels(model, target), generator=generator) * 0.5)
        fold_scale(model, target, scale)
    return targets


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(b).logits.float() for b in batches])


def test_dense_llama_places():
    targets = {t.name: t for t in find_fold_targets(_model("llama"))}
    layer = "model.layers.0"
    attention = targets[f"{layer}.input_layernorm"]
    assert attention.kind is SourceKind.NORM
    assert attention.linears == tuple(f"{layer}.self_attn.{p}_proj" for p in "qkv")
    heads = targets[f"{layer}.self_attn.o_proj"]
    assert (heads.kind, heads.source, heads.query_groups, heads.head_dim) == (
        SourceKind.VALUE_HEADS,
        f"{layer}.self_attn.v_proj",
        2,
        32,
    )
    mlp = targets[f"{layer}.post_attention_layernorm"]
    assert mlp.linears == (f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj") and mlp.experts is None
    down = targets[f"{layer}.mlp.down_proj"]
    assert (down.kind, down.source) == (SourceKind.LINEAR, f"{layer}.mlp.up_proj")
    assert len(targets) == 8  # 4 places in each of 2 layers


def test_moe_places_share_one_scale_and_compensate_the_router():
    targets = {t.name: t for t in find_fold_targets(_model("llama4_text"))}
    mlp = targets["model.layers.0.post_attention_layernorm"]
    assert mlp.experts is not None and mlp.experts.experts_name == "model.layers.0.feed_forward.experts"
    assert mlp.linears == tuple(f"model.layers.0.feed_forward.shared_expert.{p}_proj" for p in ("gate", "up"))
    assert mlp.compensated == ("model.layers.0.feed_forward.router",) and mlp.top_k == 1
    assert targets["model.layers.0.feed_forward.shared_expert.down_proj"].kind is SourceKind.LINEAR
    qwen = {t.name: t for t in find_fold_targets(_model("qwen3_moe"))}
    assert qwen["model.layers.1.post_attention_layernorm"].compensated == ("model.layers.1.mlp.gate",)
    assert qwen["model.layers.1.post_attention_layernorm"].top_k == 2


def test_value_head_scale_repeats_for_the_query_heads_of_a_kv_head():
    target = next(t for t in find_fold_targets(_model("llama")) if t.kind is SourceKind.VALUE_HEADS)
    scale = torch.arange(64, dtype=torch.float32)  # 2 kv heads x 32
    column = expand_heads(scale, target)
    assert torch.equal(column[:32], scale[:32]) and torch.equal(column[32:64], scale[:32])
    assert torch.equal(column[64:96], scale[32:]) and torch.equal(column[96:], scale[32:])


FAMILIES = ["llama", "qwen3", "qwen3_moe", "llama4_text", "mixtral", "qwen2_moe", "deepseek_v3", "olmoe", "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_keeps_fp32_logits(family):
    """In fp32 folding is exact up to fp32 rounding (relative 2^-24 per product): 1e-5 of the logits' range."""
    model = _model(family).float().eval()
    batches = make_calibration_batches(vocab_size=256, n=1)
    before = _logits(model, batches)
    _fold_everything(model)
    after = _logits(model, batches)
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_folding_in_bf16_costs_about_what_bf16_itself_costs(family):
    """Folded bf16 weights are rounded once more (relative 2^-9 each): the folded bf16 model is as far from the
    fp32 model as the unfolded bf16 model is, within a factor of 2 (a routing flip would exceed it)."""
    reference = _model(family).float().eval()
    batches = make_calibration_batches(vocab_size=256, n=2)
    exact = _logits(reference, batches)
    bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    unfolded_error = (_logits(bf16, batches) - exact).abs().mean()
    _fold_everything(bf16)
    folded_error = (_logits(bf16, batches) - exact).abs().mean()
    assert folded_error <= 2 * unfolded_error, (float(folded_error), float(unfolded_error))


def test_norms_of_one_plus_weight_families_are_not_folded():
    model = _model("llama")
    model.config.model_type = "gemma"
    targets = find_fold_targets(model)
    norms = [t for t in targets if t.kind is SourceKind.NORM]
    assert norms and all("1 + weight" in t.skipped for t in norms)
    assert all(t.skipped is None for t in targets if t.kind is not SourceKind.NORM)

"""One family row: numerics follow ExpertLayout.scales, never the on-disk naming flag; the fused-sibling
table is the one the quantizer and the checker read; routers come from the row."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import quantport
from moe_models import tiny_moe
from quantport.arch import experts as experts_module
from quantport.arch.experts import ExpertNaming, ExpertScales, find_moe_blocks
from quantport.arch.family import FUSED_SIBLINGS
from quantport.export import expert_tensors
from quantport.modules.quant_experts import experts_quantizer_of
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=256)


def _with_naming(monkeypatch, family: str, naming: ExpertNaming) -> None:
    rows = tuple(replace(r, naming=naming) if r.family == family else r for r in experts_module.LAYOUTS)
    monkeypatch.setattr(experts_module, "LAYOUTS", rows)


def _quantized(family: str):
    model = tiny_moe(family)
    quantport.quantize(model, "fp8", BATCHES, progress=False)
    with torch.no_grad(), quantport.simulate(model):
        logits = getattr(model, "language_model", model)(BATCHES[0]).logits
    tensors = []
    for block in find_moe_blocks(model):
        quantizer = experts_quantizer_of(block.experts)
        tensors += [quantizer.weight_amax, quantizer.export_input_amax]
        chunks = expert_tensors.expert_chunks(quantizer)
        tensors += [t for chunk in chunks for t in expert_tensors.quantized_experts(quantizer, chunk)]
    return logits, tensors


def _assert_same(a, b):
    logits_a, tensors_a = a
    logits_b, tensors_b = b
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
    for x, y in zip(tensors_a, tensors_b, strict=True):
        for key in x:
            if isinstance(x[key], dict):
                for suffix in x[key]:
                    assert torch.equal(x[key][suffix], y[key][suffix]), (key, suffix)
            else:
                assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize(
    ("family", "other_naming"), [("gpt_oss", ExpertNaming.PER_EXPERT), ("qwen3_moe", ExpertNaming.FUSED)]
)
def test_numerics_do_not_depend_on_the_naming_flag(monkeypatch, family, other_naming):
    reference = _quantized(family)
    _with_naming(monkeypatch, family, other_naming)
    assert experts_module.layout_for(family, None).naming is other_naming
    _assert_same(_quantized(family), reference)


def test_one_scale_per_projection_unifies_weight_amax_whatever_the_naming(monkeypatch):
    _with_naming(monkeypatch, "gpt_oss", ExpertNaming.PER_EXPERT)
    model = tiny_moe("gpt_oss")
    quantport.quantize(model, "fp8", BATCHES, progress=False)
    for block in find_moe_blocks(model):
        assert block.layout.scales is ExpertScales.ONE_PER_PROJECTION
        amax = experts_quantizer_of(block.experts).weight_amax
        for projection, values in amax.items():
            own = getattr(block.experts, f"{projection}_proj").detach().abs().amax().float()
            assert torch.equal(values, own.expand_as(values)), projection


def test_quantizer_and_checker_read_one_sibling_table():
    from quantport.arch.fused_groups import FUSED_SIBLINGS as quantizer_table
    from quantport.check.structure import ENGINE_FUSED

    assert quantizer_table is FUSED_SIBLINGS
    assert {g.fused: g.members for g in FUSED_SIBLINGS} == ENGINE_FUSED
    assert ENGINE_FUSED["w13"] == ("w1", "w3")
    assert ENGINE_FUSED["fused_qkv_a_proj"] == ("q_a_proj", "kv_a_proj_with_mqa")


def test_router_is_left_unquantized_by_the_family_row_without_patterns():
    from quantport.quantize_plan import _FamilyRules

    model = tiny_moe("qwen3_moe")
    rules = _FamilyRules.of(model)
    assert rules.routers == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}

"""The three engine exclusion matchers, on the cases engine-contract.md describes."""

from __future__ import annotations

import pytest

from quantport.check.matchers import ct_decision, sglang_decision, vllm_decision

QKV = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
QKV_LAYER = "model.layers.0.self_attn.qkv_proj"


@pytest.mark.parametrize(
    ("layer", "patterns", "excluded"),
    [
        ("lm_head", ["lm_head"], True),  # exact
        ("model.layers.3.mlp.down_proj", ["model.layers.3.mlp"], True),  # substring (legacy hack)
        ("model.layers.3.mlp.down_proj", ["*.layers.3.*"], True),  # fnmatch
        ("model.layers.3.mlp.down_proj", ["model.layers.3.mlp*"], True),  # split into x and x.*
        ("model.layers.3.mlp.down_proj", ["*.layers.4.*"], False),
        ("language_model.model.layers.0.mlp.down_proj", ["model.layers.0.mlp.down_proj"], True),
        ("model.layers.0.mlp.experts", ["model.layers.0.mlp.experts.3.gate_proj"], True),  # experts rule
        ("model.layers.0.mlp.experts", ["model.layers.1.mlp.gate"], False),
    ],
)
def test_vllm_single_layer(layer, patterns, excluded):
    assert vllm_decision(layer, (layer,), patterns).excluded is excluded


def test_vllm_fused_layer_needs_all_shards_listed():
    assert vllm_decision(QKV_LAYER, QKV, list(QKV)).excluded
    partial = vllm_decision(QKV_LAYER, QKV, [QKV[1]])
    assert partial.excluded and partial.partial
    # a pattern matching k_proj by name does not match the fused layer name in vLLM
    assert not vllm_decision(QKV_LAYER, QKV, ["*.k_proj"]).excluded
    assert vllm_decision(QKV_LAYER, QKV, ["*self_attn*"]).excluded


@pytest.mark.parametrize(
    ("layer", "patterns", "excluded"),
    [
        ("lm_head", ["lm_head"], True),
        ("model.layers.0.mlp.gate", ["model.layers.*.mlp.gate"], True),
        ("model.layers.0.mlp.gate_up_proj", ["model.layers.*.mlp.gate"], False),  # fullmatch, not substring
        ("model.layers.0.mlp.down_proj", ["model.layers.0.mlp"], False),
        ("model.layers.0.mlp.down_proj", ["down_proj"], True),  # matches one dot-separated part
        ("model.layers.0.self_attn.fused_qkv_a_proj_with_mqa", ["model.layers.0.self_attn.kv_a_proj_with_mqa"], True),
    ],
)
def test_sglang(layer, patterns, excluded):
    assert sglang_decision(layer, (layer,), patterns).excluded is excluded


def test_compressed_tensors_exact_and_regex_per_shard():
    assert ct_decision("lm_head", ("lm_head",), ["lm_head"]).excluded
    assert not ct_decision("model.lm_head", ("model.lm_head",), ["lm_head"]).excluded  # exact, not substring
    assert ct_decision("model.layers.0.mlp.gate", ("model.layers.0.mlp.gate",), [r"re:.*mlp.gate$"]).excluded
    assert ct_decision(QKV_LAYER, QKV, [r"re:.*self_attn.*"]).excluded
    assert ct_decision(QKV_LAYER, QKV, [r"re:.*q_proj$"]).partial
    assert not ct_decision(QKV_LAYER, QKV, ["Linear"]).excluded  # class names are not names


def test_sglang_lists_fused_members_by_exact_name():
    assert sglang_decision(QKV_LAYER, QKV, list(QKV)).excluded
    assert sglang_decision(QKV_LAYER, QKV, [QKV[0]]).partial


def test_compressed_tensors_experts_layer_by_expert_zero_as_vllm_0_32():
    experts = "model.layers.1.mlp.experts"
    shards = tuple(f"{experts}.{e}.{p}" for e in range(2) for p in ("gate_proj", "up_proj", "down_proj"))
    assert ct_decision(experts, shards, list(shards)).excluded
    assert ct_decision(experts, shards, [r"re:.*mlp\.experts.*"]).excluded
    assert ct_decision(experts, shards, [experts, *shards]).excluded  # what quantport writes
    # the experts module's own name is not consulted: vLLM 0.32 quantizes this layer
    assert not ct_decision(experts, shards, [experts]).excluded
    # expert 0's projections decide; other experts are not looked at
    assert ct_decision(experts, shards, [s for s in shards if ".experts.0." in s]).excluded
    assert not ct_decision(experts, shards, [s for s in shards if ".experts.1." in s]).excluded
    # some of expert 0's projections only: vLLM raises
    assert ct_decision(experts, shards, [f"{experts}.0.gate_proj", f"{experts}.0.up_proj"]).partial


def test_compressed_tensors_mixtral_experts_use_their_leaf_names():
    experts = "model.layers.0.block_sparse_moe.experts"
    shards = tuple(f"{experts}.{e}.{p}" for e in range(2) for p in ("w1", "w3", "w2"))
    assert ct_decision(experts, shards, [f"{experts}.0.w1", f"{experts}.0.w3", f"{experts}.0.w2"]).excluded
    assert not ct_decision(experts, shards, [f"{experts}.0.gate_proj"]).excluded

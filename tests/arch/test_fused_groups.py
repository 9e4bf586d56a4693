from __future__ import annotations

from quantport.arch.fused_groups import find_attention_modules, find_shared_input_groups


def test_groups_found_from_module_structure(tiny_model):
    groups = find_shared_input_groups(tiny_model("llama"))
    assert [g.fused_name for g in groups] == [
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.mlp.gate_up_proj",
        "model.layers.1.self_attn.qkv_proj",
        "model.layers.1.mlp.gate_up_proj",
    ]
    assert groups[0].members == (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    )


def test_attention_modules(tiny_model):
    names = [name for name, _ in find_attention_modules(tiny_model("qwen3"))]
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]

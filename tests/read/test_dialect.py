"""read.dialect.detect_dialect: the dialect and the per-module description, from configs and tensor names."""

from __future__ import annotations

import pytest

from quantport.read.dialect import ModuleRole, QuantizedModule, detect_dialect, split_fused_expert_leaf
from quantport.read.quant_config import Dialect

LINEAR = "model.layers.0.self_attn.q_proj"
EXPERTS = "model.layers.0.mlp.experts"


def test_modelopt_flat_config_with_fused_experts():
    config = {"quantization_config": {"quant_method": "modelopt", "quant_algo": "nvfp4", "kv_cache_quant_algo": "fp8"}}
    names = [
        f"{LINEAR}.weight",
        f"{LINEAR}.weight_scale",
        f"{LINEAR}.weight_scale_2",
        f"{EXPERTS}.gate_up_proj",
        f"{EXPERTS}.gate_up_proj_weight_scale",
        "model.embed_tokens.weight",
    ]
    found = detect_dialect(config, None, names)
    assert found.dialect is Dialect.MODELOPT and found.config.kv_cache == "FP8"
    assert found.modules == {
        EXPERTS: QuantizedModule(EXPERTS, ModuleRole.FUSED_EXPERTS, "NVFP4"),
        LINEAR: QuantizedModule(LINEAR, ModuleRole.LINEAR, "NVFP4"),
    }


def test_modelopt_nested_mixed_precision():
    nested = {
        "producer": {"name": "modelopt"},
        "quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {LINEAR: {"quant_algo": "FP8"}}},
    }
    other = "model.layers.0.mlp.down_proj"
    found = detect_dialect({}, nested, [f"{LINEAR}.weight_scale", f"{other}.weight_scale"])
    assert found.config.source == "hf_quant_config.json"
    assert found.modules[LINEAR].scheme == "FP8" and found.modules[other].scheme is None


def test_compressed_tensors_groups_match_exact_name_then_regex_then_class():
    groups = {
        "exact": {"targets": [LINEAR], "weights": {"num_bits": 8, "type": "int"}, "format": "int-quantized"},
        "regex": {"targets": ["re:.*experts\\.\\d+\\..*"], "weights": {"num_bits": 4, "type": "int"}},
        "any": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}, "format": "float-quantized"},
    }
    config = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": groups, "format": "mixed"}}
    names = [f"{LINEAR}.weight_scale", f"{EXPERTS}.3.up_proj.weight_packed", "model.layers.0.mlp.gate.weight_scale"]
    found = detect_dialect(config, None, names)
    assert found.dialect is Dialect.COMPRESSED_TENSORS
    assert {m: (d.ct_group.name, d.scheme) for m, d in found.modules.items()} == {
        LINEAR: ("exact", "int-quantized"),
        f"{EXPERTS}.3.up_proj": ("regex", "mixed"),
        "model.layers.0.mlp.gate": ("any", "float-quantized"),
    }


def test_native_mxfp4_marks_the_blocked_experts():
    config = {"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}}
    names = [f"{EXPERTS}.gate_up_proj_blocks", f"{EXPERTS}.gate_up_proj_scales", f"{EXPERTS}.gate_up_proj_bias"]
    found = detect_dialect(config, None, names)
    assert found.dialect is Dialect.MXFP4 and found.config.ignore == ["lm_head"]
    assert found.modules == {EXPERTS: QuantizedModule(EXPERTS, ModuleRole.FUSED_EXPERTS, "MXFP4")}


@pytest.mark.parametrize(
    ("config", "dialect"),
    [
        (None, Dialect.NONE),
        ({"model_type": "llama"}, Dialect.NONE),
        ({"quantization_config": {"quant_method": "gptq"}}, Dialect.UNKNOWN),
        ({"text_config": {"quantization_config": {"quant_method": "compressed_tensors"}}}, Dialect.COMPRESSED_TENSORS),
    ],
)
def test_dialect_from_quant_method(config, dialect):
    assert detect_dialect(config, None, []).dialect is dialect


def test_split_fused_expert_leaf():
    assert split_fused_expert_leaf("gate_up_proj_weight_scale_2") == ("gate_up_proj", "weight_scale_2")
    assert split_fused_expert_leaf("down_proj") == ("down_proj", "")
    assert split_fused_expert_leaf("o_proj") is None

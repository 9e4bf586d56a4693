"""compressed-tensors export: config, tensor layouts, and compressed-tensors' own decompressors.

Every recipe's checkpoint is decoded module by module with compressed-tensors' registered compressor
for the config's format, and must give exactly the weights the simulated model uses.
"""

from __future__ import annotations

import json

import compressed_tensors
import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig

import quantport
from checkpoint_files import load_tensors
from quantport.errors import ExportError
from quantport.export import recipe_for_format
from quantport.modules.kv_cache import kv_quantizer_of
from quantport.modules.quant_linear import QuantLinear

CT = "compressed-tensors"
F32, BF16, FP8, U8, I8, I32, I64 = (
    torch.float32,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.uint8,
    torch.int8,
    torch.int32,
    torch.int64,
)

# recipe -> (format, weight args subset, has input activations, q_proj tensors for a [256, 256] weight)
EXPECTED = {
    "fp8": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "tensor"}, True,
            {"weight": (FP8, (256, 256)), "weight_scale": (F32, (1,)), "input_scale": (F32, (1,))}),
    "fp8-dynamic": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"}, True,
                    {"weight": (FP8, (256, 256)), "weight_scale": (F32, (256, 1))}),
    "fp8-block": ("naive-quantized", {"strategy": "block", "block_structure": [128, 128]}, False,
                  {"weight": (FP8, (256, 256)), "weight_scale": (F32, (2, 2))}),
    "nvfp4": ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16},
              True, {"weight_packed": (U8, (256, 128)), "weight_scale": (FP8, (256, 16)),
                     "weight_global_scale": (F32, (1,)), "input_global_scale": (F32, (1,))}),
    "w4a16-nvfp4": ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "group_size": 16}, False,
                    {"weight_packed": (U8, (256, 128)), "weight_scale": (FP8, (256, 16)),
                     "weight_global_scale": (F32, (1,))}),
    "mxfp4": ("mxfp4-pack-quantized", {"num_bits": 4, "type": "float", "group_size": 32}, False,
              {"weight_packed": (U8, (256, 128)), "weight_scale": (U8, (256, 8))}),
    "int8": ("int-quantized", {"num_bits": 8, "type": "int", "strategy": "channel"}, True,
             {"weight": (I8, (256, 256)), "weight_scale": (BF16, (256, 1))}),
    "w4a16": ("pack-quantized", {"num_bits": 4, "type": "int", "group_size": 128, "symmetric": True}, False,
              {"weight_packed": (I32, (256, 32)), "weight_scale": (BF16, (256, 2)), "weight_shape": (I64, (2,))}),
    "w4a16-asym": ("pack-quantized", {"num_bits": 4, "symmetric": False}, False,
                   {"weight_packed": (I32, (256, 32)), "weight_scale": (BF16, (256, 2)), "weight_shape": (I64, (2,)),
                    "weight_zero_point": (I32, (32, 2))}),
    "w8a16": ("pack-quantized", {"num_bits": 8, "type": "int", "group_size": 128}, False,
              {"weight_packed": (I32, (256, 64)), "weight_scale": (BF16, (256, 2)), "weight_shape": (I64, (2,))}),
    "w8a16-asym": ("pack-quantized", {"num_bits": 8, "symmetric": False}, False,
                   {"weight_packed": (I32, (256, 64)), "weight_scale": (BF16, (256, 2)), "weight_shape": (I64, (2,)),
                    "weight_zero_point": (I32, (64, 2))}),
}  # fmt: skip


def _export(tmp_path, tiny_model, calib_batches, recipe, family="llama", **options):
    model = tiny_model(family, hidden_size=256, intermediate_size=384, head_dim=64)
    quantport.quantize(model, recipe_for_format(recipe, CT), calib_batches, progress=False, **options)
    out = quantport.export(model, tmp_path / recipe, CT, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    return model, out, config, load_tensors(out)


def _module_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == prefix}


@pytest.mark.parametrize("recipe", list(EXPECTED))
def test_config_and_layout(tmp_path, tiny_model, calib_batches, recipe):
    fmt, weight_args, has_inputs, layout = EXPECTED[recipe]
    _, out, config, tensors = _export(tmp_path, tiny_model, calib_batches, recipe, family="qwen3")
    assert config["quant_method"] == "compressed-tensors"
    assert config["version"] == compressed_tensors.__version__
    assert config["format"] == fmt and config["quantization_status"] == "compressed"
    assert config["sparsity_config"] == {} and config["kv_cache_scheme"] is None
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == fmt
    assert weight_args.items() <= group["weights"].items()
    assert (group["input_activations"] is not None) is has_inputs
    QuantizationConfig.model_validate(config)  # compressed-tensors parses what we wrote
    q_proj = _module_tensors(tensors, "model.layers.0.self_attn.q_proj")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in q_proj.items()} == layout
    # the ignore list is exactly the modules with a weight matrix and no scales (lm_head is tied, not stored)
    matrices = {k.rsplit(".", 1)[0] for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2}
    scaled = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}
    assert set(config["ignore"]) == (matrices | {"lm_head"}) - scaled
    assert not (out / "hf_quant_config.json").exists()
    assert json.loads((out / "quantport_report.json").read_text())["format"] == CT


@pytest.mark.parametrize("recipe", list(EXPECTED))
def test_compressed_tensors_decompresses_to_the_simulated_weights(tmp_path, tiny_model, calib_batches, recipe):
    model, _, config, tensors = _export(tmp_path, tiny_model, calib_batches, recipe)
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14
    for name, module in quantized:
        decoded = compressor.decompress(_module_tensors(tensors, name), scheme)["weight"]
        assert torch.equal(decoded.to(torch.bfloat16), module.simulated_weight()), name


def test_fused_groups_share_nvfp4_global_scales(tmp_path, tiny_model, calib_batches):
    model, _, _, t = _export(tmp_path, tiny_model, calib_batches, "nvfp4")
    groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    for layer in range(2):
        for group in groups:
            names = [f"model.layers.{layer}.{m}" for m in group]
            weight_amax = max(model.get_submodule(n).weight.abs().amax().float() for n in names)
            for suffix in ("weight_global_scale", "input_global_scale"):
                assert len({t[f"{n}.{suffix}"].item() for n in names}) == 1, (layer, group, suffix)
            assert t[f"{names[0]}.weight_global_scale"].item() == pytest.approx(2688 / weight_amax.item(), rel=1e-6)
            input_amax = model.get_submodule(names[0]).input_amax
            assert t[f"{names[0]}.input_global_scale"].item() == pytest.approx(2688 / input_amax.item(), rel=1e-6)


def test_fp8_kv_cache(tmp_path, tiny_model, calib_batches):
    model, _, config, t = _export(tmp_path, tiny_model, calib_batches, "fp8", kv_cache="fp8")
    assert config["kv_cache_scheme"] == {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "strategy": "tensor",
        "dynamic": False,
    }
    for layer in range(2):
        prefix = f"model.layers.{layer}.self_attn"
        k_scale, v_scale = kv_quantizer_of(model.get_submodule(prefix)).scales()
        assert t[f"{prefix}.k_scale"].shape == (1,) and t[f"{prefix}.k_scale"].dtype == torch.float32
        assert t[f"{prefix}.k_scale"].item() == k_scale.item() and t[f"{prefix}.v_scale"].item() == v_scale.item()
        assert f"{prefix}.k_proj.k_scale" not in t


def test_export_is_deterministic(tmp_path, tiny_model, calib_batches):
    model = tiny_model("llama")
    quantport.quantize(model, "w4a16-asym", calib_batches, progress=False)
    quantport.export(model, tmp_path / "a", progress=False, max_shard_size="100KB")
    quantport.export(model, tmp_path / "b", CT, progress=False, max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "model.safetensors.index.json" in files and files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_missing_package_is_a_clear_error(tmp_path, tiny_model, calib_batches, monkeypatch):
    model = tiny_model("llama")
    quantport.quantize(model, "int8", calib_batches, progress=False)
    monkeypatch.setitem(__import__("sys").modules, "compressed_tensors", None)
    with pytest.raises(ExportError, match="pip install compressed-tensors"):
        quantport.export(model, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

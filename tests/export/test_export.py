"""Export invariants: round trip, exclude list, determinism, tied weights, configs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import quantport
from formats.reference_decoders import decode_fp8, decode_mxfp8, decode_nvfp4_multiplier
from quantport.check import check_checkpoint
from quantport.errors import ExportError
from quantport.formats.descriptors import ScaleConvention
from quantport.modules.quant_linear import QuantLinear
from quantport.recipes import PRESETS
from quantport.schemes import codec_for


def _tensors(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _decode_independently(config: dict, exported: dict[str, torch.Tensor]) -> torch.Tensor:
    """bf16 weight as a reader other than quantport's decodes it: compressed-tensors' decompressor, or the ModelOpt
    layout decoded by compressed-tensors' functions or by hand (never the codec that encoded it)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    if config["quant_method"] == "compressed-tensors":
        scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        return compressor.decompress(exported, scheme)["weight"].to(torch.bfloat16)
    algo, codes, scale = config["quant_algo"], exported["weight"], exported["weight_scale"]
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO"):
        return decode_fp8(codes, scale).to(torch.bfloat16)
    if algo == "MXFP8":
        return decode_mxfp8(codes, scale).to(torch.bfloat16)
    if algo in ("NVFP4", "W4A16_NVFP4"):
        return decode_nvfp4_multiplier(codes, scale, exported["weight_scale_2"])
    if algo == "W8A16":
        return (codes.float() * scale[:, None]).to(torch.bfloat16)
    assert algo == "W4A16_AWQ", algo
    nibbles = codes.to(torch.int16)
    low, high = ((nibbles & 0xF) ^ 8) - 8, ((nibbles >> 4) ^ 8) - 8  # rows 2k (low) and 2k+1 (high)
    rows = torch.stack((low, high), dim=1).reshape(-1, codes.shape[1]).float()
    return (rows * scale.repeat_interleave(128, dim=1)).to(torch.bfloat16)


DENSE_RECIPES = [name for name, recipe in PRESETS.items() if recipe.linears]
"""Recipes that quantize Linear layers (mxfp4-experts quantizes MoE experts only: tests/export/test_mxfp4_native.py)."""


@pytest.mark.parametrize("recipe", DENSE_RECIPES)
def test_round_trip_dequantizes_to_the_simulated_weights(tmp_path, tiny_model, calib_batches, recipe):
    model = tiny_model("llama", hidden_size=256, intermediate_size=384, head_dim=64)
    quantport.quantize(model, recipe, calib_batches, progress=False)
    quantport.export(model, tmp_path / "out", progress=False)
    tensors = _tensors(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    codec = codec_for(PRESETS[recipe].scheme)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            exported = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
            decoded = _decode_independently(config, exported)
            if codec.format.convention is ScaleConvention.MULTIPLIER:  # read through 1 / weight_scale_2
                torch.testing.assert_close(decoded, module.simulated_weight(), rtol=2**-8, atol=0, msg=name)
            else:
                assert torch.equal(decoded, module.simulated_weight()), name
            if codec.static_input_scale:
                assert torch.equal(exported["input_scale"], module.input_scale())
            checked += 1
    assert checked > 0
    report = check_checkpoint(tmp_path / "out")
    assert report.ok, [str(f) for f in report.errors]


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4", "fp8-block"])
def test_exclude_list_is_exactly_the_modules_without_scales(tmp_path, tiny_model, calib_batches, recipe):
    model = tiny_model("qwen3")
    quantport.quantize(model, recipe, calib_batches, exclude=["*.layers.1.mlp.down_proj"], progress=False)
    quantport.export(model, tmp_path / "out", progress=False)
    tensors = _tensors(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    nested = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert config["ignore"] == nested["exclude_modules"]
    modules_with_weights = {k.rsplit(".", 1)[0] for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2}
    modules_with_weights.add("lm_head")  # tied to the embedding: listed, not stored
    with_scales = {k.rsplit(".", 1)[0] for k in tensors if k.endswith("weight_scale")}
    assert set(config["ignore"]) == modules_with_weights - with_scales
    assert "model.layers.1.mlp.down_proj" in config["ignore"]
    assert "lm_head.weight" not in tensors  # tied embeddings are saved once


def test_export_is_deterministic_and_does_not_change_the_model(tmp_path, tiny_model, calib_batches):
    model = tiny_model("llama")
    quantport.quantize(model, "nvfp4", calib_batches, kv_cache="fp8", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantport.export(model, tmp_path / "a", progress=False, max_shard_size="200KB")
    quantport.export(model, tmp_path / "b", progress=False, max_shard_size="200KB")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "model.safetensors.index.json" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shared_input_groups_share_scales(tmp_path, tiny_model, calib_batches):
    model = tiny_model("llama")
    quantport.quantize(model, "nvfp4", calib_batches, progress=False)
    quantport.export(model, tmp_path / "out", progress=False)
    t = _tensors(tmp_path / "out")
    for layer in range(2):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            for suffix in ("input_scale", "weight_scale_2"):
                values = {t[f"model.layers.{layer}.{m}.{suffix}"].item() for m in group}
                assert len(values) == 1, (layer, group, suffix)
    assert t["model.layers.0.self_attn.o_proj.weight_scale_2"].item() > 0


def test_configs_and_side_files(tmp_path, tiny_model, calib_batches):
    model = tiny_model("llama")
    quantport.quantize(model, "fp8", calib_batches, kv_cache="fp8", progress=False)
    quantport.export(model, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    q = config["quantization_config"]
    assert q["quant_method"] == "modelopt" and q["quant_algo"] == "FP8"
    assert q["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    report = json.loads((tmp_path / "out" / "quantport_report.json").read_text())
    assert report["recipe"] == "fp8" and report["quantized_layers"] == 14 and report["calibration_tokens"] == 192
    assert (tmp_path / "out" / "generation_config.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_export_of_an_unquantized_model_is_refused(tmp_path, tiny_model):
    with pytest.raises(ExportError, match="quantize"):
        quantport.export(tiny_model("llama"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_refused(tmp_path, tiny_model, calib_batches):
    model = quantport.quantize(tiny_model("llama"), "fp8-dynamic", progress=False)
    with pytest.raises(ExportError, match="unknown export format 'gguf'"):
        quantport.export(model, tmp_path / "out", format="gguf")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise release is Linux-only")
@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_export_drops_the_memory_mapped_weights_it_read(tmp_path, tiny_model, calib_batches, fmt):
    """Every format releases the checkpoint pages export touched (compressed-tensors once kept them all)."""
    tiny_model("llama", vocab_size=8192, hidden_size=256, intermediate_size=1024).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")  # weights memory-mapped
    quantport.quantize(model, "fp8", calib_batches, progress=False)
    with torch.no_grad():
        sum(float(p.float().sum()) for p in model.parameters())  # every weight page resident
    resident = _rss_file_kb()
    quantport.export(model, tmp_path / "out", format=fmt, progress=False)
    assert _rss_file_kb() < resident - 4000  # the ~11 MB of weights left the process


def _rss_file_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))

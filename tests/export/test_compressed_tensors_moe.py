"""compressed-tensors export of MoE experts: per-expert modules that compressed-tensors decodes exactly.

For every expert family quantport supports (GPT-OSS excepted, see below), compressed-tensors'
registered compressor, applied to each expert projection's tensors, gives exactly the expert weights
quantport's simulation uses; transformers' loader is checked on the families and formats it handles.
"""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import quantport
from checkpoint_files import load_tensors
from moe_models import tiny_moe
from quantport.arch.hub_names import HubNames
from quantport.export import recipe_for_format
from quantport.export.targets import UnsupportedFormatError
from quantport.modules.quant_experts import experts_quantizer_of
from quantport.modules.quant_linear import QuantLinear

CT = "compressed-tensors"
FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe", "llama4_text", "llama4")


def _batches(vocab: int = 256) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (2, 32), generator=generator) for _ in range(3)]


def _quantizers(model):
    return [(name, q) for name, module in model.named_modules() if (q := experts_quantizer_of(module)) is not None]


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4", "int8", "mxfp4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_experts_decompress_to_the_simulated_weights(tmp_path, family, recipe):
    model = tiny_moe(family)
    quantport.quantize(model, recipe_for_format(recipe, CT), _batches(), progress=False)
    out = quantport.export(model, tmp_path / "out", CT, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    tensors, names = load_tensors(out), HubNames(model)
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in tensors)  # no fused names
    quantizers = _quantizers(model)
    assert quantizers
    for _, quantizer in quantizers:
        block, layout = quantizer.block, quantizer.layout
        simulated = quantizer.simulated_parameters()
        for expert in range(block.num_experts):
            expected = {
                "gate": layout.gate(simulated["gate_up"][expert]),
                "up": layout.up(simulated["gate_up"][expert]),
                "down": layout.down(simulated["down"][expert]),
            }
            for projection, leaf in zip(("gate", "up", "down"), layout.leaf_names, strict=True):
                prefix = names.module(f"{block.experts_name}.{expert}.{leaf}")
                local = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == prefix}
                decoded = compressor.decompress(local, scheme)["weight"].to(torch.bfloat16)
                assert torch.equal(decoded, expected[projection]), (prefix, projection)
        router = names.module(f"{block.name}.{layout.router}")
        assert router in config["ignore"] and f"{router}.weight_scale" not in tensors


def test_nvfp4_experts_share_global_scales_where_vllm_fuses(tmp_path):
    model = tiny_moe("mixtral")
    quantport.quantize(model, recipe_for_format("nvfp4", CT), _batches(), progress=False)
    tensors = load_tensors(quantport.export(model, tmp_path / "out", CT, progress=False))
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        for expert in range(4):
            w1, w3 = f"{prefix}.{expert}.w1", f"{prefix}.{expert}.w3"
            assert torch.equal(tensors[f"{w1}.weight_global_scale"], tensors[f"{w3}.weight_global_scale"])
            assert torch.equal(tensors[f"{w1}.input_global_scale"], tensors[f"{w3}.input_global_scale"])
        # one input scale per projection per layer (the default MoE input-scale policy)
        assert len({tensors[f"{prefix}.{e}.w2.input_global_scale"].item() for e in range(4)}) == 1


def test_unquantized_experts_are_ignored_by_their_per_expert_names(tmp_path):
    model = tiny_moe("mixtral")
    quantport.quantize(model, recipe_for_format("fp8", CT), _batches(), exclude=["*.experts"], progress=False)
    out = quantport.export(model, tmp_path / "out", CT, progress=False)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    tensors = load_tensors(out)
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        expected = {prefix} | {f"{prefix}.{e}.{leaf}" for e in range(4) for leaf in ("w1", "w2", "w3")}
        assert expected <= set(ignore)  # vLLM looks up <experts>.0.w1 / .w3 / .w2 in the ignore list
        for name in expected - {prefix}:
            assert tensors[f"{name}.weight"].dtype == torch.bfloat16 and f"{name}.weight_scale" not in tensors


def test_checker_follows_vllm_on_an_experts_ignore_entry(tmp_path):
    """An ignore list naming only the experts module (not expert 0's projections) does not ignore the
    layer in vLLM 0.32: the checker must then report unquantized experts it would try to load quantized."""
    from quantport.check import check_checkpoint

    model = tiny_moe("mixtral")
    quantport.quantize(model, recipe_for_format("fp8", CT), _batches(), exclude=["*.experts"], progress=False)
    out = quantport.export(model, tmp_path / "out", CT, progress=False)
    assert check_checkpoint(out).ok
    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    qcfg["ignore"] = [n for n in qcfg["ignore"] if ".experts." not in n]
    assert "model.layers.0.block_sparse_moe.experts" in qcfg["ignore"]
    assert not any(".experts.0." in n for n in qcfg["ignore"])
    (out / "config.json").write_text(json.dumps(config))
    report = check_checkpoint(out)
    assert not report.ok
    assert "exclusion.unlisted" in {f.rule for f in report.findings if "experts" in f.target}


def test_gpt_oss_is_refused_before_writing(tmp_path):
    model = tiny_moe("gpt_oss")
    quantport.quantize(model, recipe_for_format("fp8", CT), _batches(), progress=False)
    with pytest.raises(
        UnsupportedFormatError,
        match="gpt_oss in the compressed-tensors format does not load.*--recipe mxfp4-experts --format mxfp4",
    ):
        quantport.export(model, tmp_path / "out", CT, progress=False)
    assert not (tmp_path / "out").exists()


TRANSFORMERS_GAPS = {
    ("qwen3_moe", "nvfp4"): "transformers 5.24 decompresses fused NVFP4 experts without weight_global_scale",
    ("qwen3_moe", "int8"): "transformers 5.24 has no int-quantized (W8A8) path for fused experts",
}


@torch.no_grad()
@pytest.mark.parametrize(
    ("family", "recipe"),
    [
        pytest.param(f, r, marks=pytest.mark.xfail(strict=True, reason=TRANSFORMERS_GAPS[(f, r)]))
        if (f, r) in TRANSFORMERS_GAPS
        else (f, r)
        for f, r in [
            ("qwen3_moe", "fp8"),
            ("qwen3_moe", "mxfp4"),
            ("mixtral", "fp8-dynamic"),
            ("llama4_text", "nvfp4"),
            ("llama4_text", "int8"),
            ("qwen3_moe", "nvfp4"),
            ("qwen3_moe", "int8"),
        ]
    ],
)
def test_transformers_loads_the_experts(tmp_path, family, recipe):
    tiny_moe(family).save_pretrained(tmp_path / "source")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "source", dtype=torch.bfloat16)
    quantport.quantize(model, recipe_for_format(recipe, CT), _batches(), progress=False)
    quantport.export(model, tmp_path / "out", CT, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "source", dtype=torch.bfloat16)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            reference.get_submodule(name).weight.data.copy_(module.simulated_weight())
    for name, quantizer in _quantizers(model):
        simulated = quantizer.simulated_parameters()
        reference.get_submodule(name).gate_up_proj.data.copy_(simulated["gate_up"])
        reference.get_submodule(name).down_proj.data.copy_(simulated["down"])
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.bfloat16
    )
    input_ids = _batches()[0]
    assert torch.equal(loaded(input_ids).logits, reference(input_ids).logits)

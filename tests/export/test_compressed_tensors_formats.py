"""Choosing a recipe's scheme per checkpoint format, and refusing pairs that do not exist (before writing)."""

from __future__ import annotations

import json

import pytest
import torch

import quantport
from checkpoint_files import load_tensors
from quantport.cli import main
from quantport.dialects.compressed_tensors import CT_SCHEMES
from quantport.dialects.modelopt import pieces_of
from quantport.export import ExportFormat, recipe_for_format
from quantport.export.targets import TARGETS, UnsupportedFormatError, default_format, formats_for
from quantport.export.targets.modelopt import MODELOPT_ALGOS
from quantport.modules.quant_linear import QuantLinear
from quantport.recipes import PRESETS, LinearScheme
from quantport.schemes import CODECS

CT = ExportFormat.COMPRESSED_TENSORS
MO = ExportFormat.MODELOPT


@pytest.mark.parametrize(
    ("recipe", "fmt", "scheme"),
    [
        ("nvfp4", MO, LinearScheme.NVFP4),
        ("nvfp4", CT, LinearScheme.NVFP4_CT),
        ("w4a16-nvfp4", CT, LinearScheme.W4A16_NVFP4_CT),
        ("fp8", CT, LinearScheme.FP8),
        ("fp8-block", CT, LinearScheme.FP8_BLOCK),
        ("w4a16", CT, LinearScheme.W4A16),
        ("w4a16", MO, LinearScheme.W4A16_MODELOPT),
        ("w8a16", MO, LinearScheme.W8A16_MODELOPT),
        ("int8", CT, LinearScheme.INT8),
        ("mxfp4", CT, LinearScheme.MXFP4),
    ],
)
def test_recipe_resolves_per_format(recipe, fmt, scheme):
    resolved = recipe_for_format(recipe, fmt.value)
    assert resolved.scheme is scheme and resolved.name == recipe
    assert set(resolved.variants) | {scheme} == {PRESETS[recipe].scheme, *PRESETS[recipe].variants}


@pytest.mark.parametrize(
    ("recipe", "fmt", "names"),
    [
        ("mxfp8", CT, "modelopt"),
        ("int8", MO, "compressed-tensors"),
        ("mxfp4", MO, "compressed-tensors"),
        ("w4a16-asym", MO, "compressed-tensors"),
    ],
)
def test_missing_pairs_name_the_other_format(recipe, fmt, names):
    with pytest.raises(UnsupportedFormatError, match=f"recipe '{recipe}' has no {fmt.value} form.*{names}"):
        recipe_for_format(recipe, fmt)


def test_every_scheme_has_a_format_and_the_tables_agree():
    checked = 0
    for scheme in LinearScheme:
        assert scheme in CODECS and formats_for(scheme), scheme
        assert (scheme in CT_SCHEMES) is (CT in formats_for(scheme))
        assert (scheme in MODELOPT_ALGOS) is (MO in formats_for(scheme))
        checked += 1
    assert checked == len(LinearScheme) >= 16
    assert default_format(LinearScheme.NVFP4) is MO and default_format(LinearScheme.INT8) is CT
    assert default_format(LinearScheme.MXFP4) is CT


def test_targets_are_registered_once_each_in_priority_order():
    assert sorted(t.format.value for t in TARGETS) == sorted(f.value for f in ExportFormat)  # one target each
    assert [t.format for t in TARGETS if t.format in (MO, CT, ExportFormat.MXFP4)] == [MO, CT, ExportFormat.MXFP4]
    assert formats_for(LinearScheme.MXFP4) == [CT, ExportFormat.MXFP4]


def test_export_refuses_numerics_the_format_does_not_store(tmp_path, tiny_model, calib_batches):
    model = tiny_model("llama")
    quantport.quantize(model, "nvfp4", calib_batches, progress=False)
    with pytest.raises(UnsupportedFormatError, match=r"recipe_for_format\('nvfp4', 'compressed-tensors'\)"):
        quantport.export(model, tmp_path / "out", CT.value, progress=False)
    assert not tmp_path.joinpath("out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("recipe", "algo", "group_size"), [("w4a16", "W4A16_AWQ", 128), ("w8a16", "W8A16", None)])
def test_modelopt_integer_variants_round_trip(tmp_path, tiny_model, calib_batches, recipe, algo, group_size):
    model = tiny_model("llama", hidden_size=256, intermediate_size=384, head_dim=64)
    quantport.quantize(model, recipe_for_format(recipe, MO), calib_batches, progress=False)
    out = quantport.export(model, tmp_path / "out", progress=False)  # default: the scheme's only format
    flat = json.loads((out / "config.json").read_text())["quantization_config"]
    nested = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert flat["quant_method"] == "modelopt" and flat["quant_algo"] == nested["quant_algo"] == algo
    assert nested.get("group_size") == group_size
    tensors = load_tensors(out)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            exported = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
            assert set(exported) == {"weight", "weight_scale"}
            assert exported["weight_scale"].dtype == torch.float32
            decoded = module.codec.dequantize_weight(pieces_of(exported), torch.bfloat16)
            assert torch.equal(decoded, module.simulated_weight())
            checked += 1
    assert checked > 0


def test_cli_refuses_a_missing_pair_before_loading(tmp_path, capsys, monkeypatch):
    import quantport.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(quantport.loading, "load_model", no_loading)  # the CLI imports it when it needs it
    out = tmp_path / "o"
    assert main(["quantize", "bundled:tiny-llama", str(out), "--recipe", "int8", "--format", "modelopt"]) == 2
    err = capsys.readouterr().err
    assert "recipe 'int8' has no modelopt form" in err and "compressed-tensors" in err and "loaded" not in err
    assert not out.exists()


def test_cli_writes_compressed_tensors(tmp_path, capsys):
    out = tmp_path / "tiny-nvfp4"
    code = main(
        [
            "quantize",
            "bundled:tiny-llama",
            str(out),
            "--recipe",
            "nvfp4",
            "--format",
            "compressed-tensors",
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "64",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    assert "nvfp4 (compressed-tensors)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    report = json.loads((out / "quantport_report.json").read_text())
    assert report["scheme"] == "nvfp4-ct" and report["format"] == "compressed-tensors"


def test_cli_default_format_follows_the_recipe(tmp_path, capsys):
    out = tmp_path / "tiny-int8"
    assert main(["quantize", "bundled:tiny-llama", str(out), "--recipe", "int8", "--device", "cpu", "--quiet"]) == 0
    assert "int8 (compressed-tensors)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"

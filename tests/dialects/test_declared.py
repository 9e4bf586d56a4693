"""A dialect declared in its own module: its reader and checker contract are found by discovery."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from quantport.dialects import ExportFormat, declared
from quantport.read.quant_config import Dialect, parse_quant_config


def test_dialect_members_follow_the_export_formats():
    assert [(d.name, d.value) for d in Dialect] == [(f.name, f.value) for f in ExportFormat] + [
        ("UNKNOWN", "unknown"),
        ("NONE", "none"),
    ]
    assert str(Dialect.COMPRESSED_TENSORS) == "compressed-tensors"


def test_declared_reads_an_attribute_of_every_dialect_module():
    assert declared("READER") == [] and declared("LAYER_CONTRACT") == []  # the built-in three are read/check's own
    assert "mxfp4" in {str(scheme) for scheme in declared("SCHEME")}  # dialects/mxfp4_native.py's


def test_an_undeclared_quant_method_stays_unknown():
    config = parse_quant_config({"quantization_config": {"quant_method": "gptq", "bits": 4}}, None)
    assert config.format is Dialect.UNKNOWN and config.quant_method == "gptq"


_PROBE = """
import enum, json, sys, types
import torch
from safetensors.torch import save_file
import quantport.dialects as dialects

dialects.ExportFormat = enum.Enum(
    "ExportFormat", [(f.name, f.value) for f in dialects.ExportFormat] + [("TOY", "toy")], type=str
)
toy = types.SimpleNamespace()
dialects.declared = lambda attribute: [getattr(toy, attribute)]  # as if dialects/toy.py declared them
from quantport.read.quant_config import DialectReader
from quantport.check.specs import F32, FP8, LayerContract, LayerSpec, Spec

def spec(scheme, params):
    weight = params["weight"]
    scalar = Spec(F32, ((),))
    return LayerSpec(scheme, {"weight": Spec(FP8, (weight.shape,)), "weight_scale": scalar, "input_scale": scalar})

toy.READER = DialectReader("toy", "toy", lambda block: {"ignore": block["ignore"]}, lambda c, m, role: f"toy-{role}")
toy.LAYER_CONTRACT = LayerContract("toy", spec)
from quantport.read import detect_dialect
from quantport.check import check_checkpoint

out = sys.argv[1]
config = {"model_type": "llama", "quantization_config": {"quant_method": "toy", "ignore": ["lm_head"]}}
json.dump(config, open(f"{out}/config.json", "w"))
save_file({"m.down_proj.weight": torch.zeros(4, 8, dtype=torch.float8_e4m3fn),
           "m.down_proj.input_scale": torch.ones(())}, f"{out}/model.safetensors")
found = detect_dialect(config, None, ["m.down_proj.weight", "m.down_proj.input_scale"])
report = check_checkpoint(out)
print(json.dumps({
    "dialect": str(found.dialect), "ignore": found.config.ignore,
    "scheme": found.modules["m.down_proj"].scheme,
    "tensor_findings": [(f.rule, f.target) for f in report.findings if f.rule.startswith("tensor.")],
}))
"""


def test_a_declared_dialect_is_read_and_checked(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PROBE), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.splitlines()[-1])
    assert probe["dialect"] == "toy" and probe["ignore"] == ["lm_head"]
    assert probe["scheme"] == "toy-linear"
    assert probe["tensor_findings"] == [["tensor.missing", "m.down_proj.weight_scale"]]

"""Issue 19: every checkpoint quantport writes loads in the engine it targets, or is refused before writing.

* export() runs quantport's own checker on the staging directory; an error leaves nothing at OUT, unless
  allow_check_errors=True;
* forms known not to load (arch/engines.py) are refused before calibration, naming the form that works;
* GPT-OSS experts left in bf16 are ignored with one re: pattern per experts module (vLLM's name mapper breaks
  per-expert names), and a tied GPT-OSS head is written as lm_head.weight (vLLM's class does not tie).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import quantport
from moe_models import tiny_moe
from quantport.check import check_checkpoint, render_report
from quantport.cli import main
from quantport.export import FORMAT_CONTENT, ExportFormat, recipe_for_format
from quantport.export.self_check import SelfCheckError
from quantport.export.targets import UnsupportedFormatError
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=256, n=1, seq=16)
WORKING = "--recipe mxfp4-experts --format mxfp4"


def _names(out) -> set[str]:
    names: set[str] = set()
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            names |= set(handle.keys())
    return names


def _drop_one_input_scale(monkeypatch) -> None:
    """A broken writer: the ModelOpt plan loses one input_scale (vLLM would keep its 1.0 init)."""
    original = FORMAT_CONTENT[ExportFormat.MODELOPT]

    def broken(model, state):
        content = original(model, state)
        victim = next(t for t in content.plan if t.name.endswith("o_proj.input_scale"))
        return replace(content, plan=[t for t in content.plan if t is not victim])

    monkeypatch.setitem(FORMAT_CONTENT, ExportFormat.MODELOPT, broken)


def test_export_fails_on_its_own_checker_errors(tmp_path, tiny_model, calib_batches, monkeypatch):
    model = tiny_model("llama")
    quantport.quantize(model, "fp8", calib_batches, progress=False)
    _drop_one_input_scale(monkeypatch)
    with pytest.raises(SelfCheckError, match=r"(?s)\[tensor.missing\].*o_proj has no input_scale") as error:
        quantport.export(model, tmp_path / "out", progress=False)
    assert "--allow-check-errors" in str(error.value)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left either


def test_allow_check_errors_writes_it_with_warnings(tmp_path, tiny_model, calib_batches, monkeypatch, caplog):
    model = tiny_model("llama")
    quantport.quantize(model, "fp8", calib_batches, progress=False)
    _drop_one_input_scale(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="quantport.export.self_check"):
        out = quantport.export(model, tmp_path / "out", progress=False, allow_check_errors=True)
    assert "tensor.missing" in check_checkpoint(out).rules()
    assert any("tensor.missing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("recipe", "fmt"),
    [
        ("nvfp4", "modelopt"),
        ("fp8", "modelopt"),
        ("fp8", "compressed-tensors"),
        ("int8", "compressed-tensors"),
        ("mxfp4-experts", "compressed-tensors"),
    ],
)
def test_gpt_oss_known_failures_are_refused_before_calibration(recipe, fmt):
    model = tiny_moe("gpt_oss")

    def no_calibration():
        raise AssertionError("calibration data was read")
        yield  # pragma: no cover

    with pytest.raises(UnsupportedFormatError, match=f"gpt_oss in the {fmt} format does not load.*{WORKING}"):
        quantport.quantize(model, recipe_for_format(recipe, fmt), no_calibration(), format=fmt, progress=False)


def test_gpt_oss_known_failure_is_refused_by_export_when_quantize_had_no_format(tmp_path):
    model = tiny_moe("gpt_oss")
    quantport.quantize(model, "fp8", BATCHES, progress=False)  # simulation is fine; the target is unknown
    with pytest.raises(UnsupportedFormatError, match=f"modelopt format does not load.*{WORKING}"):
        quantport.export(model, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    out = quantport.export(model, tmp_path / "out", progress=False, allow_check_errors=True)
    assert check_checkpoint(out).rules() == {"engine.known-failure"}


def test_cli_refuses_gpt_oss_nvfp4_before_loading_calibration(tmp_path, capsys):
    tiny_moe("gpt_oss").save_pretrained(tmp_path / "model")  # no tokenizer: calibration would fail
    (tmp_path / "calib.txt").write_text("some text " * 100)
    code = main(
        [
            "quantize",
            str(tmp_path / "model"),
            str(tmp_path / "out"),
            "--recipe",
            "nvfp4",
            "--quiet",
            "--calib-seq-len",
            "64",
            "--calib-text",
            str(tmp_path / "calib.txt"),
        ]
    )
    assert code == 2
    assert WORKING in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpt_oss_ct_with_bf16_experts_ignores_them_by_pattern(tmp_path):
    model = tiny_moe("gpt_oss")
    quantport.quantize(
        model,
        recipe_for_format("int8", "compressed-tensors"),
        BATCHES,
        exclude=["*.mlp.experts"],
        format="compressed-tensors",
        progress=False,
    )
    out = quantport.export(model, tmp_path / "out", "compressed-tensors", progress=False)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert r"re:model\.layers\.0\.mlp\.experts\..*" in ignore
    assert not [p for p in ignore if ".experts.0." in p]  # vLLM's GPT-OSS mapper renames those
    report = check_checkpoint(out)
    assert report.findings == [], render_report(report)


def test_other_families_keep_per_expert_ignore_names(tmp_path):
    model = tiny_moe("qwen3_moe")
    quantport.quantize(
        model, recipe_for_format("int8", "compressed-tensors"), BATCHES, exclude=["*.mlp.experts"], progress=False
    )
    out = quantport.export(model, tmp_path / "out", "compressed-tensors", progress=False)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.mlp.experts.0.down_proj" in ignore and not [p for p in ignore if p.startswith("re:")]


def _tied(family: str) -> torch.nn.Module:
    model = tiny_moe(family)
    model.config.tie_word_embeddings = True
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model


def test_tied_gpt_oss_writes_lm_head(tmp_path):
    model = _tied("gpt_oss")
    quantport.quantize(model, "mxfp4-experts", BATCHES, format="mxfp4", progress=False)
    out = quantport.export(model, tmp_path / "out", "mxfp4", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= _names(out)
    assert check_checkpoint(out).ok


def test_tied_family_whose_engine_ties_writes_the_embedding_once(tmp_path):
    model = _tied("qwen3_moe")
    quantport.quantize(model, "fp8", BATCHES, progress=False)
    out = quantport.export(model, tmp_path / "out", progress=False)
    assert "lm_head.weight" not in _names(out) and "model.embed_tokens.weight" in _names(out)

"""The command line on the bundled model, and its errors on bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from quantport.cli import main
from quantport.loading import resolve_model_dir


def test_quantize_bundled_model(tmp_path, capsys):
    out = tmp_path / "tiny-nvfp4"
    code = main(
        [
            "quantize",
            "bundled:tiny-llama",
            str(out),
            "--recipe",
            "nvfp4",
            "--kv-cache",
            "fp8",
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
    summary = capsys.readouterr().out
    assert "quantized layers : 14" in summary and "excluded layers  : 1" in summary and "output size" in summary
    assert {
        "config.json",
        "hf_quant_config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "quantport_report.json",
    } <= {p.name for p in out.iterdir()}
    report = json.loads((out / "quantport_report.json").read_text())
    assert report["calibration_tokens"] == 256


def test_unknown_recipe(tmp_path, capsys):
    assert main(["quantize", "bundled:tiny-llama", str(tmp_path / "o"), "--recipe", "int3"]) == 2
    assert "unknown recipe 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_directory_without_weights(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copyfile(resolve_model_dir("bundled:tiny-llama") / "config.json", model / "config.json")
    assert main(["quantize", str(model), str(tmp_path / "o"), "--recipe", "fp8"]) == 2
    assert "has no weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_model_directory(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "o"), "--recipe", "fp8"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("x")
    args = ["quantize", "bundled:tiny-llama", str(out), "--recipe", "fp8-dynamic", "--device", "cpu", "--quiet"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "x").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("device", ["tpu"])
def test_bad_device(tmp_path, capsys, device):
    assert main(["quantize", "bundled:tiny-llama", str(tmp_path / "o"), "--recipe", "fp8", "--device", device]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_calib_batch_size_takes_auto_or_a_positive_integer(capsys):
    from quantport.cli import _parser

    parse = _parser().parse_args
    base = ["quantize", "m", "o", "--recipe", "fp8"]
    assert parse(base).calib_batch_size == "auto"
    assert parse([*base, "--calib-batch-size", "16"]).calib_batch_size == 16
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit):
            parse([*base, "--calib-batch-size", bad])
        assert "positive integer or 'auto'" in capsys.readouterr().err


def test_torch_free_vocabularies_match_the_library():
    from quantport.calibrate import moe_policy
    from quantport.export import ExportFormat
    from quantport.quantize_args import EXPORT_FORMATS

    assert tuple(f.value for f in ExportFormat) == EXPORT_FORMATS
    assert moe_policy.MoEInputScales.PER_EXPERT.value == "per-expert"


def test_every_moe_family_config_is_moe_and_dense_ones_are_not():
    from moe_models import FAMILIES, tiny_moe
    from quantport.quantize_args import is_moe_config

    for family in FAMILIES:
        assert is_moe_config(tiny_moe(family).config.to_dict()), family
    config = json.loads((resolve_model_dir("bundled:tiny-llama") / "config.json").read_text())
    assert not is_moe_config(config)


def test_full_parser_still_has_every_command():
    from quantport.cli import _parser

    for command in (["check", "d"], ["inspect", "d"], ["eval", "a", "b"]):
        assert _parser().parse_args(command).command == command[0]


def test_abbreviated_options_are_refused(tmp_path, capsys):
    code = main(["quantize", "bundled:tiny-llama", str(tmp_path / "o"), "--recipe", "fp8", "--calib-sample", "4"])
    assert code == 2
    assert "--calib-sample" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_is_a_quantport_error():
    from quantport.errors import QuantportError
    from quantport.recipes import get_recipe

    with pytest.raises(QuantportError, match="unknown recipe 'int3'"):
        get_recipe("int3")


def _calib_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


_TINY = ["quantize", "bundled:tiny-llama", "--recipe", "fp8", "--device", "cpu", "--quiet"]


def _quantize(out, *extra):
    return main([*_TINY[:2], str(out), *_TINY[2:], "--calib-samples", "4", "--calib-seq-len", "32", *extra])


def test_quantize_on_a_local_jsonl_dataset(tmp_path, capsys, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = [{"text": f"Sentence {i} of the calibration set talks about rivers and mountains."} for i in range(200)]
    data = _calib_jsonl(tmp_path / "calib.jsonl", texts)
    weight_args = ["--calib-weight", "3", "--calib-dataset", data, "--calib-weight", "1", "--calib-seed", "5"]
    assert _quantize(tmp_path / "out", "--calib-dataset", data, *weight_args) == 0
    assert "calibration      : 128 tokens" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "quantport_report.json").read_text())
    assert report["calibration_tokens"] == 128


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--calib-dataset", "missing.jsonl"], "calibration data set missing.jsonl does not exist"),
        (["--calib-weight", "1"], "--calib-weight applies to --calib-dataset only"),
        (["--calib-dataset", "{data}", "--calib-weight", "1", "--calib-weight", "2"], "2 --calib-weight for 1"),
        (["--calib-dataset", "{data}", "--calib-text", "{data}"], "exclude each other"),
        (["--calib-dataset", "{data}", "--calib-weight", "0"], "expected a positive number"),
        (["--calib-dataset", "{chats}"], "has no chat template"),
        (["--calib-dataset", "{data}", "--calib-text-field", "body"], "no field 'body' (its fields: text)"),
        (["--calib-dataset", "{data}", "--calib-samples", "20"], "has 400 tokens in 100 rows, fewer than the 640"),
    ],
)
def test_calibration_dataset_errors_are_one_line(tmp_path, capsys, monkeypatch, extra, message):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    data = _calib_jsonl(tmp_path / "calib.jsonl", [{"text": "one two three"}] * 100)
    chats = _calib_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 10)
    extra = [arg.format(data=data, chats=chats) for arg in extra]
    assert _quantize(tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_calibration_data_from_the_command_line():
    from quantport.calibration_sources import CalibrationData, CalibrationSource
    from quantport.cli import _parser
    from quantport.quantize_args import calibration_data

    head = ["quantize", "m", "o", "--recipe", "fp8"]
    both = ["--calib-dataset", r"C:\data\a.jsonl", "--calib-weight", "0.7", "--calib-dataset", "org/b"]
    options = ["--calib-weight", "0.3", "--calib-split", "test", "--calib-messages-field", "conv", "--calib-seed", "3"]
    data = calibration_data(_parser(quantize_only=True).parse_args([*head, *both, *options]))
    a = CalibrationSource(r"C:\data\a.jsonl", weight=0.7, split="test", messages_field="conv")
    b = CalibrationSource("org/b", weight=0.3, split="test", messages_field="conv")
    assert data == CalibrationData((a, b), seed=3)
    assert calibration_data(_parser(quantize_only=True).parse_args(head)) is None


def test_calibration_dataset_needs_the_datasets_library(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real_find_spec(name, *a)
    )
    data = _calib_jsonl(tmp_path / "calib.jsonl", [{"text": "one two three"}] * 100)
    assert _quantize(tmp_path / "out", "--calib-dataset", data) == 2
    assert "install it with pip install 'quantport[datasets]'" in capsys.readouterr().err

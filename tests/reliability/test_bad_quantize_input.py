"""Bad input to ``quantport quantize`` and ``quantport.quantize``: one clear error, early, nothing written.

Every command-line case asserts exit code 2, exactly one ``error:`` line on stderr naming the option or
path, no traceback, nothing at OUT (nor beside it) and the source model's files unchanged. API cases
assert the :class:`~quantport.errors.QuantportError` subclass. Cases that need no model run before
torch is imported (a child process proves it and times it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantport.cli import main
from quantport.errors import (
    AlreadyQuantizedError,
    CalibrationDataError,
    InvalidActivationsError,
    InvalidArgumentError,
    MissingWeightsError,
)
from quantport.loading import resolve_model_dir

TINY = ["--device", "cpu", "--calib-samples", "4", "--calib-seq-len", "64", "--quiet"]


def _copy_bundled(directory: Path) -> Path:
    shutil.copytree(resolve_model_dir("bundled:tiny-llama"), directory)
    return directory


def _edit_config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _edit_weights(directory: Path, edit: Callable[[dict], dict]) -> None:
    from safetensors.torch import load_file, save_file

    file = directory / "model.safetensors"
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# -- model variants (each built in the case's own tmp directory) ------------------------------------------
def _good(tmp: Path) -> Path:
    return _copy_bundled(tmp / "model")


def _moe_config(tmp: Path) -> Path:
    """The tiny Llama whose config.json claims experts: only config checks run on it (they stop the run)."""
    model = _good(tmp)
    _edit_config(model, num_local_experts=4)
    return model


def _already_gptq(tmp: Path) -> Path:
    """Quantized by a method quantport does not read (FP8 blocks and MXFP4 it reads layer by layer)."""
    model = _good(tmp)
    _edit_config(model, quantization_config={"quant_method": "gptq", "bits": 4})
    return model


def _bad_json(tmp: Path) -> Path:
    model = _good(tmp)
    (model / "config.json").write_text("{not json")
    return model


def _no_weights(tmp: Path) -> Path:
    model = _good(tmp)
    (model / "model.safetensors").unlink()
    return model


def _no_config(tmp: Path) -> Path:
    model = _good(tmp)
    (model / "config.json").unlink()
    return model


def _wrong_prefix(tmp: Path) -> Path:
    model = _good(tmp)
    _edit_weights(model, lambda sd: {k.replace("model.", "transformer.", 1): v for k, v in sd.items()})
    return model


def _more_layers(tmp: Path) -> Path:
    model = _good(tmp)
    _edit_config(model, num_hidden_layers=4)
    return model


def _wrong_shape(tmp: Path) -> Path:
    model = _good(tmp)
    name = "model.layers.0.mlp.down_proj.weight"
    _edit_weights(model, lambda sd: {**sd, name: sd[name][:, :128].contiguous()})
    return model


def _truncated(tmp: Path) -> Path:
    model = _good(tmp)
    file = model / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100_000])
    return model


def _inf_norm(tmp: Path) -> Path:
    """Finite quantized weights, but a norm of +inf upstream: layer 1's activations are not finite."""
    import torch

    model = _good(tmp)
    name = "model.layers.1.input_layernorm.weight"
    _edit_weights(model, lambda sd: {**sd, name: torch.full_like(sd[name], float("inf"))})
    return model


def _text(tmp: Path, data: bytes) -> Path:
    path = tmp / "calib.txt"
    path.write_bytes(data)
    return path


@dataclass(frozen=True)
class Case:
    """One kind of bad input: the arguments after ``quantize MODEL OUT`` and what stderr must name."""

    id: str
    model: Callable[[Path], Path] | str
    args: Callable[[Path], list[str]]
    expect: tuple[str, ...]


def _args(*items: str) -> Callable[[Path], list[str]]:
    return lambda _tmp: list(items)


CASES = [
    # arguments alone (argparse, before anything is imported)
    Case("unknown-recipe", "bundled:tiny-llama", _args("--recipe", "int3"), ("unknown recipe 'int3'", "nvfp4")),
    Case("recipe-missing", "bundled:tiny-llama", _args(), ("--recipe",)),
    Case("unknown-option", "bundled:tiny-llama", _args("--recipe", "fp8", "--samples", "4"), ("--samples",)),
    Case("unknown-format", "bundled:tiny-llama", _args("--recipe", "fp8", "--format", "gguf"), ("--format", "gguf")),
    Case(
        "recipe-format-pair",
        "bundled:tiny-llama",
        _args("--recipe", "int8", "--format", "modelopt"),
        ("int8", "compressed-tensors"),
    ),
    Case("device-name", "bundled:tiny-llama", _args("--recipe", "fp8", "--device", "tpu"), ("--device", "tpu")),
    Case(
        "calib-samples-zero",
        "bundled:tiny-llama",
        _args("--recipe", "fp8", "--calib-samples", "0"),
        ("--calib-samples", "positive"),
    ),
    Case(
        "calib-seq-len-negative",
        "bundled:tiny-llama",
        _args("--recipe", "fp8", "--calib-seq-len", "-5"),
        ("--calib-seq-len", "positive"),
    ),
    Case(
        "calib-seq-len-text",
        "bundled:tiny-llama",
        _args("--recipe", "fp8", "--calib-seq-len", "long"),
        ("--calib-seq-len",),
    ),
    Case(
        "calib-batch-size-zero",
        "bundled:tiny-llama",
        _args("--recipe", "fp8", "--calib-batch-size", "0"),
        ("--calib-batch-size",),
    ),
    Case(
        "shard-size-word",
        "bundled:tiny-llama",
        _args("--recipe", "fp8", "--max-shard-size", "lots"),
        ("--max-shard-size", "'lots'", "5GB"),
    ),
    Case(
        "shard-size-zero",
        "bundled:tiny-llama",
        _args("--recipe", "fp8", "--max-shard-size", "0MB"),
        ("--max-shard-size", "positive"),
    ),
    # paths and the model's config.json (before torch is imported)
    Case("model-missing", lambda tmp: str(tmp / "nope"), _args("--recipe", "fp8"), ("nope", "does not exist")),
    Case("model-is-file", lambda tmp: str(_text(tmp, b"x")), _args("--recipe", "fp8"), ("calib.txt", "is a file")),
    Case("model-no-config", _no_config, _args("--recipe", "fp8"), ("model", "config.json")),
    Case("model-no-weights", _no_weights, _args("--recipe", "fp8"), ("model", "has no weights")),
    Case("config-not-json", _bad_json, _args("--recipe", "fp8"), ("config.json", "JSON")),
    Case("already-quantized-checkpoint", _already_gptq, _args("--recipe", "nvfp4"), ("already quantized", "'gptq'")),
    Case(
        "calib-seq-len-too-long",
        "bundled:tiny-llama",
        _args("--recipe", "fp8", "--calib-seq-len", "4096"),
        ("--calib-seq-len 4096", "max_position_embeddings 1024"),
    ),
    Case(
        "calib-text-missing",
        "bundled:tiny-llama",
        lambda tmp: ["--recipe", "fp8", "--calib-text", str(tmp / "no.txt")],
        ("--calib-text", "no.txt", "does not exist"),
    ),
    Case(
        "calib-text-directory",
        "bundled:tiny-llama",
        lambda tmp: ["--recipe", "fp8", "--calib-text", str(tmp)],
        ("--calib-text", "is a directory"),
    ),
    Case(
        "calib-text-binary",
        "bundled:tiny-llama",
        lambda tmp: ["--recipe", "fp8", "--calib-text", str(_text(tmp, b"text\x00\x01\x02" * 100))],
        ("--calib-text", "binary"),
    ),
    Case(
        "calib-text-not-utf8",
        "bundled:tiny-llama",
        lambda tmp: ["--recipe", "fp8", "--calib-text", str(_text(tmp, "café crème".encode("latin-1") * 100))],
        ("--calib-text", "not UTF-8"),
    ),
    Case(
        "coverage-png-dense",
        "bundled:tiny-llama",
        lambda tmp: ["--recipe", "fp8", "--coverage-png", str(tmp / "c.png")],
        ("--coverage-png", "not a Mixture-of-Experts"),
    ),
    Case(
        "coverage-png-no-parent",
        _moe_config,
        lambda tmp: ["--recipe", "fp8", "--coverage-png", str(tmp / "missing" / "c.png")],
        ("--coverage-png", "does not exist"),
    ),
    Case(
        "coverage-png-directory",
        _moe_config,
        lambda tmp: ["--recipe", "fp8", "--coverage-png", str(tmp)],
        ("--coverage-png", "is a directory"),
    ),
    Case(
        "coverage-png-weight-only",
        _moe_config,
        lambda tmp: ["--recipe", "w4a16", "--coverage-png", str(tmp / "c.png")],
        ("--coverage-png", "weight-only"),
    ),
    # the weights (transformers loads them; the run stops before calibration)
    Case(
        "weights-wrong-prefix",
        _wrong_prefix,
        _args("--recipe", "fp8", *TINY),
        ("missing (lm_head.weight", "unexpected (transformer.", "random values"),
    ),
    Case(
        "weights-fewer-layers",
        _more_layers,
        _args("--recipe", "fp8", *TINY),
        ("missing (model.layers.2.", "random values"),
    ),
    Case("weights-wrong-shape", _wrong_shape, _args("--recipe", "fp8", *TINY), ("could not load", "model")),
    Case("weights-truncated-file", _truncated, _args("--recipe", "fp8", *TINY), ("could not load", "model")),
    # the model's module names and its activations
    Case(
        "exclude-matches-nothing",
        "bundled:tiny-llama",
        _args("--recipe", "fp8", "--exclude", "*.layer.0.*", *TINY),
        ("--exclude '*.layer.0.*'", "matches no layer"),
    ),
    Case(
        "exclude-names-a-module",
        "bundled:tiny-llama",
        _args("--recipe", "fp8", "--exclude", "model.layers.0.self_attn", *TINY),
        ("--exclude 'model.layers.0.self_attn'", "'model.layers.0.self_attn.*'"),
    ),
    Case(
        "exclude-everything",
        "bundled:tiny-llama",
        _args("--recipe", "fp8", "--exclude", "model.*", *TINY),
        ("--exclude model.*", "nothing to quantize"),
    ),
    Case(
        "calib-text-too-short",
        "bundled:tiny-llama",
        lambda tmp: ["--recipe", "fp8", "--calib-text", str(_text(tmp, b"only a few words")), *TINY],
        ("fewer than one sequence", "--calib-seq-len"),
    ),
    Case(
        "nan-activations",
        _inf_norm,
        _args("--recipe", "fp8", *TINY),
        ("NaN or infinite activations", "model.layers.1.self_attn.q_proj", "--exclude"),
    ),
]


def _prepare(case: Case, tmp: Path) -> tuple[list[str], Path | None, Path]:
    model = case.model if isinstance(case.model, str) else case.model(tmp)
    source = resolve_model_dir("bundled:tiny-llama") if case.model == "bundled:tiny-llama" else Path(model)
    out_parent = tmp / "outputs"
    out_parent.mkdir()
    return ["quantize", str(model), str(out_parent / "out"), *case.args(tmp)], source, out_parent


def _assert_one_error_line(err: str, expect: tuple[str, ...]) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for fragment in expect:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_quantize_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, source, out_parent = _prepare(case, tmp_path)
    before = _snapshot(source) if source is not None and source.is_dir() else None
    capsys.readouterr()
    assert main(argv) == 2
    _assert_one_error_line(capsys.readouterr().err, case.expect)
    assert list(out_parent.iterdir()) == [], "something was written at OUT or beside it"
    if before is not None:
        assert _snapshot(source) == before, "the source model's files changed"


def test_device_cuda_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["quantize", "bundled:tiny-llama", str(tmp_path / "o"), "--recipe", "fp8", "--device", "cuda"]) == 2
    _assert_one_error_line(capsys.readouterr().err, ("--device cuda", "--device cpu"))
    assert not (tmp_path / "o").exists()


# -- the API ------------------------------------------------------------------------------------------------
@pytest.fixture
def llama(tiny_model):
    return tiny_model("llama")


def test_api_quantize_twice(llama, calib_batches) -> None:
    import quantport

    quantport.quantize(llama, "fp8", calib_data=calib_batches, progress=False)
    with pytest.raises(AlreadyQuantizedError, match="already quantized by quantport"):
        quantport.quantize(llama, "nvfp4", calib_data=calib_batches, progress=False)


def test_api_model_with_quant_modules_but_no_state(llama, calib_batches) -> None:
    import quantport

    quantport.quantize(llama, "fp8", calib_data=calib_batches, progress=False)
    del llama.__dict__["quantport_state"]
    with pytest.raises(AlreadyQuantizedError):
        quantport.quantize(llama, "fp8", calib_data=calib_batches, progress=False)


def test_api_model_from_quantized_checkpoint(llama, calib_batches) -> None:
    import quantport

    llama.config.quantization_config = {"quant_method": "fp8"}
    with pytest.raises(AlreadyQuantizedError, match="'fp8'"):
        quantport.quantize(llama, "nvfp4", calib_data=calib_batches, progress=False)


def test_api_fp8_weights(llama, calib_batches) -> None:
    import torch

    import quantport

    layer = llama.model.layers[0].mlp.down_proj
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(AlreadyQuantizedError, match="down_proj.weight is torch.float8_e4m3fn"):
        quantport.quantize(llama, "nvfp4", calib_data=calib_batches, progress=False)


def test_api_exclude_typo_suggests_names(llama, calib_batches) -> None:
    import quantport

    with pytest.raises(InvalidArgumentError, match="closest layer names: model.layers.0.mlp.down_proj"):
        quantport.quantize(
            llama, "fp8", calib_data=calib_batches, exclude=["model.layers.0.mlp.dwn_proj"], progress=False
        )
    assert not any(type(m).__name__ == "QuantLinear" for m in llama.modules()), "the model was changed"


def test_api_nan_activations(llama, calib_batches) -> None:
    import quantport

    llama.model.layers[1].input_layernorm.weight.data.fill_(float("nan"))
    with pytest.raises(InvalidActivationsError, match="model.layers.1.self_attn.q_proj"):
        quantport.quantize(llama, "nvfp4", calib_data=calib_batches, kv_cache="fp8", progress=False)


def test_api_load_model_missing_weights(tmp_path: Path) -> None:
    from quantport.loading import load_model

    with pytest.raises(MissingWeightsError, match="missing"):
        load_model(_more_layers(tmp_path), device="cpu", progress=False)


def test_api_calibration_text_not_utf8_after_the_first_read(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from quantport.calibrate import calibration_batches

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("bundled:tiny-llama"))
    path = _text(tmp_path, b"plain words " * 20_000 + b"\xff\xfe broken")
    with pytest.raises(CalibrationDataError, match="not UTF-8"):
        calibration_batches(tokenizer, text_path=path, samples=1000, seq_len=512)
    with pytest.raises(CalibrationDataError, match="is a directory"):
        calibration_batches(tokenizer, text_path=tmp_path, samples=4, seq_len=64)


# -- child processes: how early, and the real entry point ---------------------------------------------------
_CHILD = """
import sys, time
start = time.perf_counter()
from quantport.cli import main
code = main(sys.argv[1:])
print(f"{code} {time.perf_counter() - start:.3f} {'torch' in sys.modules} {'transformers' in sys.modules}")
"""


def _child(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.mark.parametrize(
    "extra",
    [
        ["/definitely/not/here", "--recipe", "fp8"],
        ["bundled:tiny-llama", "--recipe", "fp8", "--max-shard-size", "lots"],
        ["bundled:tiny-llama", "--recipe", "fp8", "--coverage-png", "c.png"],
        ["bundled:tiny-llama", "--recipe", "fp8", "--calib-seq-len", "99999"],
        ["bundled:tiny-llama", "--recipe", "int3"],
    ],
    ids=["missing-model", "shard-size", "coverage-png-dense", "seq-len", "recipe"],
)
def test_errors_come_before_torch_is_imported(extra: list[str], tmp_path: Path) -> None:
    start = time.perf_counter()
    result = _child("quantize", extra[0], str(tmp_path / "out"), *extra[1:])
    wall = time.perf_counter() - start
    code, seconds, torch_loaded, transformers_loaded = result.stdout.split()
    assert code == "2" and torch_loaded == "False" and transformers_loaded == "False", result.stdout
    _assert_one_error_line(result.stderr, ("error:",))
    assert float(seconds) < 1.0 and wall < 10.0, f"{seconds} s in main(), {wall:.1f} s with interpreter start"
    assert not (tmp_path / "out").exists()


def test_missing_weights_in_the_console_script(tmp_path: Path) -> None:
    model = _wrong_prefix(tmp_path)
    script = Path(sys.executable).with_name("quantport")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "quantport.cli"]
    result = subprocess.run(
        [*argv, "quantize", str(model), str(tmp_path / "out"), "--recipe", "fp8", *TINY],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    _assert_one_error_line(result.stderr, ("missing", "unexpected", str(model)))
    assert result.stdout == "" and not (tmp_path / "out").exists()

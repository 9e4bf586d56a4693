"""evaluate(): perplexity and KL divergence; the ``quantport eval`` command."""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import quantport
from quantport.eval_commands import add_commands
from quantport.evaluate import EvalDataError, EvalResult, bundled_eval_text, eval_batches, evaluate
from quantport.loader import load
from quantport.loading import resolve_model_dir

TRAINED = Path(__file__).resolve().parents[2] / "shared" / "models"
"""Trained test models in ``../shared/models`` next to the repository (tests using them skip without it)."""


def _quantized_tiny_llama(tmp_path, recipe: str = "fp8", kv_cache: str | None = "fp8"):
    """The bundled tiny Llama (it has a tokenizer), quantized and exported."""
    directory = resolve_model_dir("bundled:tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batches = eval_batches(tokenizer, samples=4, seq_len=64, batch_size=2)
    quantport.quantize(model, recipe, batches, kv_cache=kv_cache, progress=False)
    quantport.export(model, tmp_path / recipe, progress=False)
    return model, directory, tokenizer, tmp_path / recipe


def test_identical_models_have_zero_kl(tiny_model, calib_batches):
    model = tiny_model("llama")
    result = evaluate(model, model, calib_batches)
    assert result.kl_mean == 0.0
    assert result.ppl_base == result.ppl_quant and math.isfinite(result.ppl_base)
    assert result.tokens == sum(b.shape[0] * (b.shape[1] - 1) for b in calib_batches)


def test_matches_a_direct_computation(tiny_model, calib_batches):
    base, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    result = evaluate(base, other, calib_batches)
    ids = torch.cat(calib_batches)
    with torch.no_grad():
        log_p = F.log_softmax(base(ids).logits[:, :-1].float(), -1)
        log_q = F.log_softmax(other(ids).logits[:, :-1].float(), -1)
    target = ids[:, 1:]
    ppl = math.exp(F.nll_loss(log_p.flatten(0, 1), target.flatten()).item())
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum").item() / target.numel()
    assert result.ppl_base == pytest.approx(ppl, rel=1e-5)
    assert result.kl_mean == pytest.approx(kl, rel=1e-4)
    assert result == evaluate(base, other, calib_batches)  # deterministic


def test_fp8_checkpoint_against_its_base(tmp_path):
    quantized, directory, tokenizer, out = _quantized_tiny_llama(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()
    batches = eval_batches(tokenizer, samples=4, seq_len=128)
    loaded = load(out, simulate_activations=True)
    result = evaluate(base, loaded, batches)
    assert all(math.isfinite(v) for v in (result.ppl_base, result.ppl_quant, result.kl_mean))
    assert 0.0 < result.kl_mean < 0.01
    assert result.ppl_quant == pytest.approx(result.ppl_base, rel=0.02)
    with quantport.simulate(quantized):  # the in-memory simulation scores exactly the same
        assert evaluate(base, quantized, batches) == result


def test_eval_batches_from_the_bundled_text(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("bundled:tiny-llama"))
    batches = eval_batches(tokenizer, samples=5, seq_len=256, batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 256), (2, 256), (1, 256)]
    assert 60_000 < len(bundled_eval_text().encode()) < 100_000
    assert batches[0].dtype == torch.long


def test_eval_batches_bad_input(tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("bundled:tiny-llama"))
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    with pytest.raises(EvalDataError, match="fewer than one sequence"):
        eval_batches(tokenizer, text_path=short, seq_len=64)
    with pytest.raises(EvalDataError, match="not found"):
        eval_batches(tokenizer, text_path=tmp_path / "missing.txt")
    assert len(eval_batches(tokenizer, samples=10_000, seq_len=512)) > 0
    assert "holds" in caplog.text
    with pytest.raises(EvalDataError, match=r"input_ids tensors \[B, T\]"):
        evaluate(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), [torch.zeros(3, dtype=torch.long)])


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="quantport")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_eval_command(tmp_path, capsys):
    _, _, _, out = _quantized_tiny_llama(tmp_path, "nvfp4")
    code = _cli(
        "eval",
        "bundled:tiny-llama",
        str(out),
        "--samples",
        "2",
        "--seq-len",
        "64",
        "--device",
        "cpu",
        "--json",
        "--quiet",
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 2 * 63 and summary["simulate_activations"] is True
    assert summary["kl_mean"] > 0 and summary["ppl_quant"] > 1

    assert (
        _cli(
            "eval",
            "bundled:tiny-llama",
            str(out),
            "--samples",
            "2",
            "--seq-len",
            "64",
            "--device",
            "cpu",
            "--weights-only",
            "--quiet",
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "weights only" in text and "KL(base||q)" in text


def test_eval_command_errors(tmp_path, capsys):
    assert _cli("eval", "bundled:tiny-llama", str(tmp_path / "missing"), "--device", "cpu", "--quiet") == 2
    assert "does not exist" in capsys.readouterr().err
    _, _, _, out = _quantized_tiny_llama(tmp_path)
    assert _cli("eval", "bundled:tiny-llama", str(out), "--seq-len", "100000", "--device", "cpu", "--quiet") == 2
    assert "max_position_embeddings" in capsys.readouterr().err


@pytest.mark.reference
@pytest.mark.skipif(not (TRAINED / "qwen3moe_tiny").is_dir(), reason="trained test models not present")
def test_trained_moe_model_weight_only_fp8(tmp_path):
    """A really trained MoE model, experts quantized by nvidia-modelopt: FP8 barely moves perplexity."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    export_hf_checkpoint = pytest.importorskip("modelopt.torch.export").export_hf_checkpoint
    directory = TRAINED / "qwen3moe_tiny"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batches = eval_batches(tokenizer, samples=4, seq_len=256)
    base = AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        mtq.quantize(reference, mtq.FP8_DEFAULT_CFG, lambda m: [m(b) for b in batches[:1]])
        export_hf_checkpoint(reference, export_dir=tmp_path / "fp8")
    result = evaluate(base, load(tmp_path / "fp8"), batches)
    assert isinstance(result, EvalResult)
    assert 50 < result.ppl_base < 200
    assert result.ppl_quant == pytest.approx(result.ppl_base, rel=0.02)
    assert 0 < result.kl_mean < 0.01


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (b"\x10\0\0\0", "fewer than the 8-byte header length"),
        ((3_000_000_000).to_bytes(8, "little") + b"{", "exceeds the 100000000-byte limit"),
        (b"\x0c\0\0\0\0\0\0\0{not json!!}", "header is not valid JSON"),
    ],
)
def test_eval_corrupt_checkpoint_is_one_error_line(tmp_path, capsys, weights, match):
    """A corrupt QUANT fails with one line naming the file, before the base model is loaded."""
    quant = tmp_path / "quant"
    quant.mkdir()
    config = json.loads((resolve_model_dir("bundled:tiny-llama") / "config.json").read_text())
    (quant / "config.json").write_text(json.dumps(config))
    (quant / "model.safetensors").write_bytes(weights)
    assert _cli("eval", "bundled:tiny-llama", str(quant), "--device", "cpu", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {quant / 'model.safetensors'}: ") and match in err and "Traceback" not in err
    assert err.count("\n") == 1

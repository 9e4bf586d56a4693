"""``quantport eval`` on a compressed-tensors checkpoint: the same loader, so any dialect evaluates."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

import quantport
from quantport.cli import main
from quantport.evaluate import eval_batches
from quantport.export import recipe_for_format
from quantport.loading import resolve_model_dir

CT = "compressed-tensors"


def test_eval_reads_a_compressed_tensors_checkpoint(tmp_path, capsys):
    directory = resolve_model_dir("bundled:tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()
    batches = eval_batches(AutoTokenizer.from_pretrained(directory), samples=4, seq_len=64, batch_size=2)
    quantport.quantize(model, recipe_for_format("int8", CT), batches, progress=False)
    out = quantport.export(model, tmp_path / "int8", CT, progress=False)
    argv = ["eval", "bundled:tiny-llama", str(out), "--samples", "2", "--seq-len", "64", "--device", "cpu"]

    assert main([*argv, "--json", "--quiet"]) == 0

    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 2 * 63 and summary["simulate_activations"] is True
    assert summary["kl_mean"] > 0 and summary["ppl_quant"] > 1

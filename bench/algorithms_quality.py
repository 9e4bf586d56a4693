"""Calibration algorithms on the trained tiny MoE models: perplexity and KL on held-out text, one table.

Usage (from the repository root; needs ../shared/models and ../shared/data):

    .venv/bin/python bench/algorithms_quality.py                       # every model, recipe and algorithm
    .venv/bin/python bench/algorithms_quality.py --recipes w4a16 --algorithms max gptq

Each (model, recipe, algorithm) quantizes a fresh bf16 copy of the model with the same calibration
tokens (the first sequences of ``wiki_train.txt``) and evaluates the simulated model against the
unquantized one on held-out ``wiki_val.txt`` (``quantport.evaluate``: the numbers ``quantport eval``
prints; the exported checkpoints load back to the same logits, tests/calibrate/algorithms prove it).
Prints a markdown table (ppl, mean per-token KL, KL relative to ``max``, quantize time) and, with
``--json``, writes the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quantport
from quantport.evaluate import eval_batches, evaluate
from quantport.state import state_of

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTPORT_SHARED", ROOT.parent / "shared"))  # a worktree sets it
MODELS = ("qwen3moe_tiny", "llama4_tiny")
RECIPES = ("w4a16", "nvfp4", "int8")
ALGORITHMS = ("max", "mse", "gptq", "awq", "smoothquant")
APPLIES = {"awq": ("w4a16", "nvfp4"), "awq+gptq": ("w4a16", "nvfp4"), "smoothquant": ("nvfp4", "int8", "fp8")}
"""Recipes each scaling algorithm is for (AWQ: 4-bit weights; SmoothQuant: quantized activations); others: all."""


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=48)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--table-from", nargs="+", type=Path, help="only print the table of these JSON files' rows")
    parser.add_argument(
        "--modelopt",
        nargs="*",
        default=[],
        metavar="ALGORITHM",
        help="also nvidia-modelopt 0.47 with these algorithms (max, mse, awq_lite, smoothquant) where its config "
        "for the recipe has them (smoothquant: int8 only)",
    )
    return parser.parse_args()


def _load(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()


def _row(model_name: str, recipe: str, algorithm: str, args: argparse.Namespace, data: dict) -> dict:
    model = _load(SHARED / "models" / model_name)
    start = time.perf_counter()
    quantport.quantize(model, recipe, data["calib"], progress=False, algorithm=algorithm)
    seconds = time.perf_counter() - start
    state = state_of(model)
    with quantport.simulate(model):
        result = evaluate(data["base"], model, data["eval"])
    left = len(state.left_at_rtn)
    return {
        "model": model_name,
        "recipe": recipe,
        "algorithm": algorithm,
        "ppl_base": result.ppl_base,
        "ppl": result.ppl_quant,
        "kl": result.kl_mean,
        "tokens": result.tokens,
        "seconds": seconds,
        "left_at_rtn": left,
    }


MODELOPT_CONFIGS = {"w4a16": "INT4_AWQ_CFG", "nvfp4": "NVFP4_DEFAULT_CFG", "int8": "INT8_SMOOTHQUANT_CFG"}
MODELOPT_APPLIES = {"smoothquant": ("int8",), "awq_lite": ("w4a16", "nvfp4"), "mse": ("w4a16", "nvfp4")}


def _modelopt_row(model_name: str, recipe: str, algorithm: str, data: dict) -> dict:
    """nvidia-modelopt's fake-quantized model (its own INT4 ``amax/7`` or NVFP4 numerics, experts included)."""
    import copy

    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, MODELOPT_CONFIGS[recipe]))
    config["algorithm"] = {"method": algorithm} if algorithm != "max" else "max"
    model = _load(SHARED / "models" / model_name)
    start = time.perf_counter()
    with torch.no_grad():
        mtq.quantize(model, config, lambda m: [m(input_ids=b, use_cache=False) for b in data["calib"]])
    seconds = time.perf_counter() - start
    result = evaluate(data["base"], model, data["eval"])
    return {
        "model": model_name,
        "recipe": recipe,
        "algorithm": f"modelopt {algorithm}",
        "ppl_base": result.ppl_base,
        "ppl": result.ppl_quant,
        "kl": result.kl_mean,
        "tokens": result.tokens,
        "seconds": seconds,
        "left_at_rtn": "",
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| model | recipe | algorithm | ppl (base) | ppl | KL | KL / max | quantize s | modules at RTN |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    max_kl = {(r["model"], r["recipe"]): r["kl"] for r in rows if r["algorithm"] == "max"}
    for r in rows:
        ratio = r["kl"] / max_kl[(r["model"], r["recipe"])] if (r["model"], r["recipe"]) in max_kl else float("nan")
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['algorithm']} | {r['ppl_base']:.2f} | {r['ppl']:.2f} | "
            f"{r['kl']:.4f} | {ratio:.2f} | {r['seconds']:.1f} | {r['left_at_rtn']} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = _arguments()
    if args.table_from:
        print(_table([row for path in args.table_from for row in json.loads(path.read_text())]))
        return
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    rows = []
    for model_name in args.models:
        tokenizer = AutoTokenizer.from_pretrained(SHARED / "models" / model_name)
        calib = eval_batches(
            tokenizer, text_path=SHARED / "data" / "wiki_train.txt", samples=args.calib_samples, seq_len=args.seq_len
        )
        held_out = eval_batches(
            tokenizer, text_path=SHARED / "data" / "wiki_val.txt", samples=args.eval_samples, seq_len=args.seq_len
        )
        data = {"calib": calib, "eval": held_out, "base": _load(SHARED / "models" / model_name)}
        for recipe in args.recipes:
            for algorithm in [a for a in args.algorithms if recipe in APPLIES.get(a, (recipe,))]:
                rows.append(_row(model_name, recipe, algorithm, args, data))
                print(json.dumps(rows[-1]), flush=True)
            modelopt = [a for a in args.modelopt if recipe in MODELOPT_APPLIES.get(a, (recipe,))]
            for algorithm in modelopt if recipe in MODELOPT_CONFIGS else ():
                rows.append(_modelopt_row(model_name, recipe, algorithm, data))
                print(json.dumps(rows[-1]), flush=True)
    print(_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

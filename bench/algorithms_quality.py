"""Calibration algorithms on the trained tiny MoE models: perplexity and KL on held-out text, one table.

Usage (from the repository root; needs ../shared/models and ../shared/data):

    .venv/bin/python bench/algorithms_quality.py                       # every model, recipe and algorithm
    .venv/bin/python bench/algorithms_quality.py --recipes w4a16 --algorithms max gptq
    .venv/bin/python bench/algorithms_quality.py --recipes w4a16 --algorithms max gptq:experts=0 gptq:act_order=1
    .venv/bin/python bench/algorithms_quality.py --recipes w4a16 --algorithms max --llmcompressor   # its GPTQ too

An algorithm is a name or ``name:option=value,...`` (the typed options of
:mod:`quantport.algorithm_options`, e.g. ``gptq:experts=0`` for GPTQ on dense layers only). ``--llmcompressor``
runs ``bench/llmcompressor_gptq.py`` in the llm-compressor virtual environment (``--llmc-python``) on the
same model and calibration rows and evaluates the weights it chose here; ``--llmc-weights`` evaluates
weights such a run already wrote (``MODEL=FILE``, e.g. from a machine where llm-compressor is installed).
``--llmcompressor-awq`` / ``--llmc-awq-weights`` do the same with ``bench/llmcompressor_awq.py`` (its AWQ).

Each (model, recipe, algorithm) quantizes a fresh bf16 copy of the model with the same calibration
tokens (the first sequences of ``wiki_train.txt``) and evaluates the simulated model against the
unquantized one on held-out ``wiki_val.txt`` (``quantport.evaluate``: the numbers ``quantport eval``
prints; the exported checkpoints load back to the same logits, tests/calibrate/algorithms prove it).
Prints a markdown table (ppl, mean per-token KL, KL relative to ``max``, quantize time) and, with
``--json``, writes the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quantport
from quantport.algorithm_options import AlgorithmOptions, algorithm_options
from quantport.arch.experts import find_moe_blocks
from quantport.evaluate import eval_batches, evaluate
from quantport.state import state_of

ROOT = Path(__file__).resolve().parents[1]
SHARED = next(
    (p / "shared" for p in (ROOT, *ROOT.parents) if (p / "shared" / "models").is_dir()), ROOT.parent / "shared"
)
LLMC_PYTHON = next((p / ".venv-llmc/bin/python" for p in ROOT.parents if (p / ".venv-llmc").is_dir()), None)
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
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--llmcompressor", action="store_true", help="also llm-compressor's GPTQ (w4a16, nvfp4)")
    parser.add_argument("--llmc-python", type=Path, default=LLMC_PYTHON, help="the llm-compressor venv's python")
    parser.add_argument("--llmc-args", nargs="*", default=[], help="extra arguments of bench/llmcompressor_gptq.py")
    parser.add_argument("--llmc-weights", nargs="*", default=[], metavar="MODEL:RECIPE=FILE")
    parser.add_argument("--llmcompressor-awq", action="store_true", help="also llm-compressor's AWQ (w4a16, nvfp4)")
    parser.add_argument("--llmc-awq-args", nargs="*", default=[], help="extra arguments of bench/llmcompressor_awq.py")
    parser.add_argument("--llmc-awq-weights", nargs="*", default=[], metavar="MODEL:RECIPE=FILE")
    parser.add_argument("--dump-calib", type=Path, help="write each model's calibration rows to DIR/MODEL.pt, exit")
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


def _options(spec: str) -> AlgorithmOptions:
    """``name`` or ``name:key=value,...`` -> typed options (values: int, float, or a word)."""
    name, _, rest = spec.partition(":")
    options = algorithm_options(name)
    values = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kind = {f.name: f.type for f in dataclasses.fields(options)}[key]
        values[key] = (
            bool(int(value))
            if "bool" in str(kind)
            else int(value)
            if "int" in str(kind)
            else (float(value) if "float" in str(kind) else value)
        )
    return dataclasses.replace(options, **values) if values else options


def _row(model_name: str, recipe: str, algorithm: str, args: argparse.Namespace, data: dict) -> dict:
    model = _load(SHARED / "models" / model_name)
    start = time.perf_counter()
    quantport.quantize(model, recipe, data["calib"], progress=False, algorithm=_options(algorithm))
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


LLMC_SCHEMES = {"w4a16": "W4A16", "nvfp4": "NVFP4"}


def _run_llmcompressor(
    model_name: str, recipe: str, args: argparse.Namespace, data: dict, out: Path, algorithm: str = "gptq"
) -> None:
    calib = out.with_suffix(".calib.pt")
    torch.save(torch.cat(data["calib"]), calib)
    script = ROOT / "bench" / f"llmcompressor_{algorithm}.py"
    extra = args.llmc_args if algorithm == "gptq" else args.llmc_awq_args
    command = [str(args.llmc_python), str(script), str(SHARED / "models" / model_name), str(calib), str(out)]
    subprocess.run([*command, "--scheme", LLMC_SCHEMES[recipe], *extra], check=True)


def _with_llmc_weights(model: torch.nn.Module, path: Path) -> None:
    """Put llm-compressor's dequantized weights (linearized expert names) into ``model`` (and, after its AWQ,
    the norms and routers it scaled)."""
    from safetensors.torch import load_file

    weights = load_file(path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for block in find_moe_blocks(model):
            layout, experts = block.layout, block.experts
            prefix = f"{block.experts_name}."
            names = layout.leaf_names
            gates, ups, downs = [], [], []
            for e in range(block.num_experts):
                gates.append(weights.pop(f"{prefix}{e}.{names[0]}.weight"))
                ups.append(weights.pop(f"{prefix}{e}.{names[1]}.weight"))
                downs.append(weights.pop(f"{prefix}{e}.{names[2]}.weight"))
            experts.gate_up_proj.copy_(layout.fuse(torch.stack(gates), torch.stack(ups)))
            experts.down_proj.copy_(layout.unorient_down(torch.stack(downs)))
        for name, value in weights.items():
            params[name].copy_(value)


def _llmc_row(model_name: str, recipe: str, path: Path, data: dict, algorithm: str = "gptq") -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        seconds = float(json.loads(handle.metadata()["seconds"]))
    model = _load(SHARED / "models" / model_name)
    _with_llmc_weights(model, path)
    result = evaluate(data["base"], model, data["eval"])
    return {
        "model": model_name,
        "recipe": recipe,
        "algorithm": f"llm-compressor {algorithm}",
        "ppl_base": result.ppl_base,
        "ppl": result.ppl_quant,
        "kl": result.kl_mean,
        "tokens": result.tokens,
        "seconds": seconds,
        "left_at_rtn": "",
    }


MODELOPT_CONFIGS = {"w4a16": "INT4_AWQ_CFG", "nvfp4": "NVFP4_DEFAULT_CFG", "int8": "INT8_SMOOTHQUANT_CFG"}


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


def _model_rows(
    model_name: str, args: argparse.Namespace, given: dict[str, str], given_awq: dict[str, str]
) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "models" / model_name)
    calib = eval_batches(
        tokenizer, text_path=SHARED / "data" / "wiki_train.txt", samples=args.calib_samples, seq_len=args.seq_len
    )
    if args.dump_calib is not None:
        args.dump_calib.mkdir(parents=True, exist_ok=True)
        torch.save(torch.cat(calib), args.dump_calib / f"{model_name}.pt")
        return []
    held_out = eval_batches(
        tokenizer, text_path=SHARED / "data" / "wiki_val.txt", samples=args.eval_samples, seq_len=args.seq_len
    )
    data = {"calib": calib, "eval": held_out, "base": _load(SHARED / "models" / model_name)}
    rows = []
    for recipe in args.recipes:
        for algorithm in args.algorithms:
            rows.append(_row(model_name, recipe, algorithm, args, data))
            print(json.dumps(rows[-1]), flush=True)
        for algorithm in args.modelopt if recipe in MODELOPT_CONFIGS else ():
            rows.append(_modelopt_row(model_name, recipe, algorithm, data))
            print(json.dumps(rows[-1]), flush=True)
        weights = given.get(f"{model_name}:{recipe}")
        if weights is None and args.llmcompressor and recipe in LLMC_SCHEMES:
            weights = Path(tempfile.mkdtemp()) / f"{model_name}-{recipe}.safetensors"
            _run_llmcompressor(model_name, recipe, args, data, weights)
        if weights is not None:
            rows.append(_llmc_row(model_name, recipe, Path(weights), data))
            print(json.dumps(rows[-1]), flush=True)
        weights = given_awq.get(f"{model_name}:{recipe}")
        if weights is None and args.llmcompressor_awq and recipe in LLMC_SCHEMES:
            weights = Path(tempfile.mkdtemp()) / f"{model_name}-{recipe}-awq.safetensors"
            _run_llmcompressor(model_name, recipe, args, data, weights, "awq")
        if weights is not None:
            rows.append(_llmc_row(model_name, recipe, Path(weights), data, "awq"))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    args = _arguments()
    if args.table_from:
        print(_table([row for path in args.table_from for row in json.loads(path.read_text())]))
        return
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    given = dict(item.split("=", 1) for item in args.llmc_weights)
    given_awq = dict(item.split("=", 1) for item in args.llmc_awq_weights)
    rows = [row for model_name in args.models for row in _model_rows(model_name, args, given, given_awq)]
    if rows:
        print(_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

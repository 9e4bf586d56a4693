"""llm-compressor's GPTQ on one model and calibration set; writes the dequantized weights it chose.

Run by the llm-compressor virtual environment (it pins its own transformers; see
scripts/make-llmcompressor-fixtures.sh), normally from ``bench/algorithms_quality.py --llmcompressor``:

    .venv-llmc/bin/python bench/llmcompressor_gptq.py MODEL_DIR CALIB.pt OUT.safetensors \\
        [--scheme W4A16] [--routed-experts] [--damp 0.01] [--actorder static] [--block-size 128]

``CALIB.pt`` holds the calibration ``input_ids`` (``[N, T]``, the rows quantport calibrates on). The model is
linearized (fused experts become one Linear per projection per expert, llm-compressor's own MoE path), then
``oneshot`` runs a ``GPTQModifier`` on every Linear but ``lm_head`` and the routers, with llm-compressor's
sequential pipeline (each layer's quantized outputs feed the next) and, unless ``--routed-experts``, its
default ``moe_calibrate_all_experts`` (every token through every expert for the Hessians). Every quantized
Linear's weight, fake-quantized with its scales by compressed-tensors, is written to ``OUT`` under the
linearized names (``...mlp.experts.{e}.gate_proj.weight``); the caller maps them onto its own model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import linearize_moe
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scheme", default="W4A16")
    parser.add_argument("--routed-experts", action="store_true", help="experts' Hessians from routed tokens only")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--actorder", default=None, help="static, group, weight or none (llm-compressor's default)")
    parser.add_argument("--block-size", type=int, default=128)
    return parser.parse_args()


def _dequantized(module: torch.nn.Module) -> torch.Tensor:
    args = module.quantization_scheme.weights
    zero_point = getattr(module, "weight_zero_point", None)
    global_scale = getattr(module, "weight_global_scale", None)
    with torch.no_grad():
        return fake_quantize(module.weight, module.weight_scale, zero_point, args, global_scale).to(module.weight.dtype)


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING)
    rows = torch.load(args.calib)
    samples = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in rows]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    linearize_moe(model)
    extra = {} if args.actorder is None else {"actorder": None if args.actorder == "none" else args.actorder}
    recipe = GPTQModifier(
        targets="Linear",
        scheme=args.scheme,
        ignore=["lm_head", "re:.*mlp.gate$", "re:.*router$"],
        dampening_frac=args.damp,
        block_size=args.block_size,
        **extra,
    )
    start = time.perf_counter()
    oneshot(
        model=model,
        recipe=recipe,
        dataset=DataLoader(samples, batch_size=None),
        num_calibration_samples=len(samples),
        processor=AutoTokenizer.from_pretrained(args.model),
        moe_calibrate_all_experts=not args.routed_experts,
    )
    seconds = time.perf_counter() - start
    weights = {
        f"{name}.weight": _dequantized(module).contiguous()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and getattr(module, "quantization_scheme", None) is not None
    }
    save_file(weights, str(args.out), metadata={"seconds": json.dumps(seconds)})
    print(json.dumps({"quantized": len(weights), "seconds": seconds}))


if __name__ == "__main__":
    main()

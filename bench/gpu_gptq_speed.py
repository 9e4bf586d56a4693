"""GPTQ time on one GPU, per decoder layer, for a Qwen3-30B-A3B-shaped stack (issue 13).

Builds the 4-layer Qwen3-30B-A3B-shaped stack of bench/gpu_moe_calibration.py (random bf16 weights on the
device, nothing downloaded), calibrates it with ``--algorithm max`` and with ``gptq`` (dense Linears and every
expert, one Hessian per expert from its routed tokens) on the same batches, and reports the GPTQ time per
layer (GPTQ minus max, divided by the layers) and its extrapolation to the full model's 48 layers (target
<= 20 minutes on one H200). llm-compressor is not installed on the device machine; the issue's reference is its
published 14,207 s for Qwen3-30B-A3B on one GPU (~296 s per layer).

    python bench/gpu_gptq_speed.py --json OUT.json [--layers 4] [--batches 8] [--recipe w4a16]
    python bench/gpu_gptq_speed.py --smoke --recipe nvfp4    # tiny shapes on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import gpu_moe_calibration as stack  # noqa: E402

LLMCOMPRESSOR_QWEN3_30B_S = 14207  # published, one GPU, 48 layers (the figure)


def timed_quantize(model_type, config, recipe, calib, device, algorithm) -> float:
    import quantport

    model = stack.build(model_type, config, device)
    stack.sync(device)
    start = time.perf_counter()
    quantport.quantize(model, recipe, calib, progress=False, release_weights=False, algorithm=algorithm)
    stack.sync(device)
    seconds = time.perf_counter() - start
    del model
    stack.free_memory()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8, help="calibration batches of 4 x 512 tokens")
    parser.add_argument("--recipe", default="w4a16")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from quantport.algorithm_options import GptqOptions

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    model_type, config, _ = stack.SHAPES["Qwen3-30B-A3B shape"]
    config = dict(stack.SMOKE["qwen3 tiny"][1] if args.smoke else config)
    config["num_hidden_layers"] = 2 if args.smoke else args.layers
    calib = stack.batches(config["vocab_size"], 2 if args.smoke else args.batches, 4, 32 if args.smoke else 512, device)
    max_s = timed_quantize(model_type, config, args.recipe, calib, device, "max")
    gptq_s = timed_quantize(model_type, config, args.recipe, calib, device, GptqOptions())
    layers = config["num_hidden_layers"]
    per_layer = (gptq_s - max_s) / layers
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": "Qwen3-30B-A3B" if not args.smoke else "smoke",
        "layers": layers,
        "recipe": args.recipe,
        "calibration_tokens": stack.tokens(calib),
        "max_s": max_s,
        "gptq_s": gptq_s,
        "gptq_per_layer_s": per_layer,
        "extrapolated_48_layers_s": max_s / layers * 48 + per_layer * 48,
        "llmcompressor_published_48_layers_s": LLMCOMPRESSOR_QWEN3_30B_S,
    }
    result["ratio_to_llmcompressor_published"] = result["extrapolated_48_layers_s"] / LLMCOMPRESSOR_QWEN3_30B_S
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

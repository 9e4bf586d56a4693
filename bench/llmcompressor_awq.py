"""llm-compressor's AWQ on one model and calibration set; writes the weights it chose (dequantized).

Run by the llm-compressor virtual environment (see scripts/make-llmcompressor-fixtures.sh), normally from
``bench/algorithms_quality.py --llmcompressor-awq``:

    .venv-llmc/bin/python bench/llmcompressor_awq.py MODEL_DIR CALIB.pt OUT.safetensors \\
        [--scheme W4A16] [--n-grid 20] [--duo-scaling true|false|both]

As ``bench/llmcompressor_gptq.py``: the model is linearized (one Linear per projection per expert), then
``oneshot`` runs an ``AWQModifier`` (llm-compressor's mappings for the family: norm -> q/k/v, norm -> router
and every expert's and the shared expert's gate/up, each up_proj -> its down_proj; v_proj -> o_proj is
skipped by llm-compressor where grouped-query heads make the shapes differ) and a ``QuantizationModifier``
with the scheme on every Linear but ``lm_head`` and the routers. ``OUT`` holds every quantized Linear's
fake-quantized weight under the linearized names, and the weights AWQ divided or compensated (the norms
and the routers), under the model's names.
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
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQ_MAPPING_REGISTRY, AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

LLAMA4_MAPPINGS = "Llama4ForConditionalGeneration"
"""llm-compressor registers its Llama 4 mappings (router compensated) under the multimodal class only."""


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scheme", default="W4A16")
    parser.add_argument("--n-grid", type=int, default=20)
    parser.add_argument("--duo-scaling", default="true", choices=("true", "false", "both"))
    return parser.parse_args()


def _dequantized(module: torch.nn.Module) -> torch.Tensor:
    args = module.quantization_scheme.weights
    zero_point = getattr(module, "weight_zero_point", None)
    global_scale = getattr(module, "weight_global_scale", None)
    with torch.no_grad():
        return fake_quantize(module.weight, module.weight_scale, zero_point, args, global_scale).to(module.weight.dtype)


def _mappings(model: torch.nn.Module):
    """The family's mappings (Llama 4 text models get the multimodal class's, which compensate the router)."""
    if model.config.model_type == "llama4_text":
        return AWQ_MAPPING_REGISTRY[LLAMA4_MAPPINGS]
    return None  # llm-compressor infers them from the architecture


def main() -> None:
    args = _arguments()
    if not torch.cuda.is_available():  # its grid search pins the cached inputs, which needs an accelerator
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    logging.basicConfig(level=logging.WARNING)
    rows = torch.load(args.calib)
    samples = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in rows]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    text_only = model.config.model_type == "llama4_text"
    if text_only:  # llm-compressor's Llama 4 linearization reads config.text_config (the multimodal config)
        model.config.text_config = model.config
    linearize_moe(model)
    if text_only:
        del model.config.text_config
    duo = {"true": True, "false": False, "both": "both"}[args.duo_scaling]
    ignore = ["lm_head", "re:.*mlp.gate$", "re:.*router$"]
    recipe = [
        AWQModifier(mappings=_mappings(model), duo_scaling=duo, n_grid=args.n_grid),
        QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=ignore),
    ]
    start = time.perf_counter()
    oneshot(
        model=model,
        recipe=recipe,
        dataset=DataLoader(samples, batch_size=None),
        num_calibration_samples=len(samples),
        processor=AutoTokenizer.from_pretrained(args.model),
    )
    seconds = time.perf_counter() - start
    weights = {
        f"{name}.weight": _dequantized(module).contiguous()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and getattr(module, "quantization_scheme", None) is not None
    }
    for name, param in model.named_parameters():
        if name not in weights and ("norm" in name or name.endswith(("mlp.gate.weight", "router.weight"))):
            weights[name] = param.detach().contiguous()
    save_file(weights, str(args.out), metadata={"seconds": json.dumps(seconds)})
    print(json.dumps({"saved": len(weights), "seconds": seconds}))


if __name__ == "__main__":
    main()

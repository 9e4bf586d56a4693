"""Peak memory while one DeepSeek-V3 MoE layer loads layer by layer (issue 12), against the layer's own bytes.

A 2-layer DeepSeek-V3-shaped model (layer 0 dense, layer 1 MoE; real hidden and expert sizes, ``--experts``
routed experts, a 1024-token vocabulary) from a synthetic FP8-block source; the MoE layer is loaded once.
On a GPU the peak is ``torch.cuda.max_memory_allocated`` during the load; on the CPU it is the peak of live
tensors allocated during the load (``tests/live_memory.py``: every allocation counted until freed).
``--gather transformers`` loads the experts through transformers' own stack-and-concatenate instead of
quantport's expert fill, for comparison.

    python bench/moe_layer_load.py --experts 16                       # CPU, ~1 min, ~4 GB of RAM
    python bench/moe_layer_load.py --experts 16 --gather transformers
    python bench/moe_layer_load.py --experts 256 --device cuda        # the real layer: 21.4 GiB bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # transformers' loading in this thread: the CPU meter is per thread

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from gpu_sequential import DEEPSEEK_V3  # noqa: E402

from live_memory import LiveBytes, storage_bytes  # noqa: E402


def _transformers_gather() -> None:
    """Every key to transformers' conversion (the loading before the expert fill)."""
    from quantport.sequential import layer_store

    plan = layer_store.plan_expert_reads

    def everything_to_transformers(keys, *args, **kwargs):
        reads = plan(keys, *args, **kwargs)
        reads.rest, reads.pieces = list(keys), {}
        return reads

    layer_store.plan_expert_reads = everything_to_transformers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gather", choices=("quantport", "transformers"), default="quantport")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers import DeepseekV3Config

    from quantport.sequential import open_layer_by_layer
    from quantport.sources import SyntheticSource, model_tensor_infos

    if args.gather == "transformers":
        _transformers_gather()
    device = torch.device(args.device)
    shape = {
        **DEEPSEEK_V3, "num_hidden_layers": 2, "first_k_dense_replace": 1, "n_routed_experts": args.experts,
        "num_experts_per_tok": min(8, args.experts), "n_group": 1, "topk_group": 1, "vocab_size": 1024,
    }  # fmt: skip
    config = DeepseekV3Config(**shape, dtype=torch.bfloat16, architectures=["DeepseekV3ForCausalLM"])
    with tempfile.TemporaryDirectory() as directory:
        config.save_pretrained(directory)
        source = SyntheticSource(model_tensor_infos(config), seed=1, fp8_block=True)
        store = open_layer_by_layer(directory, device=device, source=source).__dict__["_quantport_layer_store"]
        gpu = device.type == "cuda"
        if gpu:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with nullcontext() if gpu else LiveBytes() as live:
            layer = store.load(1)
        if gpu:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) - before if gpu else live.peak
        layer_bytes = storage_bytes([*layer.parameters(), *layer.buffers()])
    result = {
        "experts": args.experts,
        "gather": args.gather,
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "layer_gib": layer_bytes / 2**30,
        "peak_gib": peak / 2**30,
        "peak_over_layer": peak / layer_bytes,
        "load_s": seconds,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""How fast the weight sources deliver one decoder layer at a time onto the GPU (issue 12, part 5).

1. ``synthetic``: every tensor of a DeepSeek-V3-shaped model (61 layers, 256 experts, 671B parameters)
   from :class:`quantport.sources.SyntheticSource` with ``fp8_block=True`` (e4m3 codes + 128x128 block
   scales generated on the GPU, then dequantized to bf16 there), one layer at a time, each layer freed
   before the next. Reports wall time, GPU time, parameters/s and peak GPU memory.
2. ``checkpoint``: a Qwen3-30B-A3B-shaped FP8-block checkpoint of ``--checkpoint-layers`` layers written
   to ``--out`` (codes and scales from the same synthetic source), then read back layer by layer through
   :func:`quantport.sources.open_source` onto the GPU (page cache warm: the file was just written).

    python bench/weight_sources.py --json r.json                      # both, full size (one H200)
    python bench/weight_sources.py --layers 4 --checkpoint-layers 2   # smaller
    python bench/weight_sources.py --smoke                            # tiny, on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quantport.sources import SyntheticSource, model_tensor_infos, open_source  # noqa: E402

LAYER = re.compile(r"\.layers\.(\d+)\.")


def by_layer(names) -> dict[int, list[str]]:
    """Tensor names grouped by decoder layer; -1 for the rest (embeddings, final norm, lm_head)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name in names:
        match = LAYER.search(name)
        groups[int(match.group(1)) if match else -1].append(name)
    return dict(sorted(groups.items()))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def deepseek_v3(layers: int, smoke: bool):
    from transformers import DeepseekV3Config

    if smoke:
        return DeepseekV3Config(
            vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=layers,
            first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
            num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=32,
            qk_nope_head_dim=64, v_head_dim=64,
        )  # fmt: skip
    return DeepseekV3Config(num_hidden_layers=layers)  # the defaults are DeepSeek-V3's 671B shape


def qwen3_30b_a3b(layers: int, smoke: bool):
    from transformers import Qwen3MoeConfig

    if smoke:
        return Qwen3MoeConfig(
            vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=layers,
            num_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        )  # fmt: skip
    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128,
    )  # fmt: skip


def reset_peak_rss() -> None:
    """Start a new host-memory peak (Linux: writing 5 to clear_refs resets VmHWM); a no-op where unsupported."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gb() -> float:
    """Peak resident memory since the last reset (VmHWM), else since the start (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1e6, 2)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)


def read_layers(source, device: torch.device) -> dict:
    """Read every layer (freeing each) and time it."""
    groups = by_layer(source.tensors())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_layer, layer_bytes, params, nbytes = [], [], 0, 0
    reset_peak_rss()
    synchronize(device)
    start = time.perf_counter()
    for _, names in groups.items():
        layer_start = time.perf_counter()
        tensors = source.read(names, device)
        synchronize(device)
        per_layer.append(time.perf_counter() - layer_start)
        params += sum(t.numel() for t in tensors.values())
        layer_bytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        nbytes += layer_bytes[-1]
        del tensors
    wall = time.perf_counter() - start
    return {
        "tensors": sum(len(n) for n in groups.values()),
        "layers": len([k for k in groups if k >= 0]),
        "params_billion": round(params / 1e9, 3),
        "bytes_returned_gb": round(nbytes / 1e9, 2),
        "wall_s": round(wall, 2),
        "slowest_layer_s": round(max(per_layer), 3),
        "median_layer_s": round(sorted(per_layer)[len(per_layer) // 2], 3),
        "params_per_s_billion": round(params / wall / 1e9, 1),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
        "peak_rss_gb": peak_rss_gb(),
        "largest_layer_gb": round(max(layer_bytes) / 1e9, 2),
    }


def bench_synthetic(layers: int, device: torch.device, smoke: bool) -> dict:
    start = time.perf_counter()
    infos = model_tensor_infos(deepseek_v3(layers, smoke))
    infos_s = time.perf_counter() - start
    source = SyntheticSource(infos, seed=0, fp8_block=True)
    result = read_layers(source, device)
    result["model_tensor_infos_s"] = round(infos_s, 2)
    result["fp8_tensors"] = sum(source.is_fp8(n) for n in infos)
    return result


def write_fp8_checkpoint(directory: Path, layers: int, device: torch.device, smoke: bool) -> tuple[float, float]:
    """An FP8-block checkpoint, one shard per layer; returns (seconds, GB written)."""
    from safetensors.torch import save_file

    config = qwen3_30b_a3b(layers, smoke)
    infos = model_tensor_infos(config)
    source = SyntheticSource(infos, seed=0, fp8_block=True)
    directory.mkdir(parents=True, exist_ok=True)
    start, written, weight_map = time.perf_counter(), 0, {}
    for layer, names in by_layer(infos).items():
        shard: dict[str, torch.Tensor] = {}
        for name in names:
            if source.is_fp8(name):
                codes, scale_inv = source.fp8_parts(name, device)
                shard[name], shard[name + "_scale_inv"] = codes.cpu(), scale_inv.cpu()
            else:
                shard.update({k: v.cpu() for k, v in source.read([name], device).items()})
        file = f"model-layer{layer + 1:03d}.safetensors"
        save_file(shard, str(directory / file))
        written += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(shard, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config_dict = config.to_dict()
    config_dict["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"}
    config_dict["dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config_dict))
    return time.perf_counter() - start, written / 1e9


def bench_checkpoint(directory: Path, layers: int, device: torch.device, smoke: bool) -> dict:
    write_s, gb = write_fp8_checkpoint(directory, layers, device, smoke)
    with open_source(directory) as source:
        result = read_layers(source, device)
    result.update(write_s=round(write_s, 1), checkpoint_gb=round(gb, 2))
    result["stored_gb_per_s"] = round(gb / result["wall_s"], 2)
    shutil.rmtree(directory)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=61, help="DeepSeek-V3 layers for the synthetic run (0: skip)")
    parser.add_argument("--checkpoint-layers", type=int, default=8, help="Qwen3-30B-A3B layers written (0: skip)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/qp-fp8-source"), help="where the checkpoint goes")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if args.layers:
        results["synthetic_deepseek_v3_fp8"] = bench_synthetic(args.layers, device, args.smoke)
        print(json.dumps(results, indent=1), flush=True)
    if args.checkpoint_layers:
        results["fp8_checkpoint_qwen3_30b_a3b"] = bench_checkpoint(args.out, args.checkpoint_layers, device, args.smoke)
    print(json.dumps(results, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

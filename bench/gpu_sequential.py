"""Layer-by-layer quantization at full size on one GPU (issue 12).

Two cases, each one process:

* ``fp8-checkpoint``: a Qwen3-30B-A3B-shaped model (48 layers, 128 experts) written to local disk as an
  FP8 128x128-block checkpoint (as Qwen ships its -FP8 models: ``weight`` e4m3 + ``weight_scale_inv``),
  then ``quantport`` reads it one layer at a time, dequantizes on the GPU, calibrates and writes NVFP4.
  Reports wall time per phase, peak GPU memory, peak host RSS, output GB/s. ``--reference``: the same
  dequantized weights loaded whole on the GPU and quantized + exported by nvidia-modelopt. Writing the
  source, quantport and nvidia-modelopt each run in their own process, so each peak RSS is its own.
* ``deepseek``: a DeepSeek-V3-shaped model (61 layers: 3 dense + 58 MoE of 256 experts, 671B parameters)
  from a synthetic FP8-block source generating each tensor on the GPU; NVFP4; the export's tensors are
  computed, copied to page-locked host memory and checksummed instead of stored (400 GB). ``--layers N``
  runs the first N layers and extrapolates the time per MoE layer to 61.

    python bench/gpu_sequential.py fp8-checkpoint --dir /tmp/q30b-fp8 --out /tmp/q30b-nvfp4 [--reference]
    python bench/gpu_sequential.py deepseek --layers 8 --samples 256 --seq 2048
    python bench/gpu_sequential.py deepseek --smoke       # tiny shapes on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_full_export import QWEN3_30B, peak_rss_bytes, sync  # noqa: E402  (the same shape and meters)

DEEPSEEK_V3 = dict(
    hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
    num_experts_per_tok=8, first_k_dense_replace=3, num_hidden_layers=61, num_attention_heads=128,
    num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
    v_head_dim=128, vocab_size=129280, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=4096,
)  # fmt: skip
SMOKE_DEEPSEEK = dict(
    hidden_size=128, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, first_k_dense_replace=1, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, vocab_size=512,
    n_group=1, topk_group=1, max_position_embeddings=256,
)  # fmt: skip
SMOKE_QWEN = dict(
    hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2, vocab_size=512,
)  # fmt: skip
FP8_CONFIG = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic", "fmt": "e4m3"}


def calibration(vocab: int, samples: int, seq: int, batch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return list(torch.randint(0, vocab, (samples, seq), generator=generator).split(batch))


class LayerClock:
    """Times each decoder layer: from one layer's free (end) to the next, in calibration and in export."""

    def __init__(self, store) -> None:
        self.marks: list[tuple[int, float]] = []
        free = store.free

        def timed_free(index: int) -> None:
            free(index)
            self.marks.append((index, time.perf_counter()))

        store.free = timed_free


def write_fp8_checkpoint(config, directory: Path, device: torch.device, max_shard: int = 5 << 30) -> float:
    """The config's model as an FP8-block checkpoint in ``directory`` (tensors generated on ``device``; each
    shard is saved as soon as it is full, so the host holds one shard at a time)."""
    from safetensors.torch import save_file

    from quantport.sources import SyntheticSource, model_tensor_infos

    start = time.perf_counter()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    infos = model_tensor_infos(config)
    source = SyntheticSource(infos, seed=1, fp8_block=True)
    shard: dict[str, torch.Tensor] = {}
    saved: list[tuple[Path, list[str]]] = []
    size = 0

    def save() -> None:
        path = directory / f"part-{len(saved):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        saved.append((path, list(shard)))
        shard.clear()

    for name in infos:
        if source.is_fp8(name):
            codes, scale = source.fp8_parts(name, device)
            tensors = {name: codes, name.removesuffix("weight") + "weight_scale_inv": scale}
        else:
            tensors = source.read([name], device)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if size + nbytes > max_shard and shard:
            save()
            size = 0
        shard.update({k: v.to("cpu") for k, v in tensors.items()})
        size += nbytes
    if shard:
        save()
    weight_map = {}
    for i, (path, names) in enumerate(saved):
        file = f"model-{i + 1:05d}-of-{len(saved):05d}.safetensors"
        path.rename(directory / file)
        weight_map.update(dict.fromkeys(names, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.quantization_config = FP8_CONFIG
    config.save_pretrained(directory)
    os.sync()
    return time.perf_counter() - start


def _qwen_config(args):
    from transformers import Qwen3MoeConfig

    shape = SMOKE_QWEN if args.smoke else {**QWEN3_30B, "num_hidden_layers": args.layers or 48}
    return Qwen3MoeConfig(**shape, dtype=torch.bfloat16, architectures=["Qwen3MoeForCausalLM"])


def fp8_checkpoint(args, device: torch.device) -> dict:
    """Three processes, so each one's peak host RSS is its own: write the source, quantport, nvidia-modelopt."""
    phases = ["write", "quantport"] + (["modelopt"] if args.reference else [])
    result: dict = {"case": "fp8-checkpoint"}
    for phase in phases:
        out = Path(f"/tmp/gpu_sequential_{phase}.json")
        command = [sys.executable, __file__, "fp8-checkpoint", "--phase", phase, "--json", str(out)]
        command += ["--dir", str(args.dir), "--out", str(args.out), "--samples", str(args.samples)]
        command += ["--seq", str(args.seq), "--batch", str(args.batch)]
        command += (["--layers", str(args.layers)] if args.layers else []) + (["--smoke"] if args.smoke else [])
        subprocess.run(command, check=True)
        answer = json.loads(out.read_text())
        answer.pop("device", None)
        if phase == "write":
            result.update(answer)
        else:
            result[phase] = answer
    return result


def fp8_phase(args, device: torch.device) -> dict:
    """One phase of :func:`fp8_checkpoint`, in this process."""
    config = _qwen_config(args)
    if args.phase == "write":
        written = write_fp8_checkpoint(config, args.dir, device)
        return {
            "layers": config.num_hidden_layers,
            "source_gb": sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / 1e9,
            "write_source_s": written,
            "write_peak_rss_gib": peak_rss_bytes() / 2**30,
        }
    batches = calibration(config.vocab_size, args.samples, args.seq, args.batch)
    if args.phase == "modelopt":
        return reference(args, batches, device)
    import quantport
    from quantport.sequential import open_layer_by_layer

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = open_layer_by_layer(args.dir, device=device)
    opened = time.perf_counter()
    clock = LayerClock(model.__dict__["_quantport_layer_store"])
    quantport.quantize(model, "nvfp4", batches, progress=False)
    sync(device)
    calibrated = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    quantport.export(model, args.out, progress=False)
    done = time.perf_counter()
    out_bytes = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    shutil.rmtree(args.out, ignore_errors=True)  # the disk holds the source and one export, not two
    return {
        "open_s": opened - start,
        "calibrate_s": calibrated - opened,
        "export_s": done - calibrated,
        "total_s": done - start,
        "export_gb": out_bytes / 1e9,
        "export_gb_per_s": out_bytes / 1e9 / (done - calibrated),
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_rss_gib": peak_rss_bytes() / 2**30,
        "calibration_tokens": args.samples * args.seq,
        "layer_marks": len(clock.marks),
    }


def reference(args, batches, device: torch.device) -> dict:
    """nvidia-modelopt on the same dequantized weights, loaded whole on the GPU."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    from quantport.sequential import open_layer_by_layer

    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = open_layer_by_layer(args.dir, device=device)
    store = model.__dict__.pop("_quantport_layer_store")
    for index in range(len(store.skeleton.layers)):
        store.load(index)
    loaded = time.perf_counter()

    def loop(m):
        with torch.no_grad():
            for batch in batches:
                m(input_ids=batch.to(device), use_cache=False)

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
    sync(device)
    calibrated = time.perf_counter()
    out = Path(str(args.out) + "-modelopt")
    shutil.rmtree(out, ignore_errors=True)
    export_hf_checkpoint(model, export_dir=str(out))
    done = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    return {
        "load_whole_s": loaded - start,
        "calibrate_s": calibrated - loaded,
        "export_s": done - calibrated,
        "total_s": done - start,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "peak_rss_gib": peak_rss_bytes() / 2**30,
    }


def hashed_export(model, device: torch.device) -> dict:
    """Every planned tensor computed, copied to page-locked host memory and checksummed (no disk)."""
    from quantport.export import FORMAT_CONTENT, ExportFormat
    from quantport.export.shards import natural_order
    from quantport.sequential.streaming import LayerStream
    from quantport.state import state_of

    store = model.__dict__["_quantport_layer_store"]
    content = FORMAT_CONTENT[ExportFormat.MODELOPT](model, state_of(model))
    plan = sorted(LayerStream(store).wrap(content.plan), key=lambda e: natural_order(e.name))
    pinned = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=device.type == "cuda")
    checksum = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    copy_s = 0.0
    for entry in plan:
        data = entry.compute().detach().contiguous().view(-1).view(torch.uint8)
        pad = (-data.numel()) % 8
        words = torch.nn.functional.pad(data, (0, pad)).view(torch.int64)
        checksum = checksum + words.sum()
        started = time.perf_counter()
        for offset in range(0, data.numel(), pinned.numel()):
            piece = data[offset : offset + pinned.numel()]
            pinned[: piece.numel()].copy_(piece, non_blocking=True)
            sync(device)
        copy_s += time.perf_counter() - started
        total += data.numel()
    return {"bytes": total, "checksum": int(checksum), "copy_to_host_s": copy_s}


def deepseek(args, device: torch.device) -> dict:
    from transformers import DeepseekV3Config

    import quantport
    from quantport.sequential import open_layer_by_layer
    from quantport.sources import SyntheticSource, model_tensor_infos

    shape = SMOKE_DEEPSEEK if args.smoke else {**DEEPSEEK_V3, "num_hidden_layers": args.layers or 61}
    config = DeepseekV3Config(**shape, dtype=torch.bfloat16, architectures=["DeepseekV3ForCausalLM"])
    args.dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(args.dir)
    infos = model_tensor_infos(config)
    parameters = sum(torch.Size(i.shape).numel() for i in infos.values())
    source = SyntheticSource(infos, seed=1, fp8_block=True)
    batches = calibration(config.vocab_size, args.samples, args.seq, args.batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = open_layer_by_layer(args.dir, device=device, source=source)
    opened = time.perf_counter()
    clock = LayerClock(model.__dict__["_quantport_layer_store"])
    quantport.quantize(model, "nvfp4", batches, progress=args.progress)
    sync(device)
    calibrated = time.perf_counter()
    calibration_marks = list(clock.marks)
    hashed = hashed_export(model, device)
    sync(device)
    done = time.perf_counter()
    export_marks = clock.marks[len(calibration_marks) :]
    layers = config.num_hidden_layers
    dense = config.first_k_dense_replace
    calib_times = _layer_times(opened, calibration_marks)
    export_times = _layer_times(calibrated, export_marks)
    moe_layer_s = (sum(calib_times[dense:]) + sum(export_times[dense:])) / max(1, layers - dense)
    dense_layer_s = (sum(calib_times[:dense]) + sum(export_times[:dense])) / max(1, dense)
    full = 61 if not args.smoke else layers
    return {
        "case": "deepseek",
        "layers": layers,
        "parameters_b": parameters / 1e9,
        "calibration_tokens": args.samples * args.seq,
        "open_s": opened - start,
        "calibrate_s": calibrated - opened,
        "export_s": done - calibrated,
        "total_s": done - start,
        "calibrate_layer_s": calib_times,
        "export_layer_s": export_times,
        "moe_layer_s": moe_layer_s,
        "extrapolated_61_layers_s": (opened - start) + 3 * dense_layer_s + (full - 3) * moe_layer_s,
        "export_bytes": hashed["bytes"],
        "copy_to_host_s": hashed["copy_to_host_s"],
        "checksum": hashed["checksum"],
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_rss_gib": peak_rss_bytes() / 2**30,
    }


def _layer_times(start: float, marks: list[tuple[int, float]]) -> list[float]:
    times, previous = [], start
    for _, mark in marks:
        times.append(mark - previous)
        previous = mark
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=("fp8-checkpoint", "deepseek"))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/qp-seq-model"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/qp-seq-out"))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--phase", choices=("write", "quantport", "modelopt"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.samples, args.seq = min(args.samples, 4), min(args.seq, 64)
    if args.case == "deepseek":
        result = deepseek(args, device)
    else:
        result = fp8_phase(args, device) if args.phase else fp8_checkpoint(args, device)
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

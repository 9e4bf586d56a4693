"""Weight quantization on the GPU: Triton kernels vs the pure-torch reference, against copy bandwidth.

The weights are every quantized matrix of a Qwen3-30B-A3B-shaped 4-layer stack (per layer: experts
gate_up [128, 1536, 2048] and down [128, 2048, 768] with one scale per expert, q/k/v/o projections),
random bf16 on the GPU. For each format the script checks that the Triton output equals the reference
byte for byte (both on the GPU), then times both (CUDA events, warm-up, median of repeats) and reports
GB/s = (bytes read + bytes written) / time next to a measured device-to-device copy.

    python bench/gpu_quantize_kernels.py [--json OUT.json] [--layers 4]

Formats: FP8 per-tensor (weight amax given), NVFP4 (global scale per expert given), MXFP4, INT4 group
128 with ModelOpt's output-dim packing, and the per-expert amax pass that FP8/NVFP4 need first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quantport.kernels import reference, triton_quant  # noqa: E402

HIDDEN, MOE_INTER, EXPERTS, HEADS, KV_HEADS, HEAD_DIM = 2048, 768, 128, 32, 4, 128


def stack(layers: int) -> list[torch.Tensor]:
    """Every quantized weight of the stack, [out, in] or [E, out, in], bf16 on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [
        (EXPERTS, 2 * MOE_INTER, HIDDEN),
        (EXPERTS, HIDDEN, MOE_INTER),
        (HEADS * HEAD_DIM, HIDDEN),
        (KV_HEADS * HEAD_DIM, HIDDEN),
        (KV_HEADS * HEAD_DIM, HIDDEN),
        (HIDDEN, HEADS * HEAD_DIM),
    ]
    out = []
    for _ in range(layers):
        for shape in shapes:
            w = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
            out.append(w.normal_(0, 0.02, generator=gen))
    return out


def timed(fn, warmup: int = 2, repeat: int = 7) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = timed(lambda s=src, d=dst: d.copy_(s), repeat=10)
    del src, dst
    return 2 * nbytes / ms / 1e6


def nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(nbytes(t) for t in tensors)


def per_matrix(w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return value if w.dim() == 3 else value.amax()


def formats(weights: list[torch.Tensor]) -> dict[str, tuple]:
    """name -> (triton fn, reference fn) of a weight, arguments precomputed outside the timing."""
    amax = [reference.matrix_amax(w) for w in weights]
    fp8_scale = [per_matrix(w, a) / 448 for w, a in zip(weights, amax, strict=True)]
    nv_scale = [per_matrix(w, a) / 2688 for w, a in zip(weights, amax, strict=True)]
    return {
        "amax (per expert)": (
            lambda: [triton_quant.matrix_amax_triton(w) for w in weights],
            lambda: [reference.matrix_amax(w) for w in weights],
        ),
        "fp8 per-tensor": (
            lambda: [triton_quant.fp8_per_tensor_triton(w, s) for w, s in zip(weights, fp8_scale, strict=True)],
            lambda: [reference.fp8_per_tensor(w, s) for w, s in zip(weights, fp8_scale, strict=True)],
        ),
        "nvfp4": (
            lambda: [triton_quant.nvfp4_triton(w, g) for w, g in zip(weights, nv_scale, strict=True)],
            lambda: [reference.nvfp4_quantize(w, g) for w, g in zip(weights, nv_scale, strict=True)],
        ),
        "mxfp4": (
            lambda: [triton_quant.mxfp4_triton(w) for w in weights],
            lambda: [reference.mxfp4(w) for w in weights],
        ),
        "int4 (modelopt packing)": (
            lambda: [triton_quant.int4_modelopt_triton(w) for w in weights],
            lambda: [reference.int4_modelopt(w) for w in weights],
        ),
    }


def same_bytes(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    return all(same_bytes(x, y) for x, y in zip(a, b, strict=True))


def device_invariance(weights: list[torch.Tensor]) -> dict[str, dict[str, bool]]:
    """On a slice (4 experts of layer 0's gate_up): Triton == reference on the CPU, and whether the
    pure-torch reference itself gives the same bytes on the GPU as on the CPU."""
    w = weights[0][:4].contiguous()
    cpu = w.cpu()
    s8 = reference.matrix_amax(w) / 448
    g = reference.matrix_amax(w) / 2688
    ops = {
        "fp8 per-tensor": (lambda x, s: triton_quant.fp8_per_tensor_triton(x, s), reference.fp8_per_tensor, s8),
        "nvfp4": (lambda x, s: triton_quant.nvfp4_triton(x, s), reference.nvfp4_quantize, g),
        "mxfp4": (lambda x, s: triton_quant.mxfp4_triton(x), lambda x, s: reference.mxfp4(x), None),
        "int4 (modelopt packing)": (
            lambda x, s: triton_quant.int4_modelopt_triton(x),
            lambda x, s: reference.int4_modelopt(x),
            None,
        ),
    }
    out = {}
    for name, (fast, ref, arg) in ops.items():
        on_cpu = ref(cpu, None if arg is None else arg.cpu())
        on_gpu = ref(w, arg)
        ours = fast(w, arg)
        to_cpu = (lambda t: t.cpu()) if isinstance(on_gpu, torch.Tensor) else (lambda t: tuple(x.cpu() for x in t))
        out[name] = {
            "triton_equals_cpu_reference": same_bytes(to_cpu(ours), on_cpu),
            "gpu_reference_equals_cpu_reference": same_bytes(to_cpu(on_gpu), on_cpu),
        }
    # Why the GPU reference can differ: locate the step (division, clamp, or the cast to fp8 on CUDA).
    q_gpu = torch.stack([w[e] / s8[e].reshape(()) for e in range(w.shape[0])])
    q_cpu = torch.stack([cpu[e] / s8[e].cpu().reshape(()) for e in range(w.shape[0])])
    out["fp8 per-tensor"]["bf16_quotient_gpu_equals_cpu"] = torch.equal(q_gpu.cpu(), q_cpu)
    same_q = q_cpu.clamp(-448, 448)
    cast_gpu = same_q.cuda().to(torch.float8_e4m3fn).cpu().view(torch.uint8)
    cast_cpu = same_q.to(torch.float8_e4m3fn).view(torch.uint8)
    out["fp8 per-tensor"]["bf16_to_fp8_cast_gpu_equals_cpu"] = torch.equal(cast_gpu, cast_cpu)
    out["fp8 per-tensor"]["bf16_to_fp8_cast_codes_differing"] = int((cast_gpu != cast_cpu).sum())
    via_f32 = same_q.float().cuda().to(torch.float8_e4m3fn).cpu().view(torch.uint8)
    out["fp8 per-tensor"]["fp32_to_fp8_cast_gpu_equals_cpu"] = torch.equal(via_f32, cast_cpu)
    amax = w.unflatten(-1, (-1, 128)).abs().amax(dim=-1).float()
    out["int4 (modelopt packing)"]["gpu_amax_div_7_equals_cpu"] = torch.equal((amax / 7).cpu(), amax.cpu() / 7)
    out["int4 (modelopt packing)"]["gpu_amax_div_7_equals_amax_times_rcp7"] = torch.equal(
        amax / 7, amax * torch.tensor(1 / 7, dtype=torch.float32)
    )
    return out


def tile_sweep(weights: list[torch.Tensor], read: int) -> dict[str, float]:
    """GB/s of the NVFP4, MXFP4 and INT4 kernels for a few tile sizes and warps (defaults: 128/2, 128/4, 32/4)."""
    g = [per_matrix(w, reference.matrix_amax(w)) / 2688 for w in weights]
    pairs = list(zip(weights, g, strict=True))
    nv = triton_quant.nvfp4_triton
    mx = triton_quant.mxfp4_triton
    i4 = triton_quant.int4_modelopt_triton
    variants = {
        **{f"nvfp4 {b} blocks, {n} warps, g per {'tile' if t else 'block'}":
           lambda b=b, n=n, t=t: [nv(w, s, b, n, t) for w, s in pairs]
           for b, n, t in ((128, 2, False), (128, 2, True), (64, 2, False), (256, 4, False), (128, 4, False),
                           (256, 8, False), (64, 1, False))},
        **{f"mxfp4 {b} blocks, {n} warps": lambda b=b, n=n: [mx(w, b, n) for w in weights]
           for b, n in ((32, 1), (64, 2), (128, 4), (256, 8), (64, 1))},
        **{f"int4 {b} rows, {n} warps": lambda b=b, n=n: [i4(w, 128, b, n) for w in weights]
           for b, n in ((8, 1), (16, 2), (32, 4), (64, 8), (16, 1))},
    }  # fmt: skip
    out = {}
    for name, fn in variants.items():
        written = nbytes(fn())
        out[name] = (read + written) / timed(fn) / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    weights = stack(args.layers)
    params = sum(w.numel() for w in weights)
    read = nbytes(weights)
    copy = copy_bandwidth()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "parameters": params,
        "weight_bytes": read,
        "copy_GBps": copy,
        "formats": {},
    }
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s (read+write); {params / 1e9:.3f} B parameters")
    ops = formats(weights)
    for name, (fast, slow) in ops.items():  # correctness, bytes, and the pure-torch timing
        ours, expected = fast(), slow()
        written = 0 if name.startswith("amax") else nbytes(ours)
        results["formats"][name] = {"exact": same_bytes(ours, expected), "bytes": read + written}
        del ours, expected
        torch.cuda.empty_cache()
        results["formats"][name]["reference_ms"] = timed(slow, warmup=1, repeat=3)
    rounds: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(3):  # Triton timings apart from the heavy reference runs, three rounds, median
        for name, (fast, _slow) in ops.items():
            rounds[name].append(timed(fast))
    for name, row in results["formats"].items():
        ms_fast = statistics.median(rounds[name])
        row.update(triton_ms=ms_fast, triton_ms_rounds=rounds[name])
        row["triton_GBps"] = row["bytes"] / ms_fast / 1e6
        row["reference_GBps"] = row["bytes"] / row["reference_ms"] / 1e6
        row["fraction_of_copy"] = row["triton_GBps"] / copy
        row["speedup"] = row["reference_ms"] / ms_fast
        print(
            f"{name:24s} exact={row['exact']} triton {ms_fast:8.2f} ms {row['triton_GBps']:7.0f} GB/s "
            f"({100 * row['fraction_of_copy']:.0f}% of copy)  torch {row['reference_ms']:8.2f} ms  "
            f"x{row['speedup']:.1f}  rounds {[round(t, 2) for t in rounds[name]]}",
            flush=True,
        )
    nv = results["formats"]["nvfp4"]
    amax_row = results["formats"]["amax (per expert)"]
    both_ms = nv["triton_ms"] + amax_row["triton_ms"]
    results["nvfp4_with_amax"] = {"ms": both_ms, "GBps_counting_both_reads": (nv["bytes"] + read) / both_ms / 1e6}
    results["device_invariance"] = device_invariance(weights)
    for name, row in results["device_invariance"].items():
        print(f"  {name:24s} {row}")
    results["tiles"] = tile_sweep(weights, read)
    for name, gbps in results["tiles"].items():
        print(f"  tile {name:16s} {gbps:7.0f} GB/s ({100 * gbps / copy:.0f}% of copy)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

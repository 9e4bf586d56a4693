"""MoE calibration on one GPU, side by side: plain bf16 forward, quantport, nvidia-modelopt (issue 6).

Builds Qwen3-30B-A3B-shaped and GPT-OSS-20B-shaped 4-layer stacks, and a dense Qwen3-8B-shaped one
(the cost of dense-layer statistics alone), from configs with random bf16 weights directly on the GPU
(nothing is downloaded) and measures, in one process:

* plain: the unquantized model's forward (transformers' default ``grouped_mm`` experts), batch 4 x 512,
  and at the batch size quantport picks from free GPU memory (``auto_batch_size``);
* quantport: ``quantport.quantize`` (FP8 and NVFP4) on 8 batches; then the calibration forward alone
  (``QuantMode.CALIBRATE``) over 32 batches of 4 x 512 and at the automatic batch size;
* reference: ``mtq.quantize(model, mtq.{FP8,NVFP4}_DEFAULT_CFG, loop)`` on the same 8 batches, each
  batch timed on its own (synchronised), so its throughput excludes its set-up;
* end to end (Qwen3 shape): quantize + export, quantport (``quantport.export``) vs reference
  (``export_hf_checkpoint``), same 8 calibration batches, wall time.

Timing: ``torch.cuda.synchronize`` around every timed region, warm-up batches before the plain and
calibration-forward loops. Tokens/s = calibration tokens / seconds of forward.

    python bench/gpu_moe_calibration.py --json OUT.json         # on the GPU machine
    python bench/gpu_moe_calibration.py --only qwen3 dense --json OUT.json
    python bench/gpu_moe_calibration.py --smoke                 # tiny shapes on the CPU (checks the script)
    python bench/gpu_moe_calibration.py --render KERNELS.json CALIB.json > section.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # large auto batches, no fragmentation

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import quantport  # noqa: E402
import quantport.pipeline as pipeline  # noqa: E402
from quantport.calibrate.loop import auto_batch_size  # noqa: E402
from quantport.modules.quant_linear import QuantMode  # noqa: E402
from quantport.state import set_mode  # noqa: E402

SEQ, BATCH = 512, 4
STEADY_BATCHES, CALIB_BATCHES = 32, 8

SHAPES = {
    "Qwen3-30B-A3B shape": (
        "qwen3_moe",
        dict(
            hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
            num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
            num_hidden_layers=4, vocab_size=151936, norm_topk_prob=True, max_position_embeddings=4096,
        ),
        True,  # end-to-end export
    ),
    "GPT-OSS-20B shape": (
        "gpt_oss",
        dict(
            hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
            num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_hidden_layers=4,
            vocab_size=201088, sliding_window=128, max_position_embeddings=4096,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
        False,
    ),
    "Qwen3-8B shape (dense)": (
        "qwen3",
        dict(
            hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
            num_hidden_layers=4, vocab_size=151936, max_position_embeddings=4096,
        ),
        False,
    ),
}  # fmt: skip
ONLY = {"qwen3": "Qwen3-30B-A3B shape", "gpt-oss": "GPT-OSS-20B shape", "dense": "Qwen3-8B shape (dense)"}

SMOKE = {
    "qwen3 tiny": ("qwen3_moe", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                                     num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     num_hidden_layers=2, vocab_size=256), True),
    "gpt-oss tiny": ("gpt_oss", dict(hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                                     vocab_size=256, layer_types=["sliding_attention", "full_attention"]), False),
}  # fmt: skip

MODELOPT_CFG = {"fp8": "FP8_DEFAULT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model_type: str, config: dict, device: torch.device) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    model.config.architectures = [type(model).__name__]
    return model


def batches(vocab: int, n: int, batch: int, seq: int, device: torch.device, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(n)]


def tokens(data: list[torch.Tensor]) -> int:
    return sum(b.numel() for b in data)


@torch.inference_mode()
def forward_throughput(model, data, device, warmup: int = 2) -> dict:
    for b in data[:warmup]:
        model(input_ids=b, use_cache=False)
    sync(device)
    start = time.perf_counter()
    for b in data:
        model(input_ids=b, use_cache=False)
    sync(device)
    seconds = time.perf_counter() - start
    return {"tokens": tokens(data), "seconds": seconds, "tokens_per_s": tokens(data) / seconds}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def paired(model, data, device, reps: int, warmup: int) -> dict:
    """Alternate the plain forward (``QuantMode.OFF``: the model's own modules) and the calibration forward
    on the same model and batches, ``reps`` times each; medians of tokens/s."""
    runs: dict[str, list[dict]] = {"plain": [], "calibrate": []}
    try:
        for _ in range(reps):
            for mode, key in ((QuantMode.OFF, "plain"), (QuantMode.CALIBRATE, "calibrate")):
                set_mode(model, mode)
                runs[key].append(forward_throughput(model, data, device, warmup))
    finally:
        set_mode(model, QuantMode.OFF)
    out = {}
    for key, values in runs.items():
        rates = [v["tokens_per_s"] for v in values]
        out[key] = {"tokens": values[0]["tokens"], "tokens_per_s": statistics.median(rates), "all_tokens_per_s": rates}
    out["ratio"] = out["calibrate"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    return out


def run_quantport(model, recipe, calib, steady, auto, device, export_dir: Path | None) -> dict:
    loop_seconds = []
    original = pipeline.run_calibration

    def timed_calibration(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        result = original(*args, **kwargs)
        sync(device)
        loop_seconds.append(time.perf_counter() - start)
        return result

    pipeline.run_calibration = timed_calibration
    try:
        sync(device)
        start = time.perf_counter()
        quantport.quantize(model, recipe, calib, progress=False, release_weights=False)
        sync(device)
        quantize_s = time.perf_counter() - start
    finally:
        pipeline.run_calibration = original
    out = {
        "quantize_s": quantize_s,
        "calibration_loop_s": loop_seconds[0],
        "calibration_tokens": tokens(calib),
        "quantize_tokens_per_s": tokens(calib) / loop_seconds[0],
    }
    if export_dir is not None:
        sync(device)
        start = time.perf_counter()
        quantport.export(model, export_dir, progress=False, overwrite=True)
        out["export_s"] = time.perf_counter() - start
        out["total_s"] = quantize_s + out["export_s"]
        out["checkpoint_bytes"] = sum(f.stat().st_size for f in export_dir.rglob("*") if f.is_file())
    # after the export: these forwards add to the statistics
    out["paired"] = paired(model, steady, device, reps=3, warmup=2)
    out["steady"] = out["paired"]["calibrate"]
    if auto:
        out["paired_auto"] = paired(model, auto, device, reps=2, warmup=1)
        out["auto"] = out["paired_auto"]["calibrate"]
    return out


def run_modelopt(model, recipe, calib, device, export_dir: Path | None) -> dict:
    import modelopt.torch.quantization as mtq

    batch_s: list[float] = []

    def loop(m):
        for b in calib:
            sync(device)
            start = time.perf_counter()
            m(input_ids=b, use_cache=False)
            sync(device)
            batch_s.append(time.perf_counter() - start)

    log = io.StringIO()
    sync(device)
    start = time.perf_counter()
    with torch.no_grad(), contextlib.redirect_stdout(log):
        mtq.quantize(model, getattr(mtq, MODELOPT_CFG[recipe]), loop)
    sync(device)
    quantize_s = time.perf_counter() - start
    per_batch = tokens(calib) / len(calib)
    later = batch_s[1:] or batch_s
    out = {
        "quantize_s": quantize_s,
        "calibration_loop_s": sum(batch_s),
        "calibration_tokens": tokens(calib),
        "batch_s": batch_s,
        "tokens_per_s": tokens(calib) / sum(batch_s),
        "tokens_per_s_after_first_batch": per_batch * len(later) / sum(later),
    }
    if export_dir is not None:
        from modelopt.torch.export import export_hf_checkpoint

        sync(device)
        start = time.perf_counter()
        with torch.no_grad(), contextlib.redirect_stdout(log):
            export_hf_checkpoint(model, export_dir=export_dir)
        out["export_s"] = time.perf_counter() - start
        out["total_s"] = quantize_s + out["export_s"]
        out["checkpoint_bytes"] = sum(f.stat().st_size for f in export_dir.rglob("*") if f.is_file())
    return out


def guarded(results: dict, key: str, fn) -> None:
    """Run one measurement; a failure is recorded and the benchmark goes on."""
    try:
        results[key] = fn()
    except Exception as exc:  # noqa: BLE001
        results[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        print(f"  {key}: FAILED {type(exc).__name__}: {exc}", flush=True)
    free_memory()


def bench_shape(name, model_type, config, export, device, scale) -> dict:
    steady_n, calib_n, seq, batch = scale
    res: dict = {"model_type": model_type, "config": config}
    model = build(model_type, config, device)
    res["parameters"] = sum(p.numel() for p in model.parameters())
    vocab = config["vocab_size"]
    steady = batches(vocab, steady_n, batch, seq, device)
    calib = steady[:calib_n]
    res["plain"] = forward_throughput(model, steady, device)
    print(f"{name}: plain {res['plain']['tokens_per_s']:.0f} tok/s", flush=True)
    auto = None
    if device.type == "cuda":
        auto_b = auto_batch_size(model, seq)
        n = max(3, math.ceil(tokens(steady) * 2 / (auto_b * seq)))
        auto = batches(vocab, n, auto_b, seq, device, seed=2)
        res["auto_batch"] = auto_b
        res["plain_auto"] = forward_throughput(model, auto, device, warmup=1)
        print(f"  auto batch {auto_b} x {seq}: plain {res['plain_auto']['tokens_per_s']:.0f} tok/s", flush=True)
    for i, recipe in enumerate(("fp8", "nvfp4")):
        if i:
            model = build(model_type, config, device)
        out = Path(tempfile.mkdtemp(prefix="qp_")) if export else None
        guarded(
            res,
            f"quantport_{recipe}",
            lambda m=model, r=recipe, o=out: run_quantport(m, r, calib, steady, auto, device, o),
        )
        del model
        free_memory()
        r = res[f"quantport_{recipe}"]
        if "error" not in r:
            print(
                f"  quantport {recipe}: quantize() {r['quantize_s']:.2f} s, "
                f"loop {r['quantize_tokens_per_s']:.0f} tok/s, "
                f"calibrate {r['steady']['tokens_per_s']:.0f} tok/s vs plain(OFF) "
                f"{r['paired']['plain']['tokens_per_s']:.0f} ({r['paired']['ratio']:.0%})"
                + (
                    f", auto batch: {r['auto']['tokens_per_s']:.0f} vs {r['paired_auto']['plain']['tokens_per_s']:.0f}"
                    if "auto" in r
                    else ""
                )
                + (f", export {r['export_s']:.1f} s" if "export_s" in r else ""),
                flush=True,
            )
        ours_dir = out
        reference = build(model_type, config, device)
        out = Path(tempfile.mkdtemp(prefix="mo_")) if export else None
        guarded(res, f"modelopt_{recipe}", lambda m=reference, r=recipe, o=out: run_modelopt(m, r, calib, device, o))
        del reference
        free_memory()
        r = res[f"modelopt_{recipe}"]
        if "error" not in r:
            print(
                f"  modelopt {recipe}: quantize {r['quantize_s']:.2f} s, {r['tokens_per_s']:.0f} tok/s "
                f"({r['tokens_per_s_after_first_batch']:.0f} after batch 1)"
                + (f", export {r['export_s']:.1f} s" if "export_s" in r else ""),
                flush=True,
            )
        if out is not None:
            guarded(res, f"same_tensors_{recipe}", lambda a=ours_dir, b=out: compare_checkpoints(a, b))
            print(f"  checkpoints {recipe}: {res[f'same_tensors_{recipe}']}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(ours_dir, ignore_errors=True)
    return res


def compare_checkpoints(ours: Path, reference: Path) -> dict:
    """Tensor-for-tensor comparison of the two exported checkpoints (both written from the GPU)."""
    from safetensors.torch import load_file

    def load(d: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = load(ours), load(reference)
    common = sorted(set(a) & set(b))
    differ = [n for n in common if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or not torch.equal(a[n], b[n])]
    kinds: dict[str, int] = {}
    worst = 0.0
    for n in differ:
        kinds[n.rsplit(".", 1)[-1]] = kinds.get(n.rsplit(".", 1)[-1], 0) + 1
        if a[n].is_floating_point() and a[n].dtype == torch.float32 and a[n].shape == b[n].shape:
            worst = max(worst, ((a[n] - b[n]).abs() / b[n].abs().clamp_min(1e-30)).max().item())
    return {
        "tensors_ours": len(a),
        "tensors_reference": len(b),
        "common": len(common),
        "equal": len(common) - len(differ),
        "differ_by_suffix": kinds,
        "max_relative_difference_fp32": worst,
        "first_differ": differ[:3],
    }


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "nvidia-modelopt", "triton"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    return out


# --- report ------------------------------------------------------------------------------------------------


def _f(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _calibration_table(calib: dict) -> list[str]:
    lines = [
        "| model shape | recipe | plain forward, fresh model (tok/s) | plain forward, paired (tok/s) "
        "| quantport calibration (tok/s) | quantport / plain | reference calibration (tok/s) "
        "| quantport / reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in calib["shapes"].items():
        for recipe in ("fp8", "nvfp4"):
            qp, mo = res.get(f"quantport_{recipe}", {}), res.get(f"modelopt_{recipe}", {})
            fresh = res["plain"]["tokens_per_s"]
            pair = qp.get("paired")
            m = mo.get("tokens_per_s_after_first_batch")
            if pair is None:
                lines.append(f"| {name} | {recipe} | {_f(fresh)} | | {qp.get('error', 'n/a')[:80]} | | | |")
                continue
            p, q = pair["plain"]["tokens_per_s"], pair["calibrate"]["tokens_per_s"]
            ref = _f(m) if m else mo.get("error", "n/a")[:80]
            lines.append(
                f"| {name} | {recipe} | {_f(fresh)} | {_f(p)} | {_f(q)} | {q / p:.0%} | {ref} | "
                f"{f'{q / m:.1f}x' if m else ''} |"
            )
    return lines


def _auto_table(calib: dict) -> list[str]:
    lines = [
        "| model shape | recipe | auto batch | plain forward, paired (tok/s) | quantport calibration (tok/s) "
        "| quantport / plain |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, res in calib["shapes"].items():
        for recipe in ("fp8", "nvfp4"):
            pair = res.get(f"quantport_{recipe}", {}).get("paired_auto")
            if pair is None:
                continue
            p, q = pair["plain"]["tokens_per_s"], pair["calibrate"]["tokens_per_s"]
            lines.append(f"| {name} | {recipe} | {res['auto_batch']} x {SEQ} | {_f(p)} | {_f(q)} | {q / p:.0%} |")
    return lines


def _e2e_table(calib: dict) -> list[str]:
    lines = [
        "| model shape | recipe | quantport quantize / export / total (s) | reference quantize / export / total (s) "
        "| total ratio quantport / reference | tensors equal (both exported on the GPU) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, res in calib["shapes"].items():
        for recipe in ("fp8", "nvfp4"):
            qp, mo = res.get(f"quantport_{recipe}", {}), res.get(f"modelopt_{recipe}", {})
            if "total_s" not in qp:
                continue
            ours = f"{qp['quantize_s']:.2f} / {qp['export_s']:.2f} / {qp['total_s']:.2f}"
            ref = f"{mo['quantize_s']:.2f} / {mo['export_s']:.2f} / {mo['total_s']:.2f}" if "total_s" in mo else "n/a"
            ratio = f"{qp['total_s'] / mo['total_s']:.3f}x" if "total_s" in mo else ""
            same = res.get(f"same_tensors_{recipe}", {})
            equal = (
                f"{same['equal']} / {same['common']} (others: {same['differ_by_suffix']}, max rel. diff "
                f"{same['max_relative_difference_fp32']:.1e})"
                if "common" in same
                else "n/a"
            )
            lines.append(f"| {name} | {recipe} | {ours} | {ref} | {ratio} | {equal} |")
    return lines


def _kernel_table(kern: dict) -> list[str]:
    copy = kern["copy_GBps"]
    lines = [
        "| format | bytes moved (GB) | Triton (ms) | Triton (GB/s) | % of copy | pure torch on GPU (ms) | speed-up "
        "| same bytes as pure torch on GPU |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in kern["formats"].items():
        lines.append(
            f"| {name} | {row['bytes'] / 1e9:.2f} | {row['triton_ms']:.2f} | {_f(row['triton_GBps'])} | "
            f"{row['triton_GBps'] / copy:.0%} | {row['reference_ms']:.1f} | {row['speedup']:.0f}x | "
            f"{'yes' if row['exact'] else '**NO**'} |"
        )
    return lines


def render(kern: dict | None, calib: dict | None) -> str:
    out = ["", "---", "", "# GPU (issue 6): MoE calibration and weight quantization on one H100", ""]
    out.append(
        "Generated by `bench/gpu_moe_calibration.py --render` from the JSON of `bench/gpu_moe_calibration.py` "
        "and `bench/gpu_quantize_kernels.py`, run through the device tool. Do not edit by hand."
    )
    out.append("")
    if calib:
        v = calib["versions"]
        out.append(
            f"- Device: {v.get('device')} ({v.get('sm_count')} SMs); Python {v['python']}, torch {v['torch']} "
            f"(CUDA {v['cuda']}), transformers {v['transformers']}, nvidia-modelopt {v['nvidia-modelopt']}, "
            f"triton {v['triton']}"
        )
        sizes = ", ".join(f"{n} {r['parameters'] / 1e9:.2f} B" for n, r in calib["shapes"].items())
        out.append(
            f"- Models: random bf16 weights built from configs on the GPU, 4 layers, real layer shapes "
            f"(parameters: {sizes}); transformers' default experts implementation (`grouped_mm`) for the "
            "plain forward."
        )
        out.append(
            f"- Throughput batches: {STEADY_BATCHES} x ({BATCH} x {SEQ}) random tokens "
            f"({STEADY_BATCHES * BATCH * SEQ} tokens) for plain and quantport (after 2 warm-up batches); the "
            f"reference calibrates on {CALIB_BATCHES} x ({BATCH} x {SEQ}) ({CALIB_BATCHES * BATCH * SEQ} tokens), "
            "each batch timed on its own, first batch (set-up) left out. quantport's number is its calibration "
            "forward (`QuantMode.CALIBRATE`: grouped experts, per-expert counts and input amax, dense-layer amax)."
        )
        out += ["", "## Calibration throughput (batch 4 x 512)", ""] + _calibration_table(calib)
        out += ["", '## Calibration at the automatic batch size (`batch_size="auto"`)', ""] + _auto_table(calib)
        out += [
            "",
            "## End to end: quantize + export (Qwen3-30B-A3B shape, 16,384 calibration tokens)",
            "",
        ] + _e2e_table(calib)
        out.append("")
        out.append(
            'Notes. "Paired" plain forward: the same model with quantport\'s modules switched off '
            "(`QuantMode.OFF`: transformers' own experts forward and plain `F.linear`), alternated with the "
            "calibration forward 3 times on the same batches, medians. At 4 x 512 tokens per forward the Qwen3 "
            "shape is launch-bound (about 10 ms a forward), so the ratio moves between runs; the automatic batch "
            "size takes that away. The reference's throughput leaves out its first batch and its one-time CUDA "
            "extension build (built before any timing). Why the checkpoints differ: quantport exported on the "
            "GPU writes the bytes it writes on the CPU (Triton kernels, scale divisions correctly rounded; "
            "`tests/export/test_gpu_export.py`), which are the reference's CPU bytes (golden tests). The reference "
            "exported on the GPU follows CUDA's arithmetic instead: its FP8 quotients `w / scale` round "
            "differently and PyTorch divides by a Python number as a multiplication by its reciprocal, so "
            "`weight_scale` / `weight_scale_2` differ in the last bit and some codes by one step. Input scales: "
            "quantport's grouped GEMM and the reference's per-expert GEMM round the bf16 expert inputs "
            "differently on the GPU (on the CPU the statistics are equal bit for bit, "
            "`tests/modules/test_quant_experts_stats.py`)."
        )
        notes = [f"{name}: {res['note']}." for name, res in calib["shapes"].items() if res.get("note")]
        if notes:
            out += ["", "Rows measured apart: " + " ".join(notes)]
        out.append("")
        out.append(
            "quantport: `quantport.quantize` (wrap, per-expert weight amax, calibration, policies) then "
            "`quantport.export` (one expert at a time on the GPU, weights through the Triton kernels). Reference: "
            "`mtq.quantize` then `export_hf_checkpoint`, both under `torch.no_grad()`. Wall time, synchronised."
        )
    if kern:
        out += [
            "",
            "## Weight quantization kernels (Triton) vs copy bandwidth",
            "",
            f"Every quantized weight of the Qwen3-30B-A3B-shaped 4-layer stack ({kern['parameters'] / 1e9:.3f} B "
            f"parameters, {kern['weight_bytes'] / 1e9:.2f} GB bf16), per-expert scales; device-to-device copy "
            f"{_f(kern['copy_GBps'])} GB/s (bytes read + written). GB/s = (weight bytes read + codes and scales "
            "written) / time of the whole stack (one launch per weight tensor; median of three rounds of 7 timed "
            "runs, after 2 warm-ups, the rounds apart from the pure-torch timings). The kernels are defined to "
            "equal the pure-torch reference computed on the CPU (`tests/kernels`, every byte); the last column "
            "compares with the same reference run on the GPU, which is not always the same (next table).",
            "",
        ] + _kernel_table(kern)
        inv = kern.get("device_invariance")
        if inv:
            out += [
                "",
                "Device check on a slice (4 experts of layer 0's gate_up): does the Triton output equal the "
                "pure-torch reference computed on the CPU, and does the pure-torch reference give the same bytes "
                "on the GPU as on the CPU?",
                "",
                "| format | Triton == reference on CPU | reference on GPU == reference on CPU |",
                "|---|---|---|",
            ] + [
                f"| {name} | {'yes' if r['triton_equals_cpu_reference'] else '**NO**'} | "
                f"{'yes' if r['gpu_reference_equals_cpu_reference'] else '**NO**'} |"
                for name, r in inv.items()
            ]
            extra = [
                f"{name}: `{k}` = {v}"
                for name, r in inv.items()
                for k, v in r.items()
                if k not in ("triton_equals_cpu_reference", "gpu_reference_equals_cpu_reference")
            ]
            if extra:
                out += ["", "Diagnostics: " + "; ".join(extra) + "."]
            out += [
                "",
                "So on CUDA the pure-torch FP8 per-tensor function differs from the CPU in its bf16 quotient "
                "`w / scale` (not in the cast). PyTorch's CUDA kernels also divide by a Python number as a "
                "multiplication by its reciprocal (`amax / 7` is `amax * fp32(1/7)`, last diagnostic); "
                "quantport's scale functions divide by a tensor instead (`quantport.formats.division`), so its "
                "INT4, FP8 and NVFP4 scales are the CPU's on every device. The Triton kernels return the CPU "
                "bytes, and the export uses them on CUDA.",
            ]
        both = kern.get("nvfp4_with_amax")
        if both:
            out.append("")
            out.append(
                f"NVFP4 including the per-expert amax pass it needs first (two reads of the weights): "
                f"{both['ms']:.2f} ms, {_f(both['GBps_counting_both_reads'])} GB/s counting both reads. "
                "Tile sweep (GB/s, one median of 7 each; defaults: NVFP4 128 blocks / 2 warps / g per block, "
                "MXFP4 128 blocks / 4 warps, INT4 32 rows / 4 warps): "
                + ", ".join(f"{k} {_f(v)}" for k, v in kern.get("tiles", {}).items())
                + "."
            )
    out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--only", nargs="+", choices=sorted(ONLY), help="these shapes only")
    parser.add_argument("--render", nargs=2, type=Path, metavar=("KERNELS_JSON", "CALIB_JSON"))
    args = parser.parse_args()
    if args.render:
        kern, calib = (json.loads(p.read_text()) if p.exists() else None for p in args.render)
        sys.stdout.write(render(kern, calib))
        return
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    shapes = SMOKE if args.smoke else SHAPES
    scale = (4, 2, 32, 2) if args.smoke else (STEADY_BATCHES, CALIB_BATCHES, SEQ, BATCH)
    results = {"versions": versions(), "shapes": {}}
    if device.type == "cuda":  # the reference JIT-builds CUDA extensions once; keep that out of its timings
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            from modelopt.torch.quantization import extensions

            extensions.precompile()
        results["versions"]["modelopt_extensions_load_s"] = time.perf_counter() - start
    print(json.dumps(results["versions"]), flush=True)
    for name, (model_type, config, export) in shapes.items():
        if args.only and not args.smoke and name not in {ONLY[key] for key in args.only}:
            continue
        results["shapes"][name] = bench_shape(name, model_type, config, export, device, scale)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        free_memory()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Full-size export on one GPU, side by side with the disk floor and nvidia-modelopt (issue 17).

Builds a Qwen3-30B-A3B-shaped model (48 layers, 128 experts, 30.5B parameters) with random bf16
weights directly on the GPU (nothing is downloaded), calibrates it with quantport (NVFP4 or FP8, 32 x 512
tokens), exports it to a local directory and measures, in one process per tool:

* quantport: calibration, export wall time, GB/s, peak GPU memory, peak host RSS;
* the disk floor for the same number of bytes, measured after the export's files are removed: one thread
  writing 8 MB chunks with ``O_DIRECT`` and through the page cache (then ``fdatasync``), as ``dd`` would, and
  the export's ratio to each (``export_over_o_direct``, ``export_over_page_cache``; ``export_over_floor``: to
  the faster);
* the export's stages: writing the shards, the self-check, the commit (fsync and rename), and the end-to-end
  calibration + export time;
* ``--direct``: how the shards are written (``auto``: quantport's default, ``O_DIRECT`` for shards from 32 MB;
  ``always``, ``adaptive`` (probe, then the page cache while it is as fast: the writer before issue 17's
  second round), ``never``);
* ``--profile``: where the export's time goes (cProfile of the calling thread, busy time of the writer
  and I/O threads);
* ``--reference``: nvidia-modelopt's ``mtq.quantize`` + ``export_hf_checkpoint`` on the same model and
  calibration batches (run it as a separate process: the model is built again); ``export_s`` is its export as
  it is (no fsync: ``save_pretrained`` leaves the files in the page cache), ``durable_export_s`` adds an fsync
  of every file it wrote, which quantport's export includes.

    python bench/gpu_full_export.py --recipe nvfp4 --out /tmp/qp-export --json r.json [--profile] [--layers 48]
    python bench/gpu_full_export.py --recipe nvfp4 --out /tmp/mo-export --reference --json ref.json
    python bench/gpu_full_export.py --smoke [--reference]   # 2 tiny layers on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import mmap
import os
import pstats
import shutil
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

QWEN3_30B = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_hidden_layers=48, vocab_size=151936,
    norm_topk_prob=True, max_position_embeddings=4096,
)  # fmt: skip
SMOKE = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=256,
)  # fmt: skip
CHUNK = 8 << 20


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def build(config: dict, device: torch.device) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", **config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    model.config.architectures = [type(model).__name__]
    return model


def calibration(vocab: int, n: int, seq: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (4, seq), generator=gen).to(device) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def disk_floor(directory: Path, nbytes: int, modes: tuple[str, ...] = ("o_direct", "page_cache")) -> dict:
    """Seconds to write ``nbytes`` in 8 MB chunks from one thread: O_DIRECT, and page cache + fdatasync."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = mmap.mmap(-1, CHUNK)
    buffer.write(os.urandom(1 << 20) * (CHUNK >> 20))
    out = {}
    for mode, flags in (("o_direct", os.O_DIRECT), ("page_cache", 0)):
        if mode not in modes:
            continue
        path = directory / f"floor-{mode}.bin"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        except OSError as error:
            out[mode] = {"error": str(error)}
            continue
        start = time.perf_counter()
        try:
            written = 0
            while written < nbytes:
                written += os.write(fd, buffer)
            os.fdatasync(fd)
            seconds = time.perf_counter() - start
            out[mode] = {"s": seconds, "gb_per_s": written / seconds / 1e9, "bytes": written}
        except OSError as error:
            out[mode] = {"error": str(error)}
        finally:
            os.close(fd)
            path.unlink()
    return out


class Timed:
    """Sums the wall time spent in attributes ``names`` of ``owner`` (functions of a module, or methods of a
    class, called from any thread) while the context is open: ``seconds[label]``, label = prefix + name."""

    def __init__(self, owner: object, names: tuple[str, ...], prefix: str = "") -> None:
        self.owner, self.names, self.prefix = owner, names, prefix
        self.seconds: dict[str, float] = {}
        self.lock = threading.Lock()
        self.originals: dict[str, object] = {}

    def __enter__(self) -> Timed:
        for name in self.names:
            original = getattr(self.owner, name, None)
            if original is None:  # a stage this version of quantport does not have
                continue
            self.originals[name] = original

            def timed(*args, _original=original, _label=self.prefix + name, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    with self.lock:
                        self.seconds[_label] = self.seconds.get(_label, 0.0) + time.perf_counter() - start

            setattr(self.owner, name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.originals.items():
            setattr(self.owner, name, original)


def fsync_files(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_quantport(model, recipe: str, calib, out: Path, device, profile: bool, direct: str, sample: bool) -> dict:
    import quantport
    from quantport.export import shards
    from quantport.export.checkpoint_file import DirectPolicy

    shards.DIRECT_WRITES = None if direct == "auto" else DirectPolicy(direct)

    sync(device)
    start = time.perf_counter()
    quantport.quantize(model, recipe, calib, progress=False, release_weights=False)
    sync(device)
    result = {"calibrate_s": time.perf_counter() - start}
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    profiler = cProfile.Profile() if profile else None
    import importlib

    from quantport.export import value_witness
    from quantport.export.checkpoint_file import CheckpointFile
    from quantport.export.output_dir import OutputTarget

    export_module = importlib.import_module("quantport.export")  # the module (quantport.export is also a function)
    stages = Timed(export_module, ("write_sharded_safetensors", "check_written"))
    commit = Timed(OutputTarget, ("commit",))  # fsync of the staging directory and the rename
    # busy time of the writer threads (CheckpointFile.write), of the I/O threads (_write_at), and of the value
    # tests the writer threads run for the self-check (ShardWitness.write includes the file write it makes)
    busy = Timed(CheckpointFile, ("write", "_write_at"), prefix="CheckpointFile.")
    witness = Timed(value_witness.ShardWitness, ("write", "close", "_test", "_write_large"), prefix="ShardWitness.")
    from stack_sampler import StackSampler

    sampler = StackSampler() if sample else contextlib.nullcontext()
    with busy, stages, commit, witness, sampler:
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        quantport.export(model, out, progress=False, overwrite=True)
        if profiler:
            profiler.disable()
        result["export_s"] = time.perf_counter() - start
    result["thread_busy_s"] = dict(busy.seconds) | dict(witness.seconds)
    result["stage_s"] = dict(stages.seconds) | dict(commit.seconds)
    result["direct_writes"] = direct
    result["calibrate_plus_export_s"] = result["calibrate_s"] + result["export_s"]
    result["checkpoint_bytes"] = directory_bytes(out)
    result["export_gb_per_s"] = result["checkpoint_bytes"] / result["export_s"] / 1e9
    if device.type == "cuda":
        result["export_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profiler:
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        result["profile"] = text.getvalue()
    if sample:
        result["profile"] = result.get("profile", "") + "\n" + sampler.report(top=45)
    return result


def run_reference(model, recipe: str, calib, out: Path, device) -> dict:
    import contextlib

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    config = {"fp8": mtq.FP8_DEFAULT_CFG, "nvfp4": mtq.NVFP4_DEFAULT_CFG}[recipe]
    log = io.StringIO()

    def loop(m):
        for batch in calib:
            m(input_ids=batch, use_cache=False)

    sync(device)
    start = time.perf_counter()
    with torch.no_grad(), contextlib.redirect_stdout(log):
        mtq.quantize(model, config, loop)
    sync(device)
    result = {"calibrate_s": time.perf_counter() - start}
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    start = time.perf_counter()
    with torch.no_grad(), contextlib.redirect_stdout(log):
        export_hf_checkpoint(model, export_dir=out)
    result["export_s"] = time.perf_counter() - start
    fsync_files(out)
    result["durable_export_s"] = time.perf_counter() - start
    result["calibrate_plus_export_s"] = result["calibrate_s"] + result["export_s"]
    result["checkpoint_bytes"] = directory_bytes(out)
    result["export_gb_per_s"] = result["checkpoint_bytes"] / result["export_s"] / 1e9
    if device.type == "cuda":
        result["export_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def export_variants(model, out: Path, variants: list[str], device) -> list[dict]:
    """The same calibrated model exported again per variant ``WORKERS:SWITCH_INTERVAL_S`` (shards written at
    once, the interpreter's thread switch interval): which knob the writing time answers to."""
    import quantport
    from quantport.export import shards

    results = []
    default_workers, default_switch = shards.SHARD_WORKERS, sys.getswitchinterval()
    for variant in variants:
        workers, _, switch = variant.partition(":")
        shards.SHARD_WORKERS = int(workers)
        sys.setswitchinterval(float(switch) if switch else default_switch)
        shutil.rmtree(out, ignore_errors=True)
        sync(device)
        start = time.perf_counter()
        quantport.export(model, out, progress=False, overwrite=True)
        row = {"variant": variant, "export_s": time.perf_counter() - start}
        row["export_gb_per_s"] = directory_bytes(out) / row["export_s"] / 1e9
        print(json.dumps(row), flush=True)
        results.append(row)
    shards.SHARD_WORKERS = default_workers
    sys.setswitchinterval(default_switch)
    shutil.rmtree(out, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["nvfp4", "fp8"], default="nvfp4")
    parser.add_argument("--out", type=Path, default=Path("/tmp/quantport-full-export"))
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--batches", type=int, default=8, help="calibration batches of 4 x 512 (default 8: 16k tokens)")
    parser.add_argument("--reference", action="store_true", help="nvidia-modelopt instead of quantport")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sample", action="store_true", help="sample every thread's stack (bench/stack_sampler.py)")
    parser.add_argument("--no-floor", action="store_true", help="skip the disk-floor measurement")
    parser.add_argument(
        "--floor-modes", nargs="+", choices=["o_direct", "page_cache"], default=["o_direct", "page_cache"]
    )
    parser.add_argument("--direct", choices=["auto", "always", "adaptive", "never"], default="auto")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        metavar="WORKERS[:SWITCH_S]",
        help="export again per variant: shards at once, interpreter switch interval",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    config = dict(SMOKE if args.smoke else QWEN3_30B)
    if not args.smoke:
        config["num_hidden_layers"] = args.layers
    start = time.perf_counter()
    model = build(config, device)
    sync(device)
    params = sum(p.numel() for p in model.parameters())
    result: dict = {
        "tool": "nvidia-modelopt" if args.reference else "quantport",
        "recipe": args.recipe,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        "layers": config["num_hidden_layers"],
        "parameters": params,
        "build_s": time.perf_counter() - start,
    }
    calib = calibration(config["vocab_size"], 2 if args.smoke else args.batches, 32 if args.smoke else 512, device)
    shutil.rmtree(args.out, ignore_errors=True)
    run = run_reference if args.reference else run_quantport
    kwargs = {} if args.reference else {"profile": args.profile, "direct": args.direct, "sample": args.sample}
    result.update(run(model, args.recipe, calib, args.out, device, **kwargs))
    if args.variants:
        result["variants"] = export_variants(model, args.out, args.variants, device)
    result["peak_rss_gib"] = peak_rss_bytes() / 2**30
    shutil.rmtree(args.out, ignore_errors=True)  # before the floor: a 64 GB disk holds one copy of FP8 at a time
    if not args.no_floor:
        del model
        floor = disk_floor(args.out.parent / (args.out.name + "-floor"), result["checkpoint_bytes"], args.floor_modes)
        result["disk_floor"] = floor
        for mode, measured in floor.items():
            if "s" in measured:
                result[f"export_over_{mode}"] = result["export_s"] / measured["s"]
        best = min((v["s"] for v in floor.values() if "s" in v), default=None)
        if best:
            result["export_over_floor"] = result["export_s"] / best
    profile = result.pop("profile", None)
    print(json.dumps(result, indent=2))
    if profile:
        print(profile)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

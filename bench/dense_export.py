"""Side-by-side benchmark: quantport vs nvidia-modelopt on a ~0.46B random dense Llama (bf16, CPU).

Usage (from the repository root):

    .venv/bin/python bench/dense_export.py               # full run (2 repeats), writes bench/RESULTS.md
    .venv/bin/python bench/dense_export.py --repeats 3   # each (tool, recipe) 3 times, min time reported

Every (tool, recipe) measurement runs in its own fresh subprocess (``--worker TOOL RECIPE OUT``) so that
peak RSS (VmHWM, = ``ru_maxrss`` since the driver stays small) belongs to that run alone. The worker
prints one JSON line; the driver collects the lines, runs a paired (interleaved, same-process) export
timing, compares the two tools' checkpoints tensor by tensor and writes RESULTS.md. Nothing in
RESULTS.md is typed in by hand. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work"
MODEL_DIR = WORK / "llama-0.46b-bf16"
CALIB_FILE = WORK / "calib.pt"
OUT_ROOT = WORK / "out"
RESULTS = BENCH / "RESULTS.md"

TOOLS = ("quantport", "modelopt")
RECIPES = ("fp8", "nvfp4")
EXPORT_TARGET = 0.5  # quantport export time <= 0.5 x reference
RSS_TARGET = 0.6  # quantport peak RSS <= 0.6 x reference

SEED = 1234
CALIB_SEQUENCES = 8
CALIB_SEQ_LEN = 256
CALIB_BATCH = 4

MODEL_CONFIG = dict(
    hidden_size=1536,
    intermediate_size=3584,
    num_hidden_layers=16,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)


# --------------------------------------------------------------------------------------------------
# memory helpers (Linux)
# --------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size (VmRSS) of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_split() -> dict[str, int]:
    """VmRSS split into anonymous memory and file-backed pages (e.g. mmapped safetensors), in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
    return out


def peak_rss_bytes() -> int:
    """Peak RSS of this process's address space (VmHWM).

    Same as ``ru_maxrss`` when the parent is small: ``ru_maxrss`` is carried across fork + exec, so a
    child reports at least its parent's peak at the time of the fork. That is why the driver never
    imports torch and runs every heavy step (model creation, warm-up, comparison) in a subprocess.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return ru_maxrss_bytes()


def ru_maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (it is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """user + system CPU time of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def system_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine from /proc/stat (USER_HZ units)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    total = sum(v[:8])
    return total - idle, total


class PhaseClock:
    """Wall time, this process's CPU time and the other processes' share of the machine, per phase."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float, tuple[int, int]]] = []

    def mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter(), cpu_seconds(), system_ticks()))

    def phases(self) -> dict[str, dict[str, float]]:
        hz = os.sysconf("SC_CLK_TCK")
        out = {}
        for (name, w0, c0, (b0, t0)), (_, w1, c1, (b1, t1)) in zip(self.marks, self.marks[1:], strict=False):
            ticks = max(t1 - t0, 1)
            other = max(0.0, (b1 - b0) - (c1 - c0) * hz) / ticks
            out[name] = {"wall_s": w1 - w0, "cpu_s": c1 - c0, "other_load": other}
        return out


class RssSampler:
    """Samples VmRSS every ``interval`` s in a thread; ``phase_peak`` gives the max per named phase."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.interval)

    def _record(self) -> None:
        value = rss_bytes()
        if value > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = value

    def enter(self, phase: str) -> None:
        self._record()
        self.phase = phase
        self._record()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._record()
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# step 0: model and calibration data (cached under bench/_work)
# --------------------------------------------------------------------------------------------------


def prepare() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    WORK.mkdir(parents=True, exist_ok=True)
    if not (MODEL_DIR / "config.json").is_file() or not any(MODEL_DIR.glob("*.safetensors")):
        print(f"[prepare] creating random Llama in {MODEL_DIR}", flush=True)
        torch.manual_seed(SEED)
        config = LlamaConfig(**MODEL_CONFIG, architectures=["LlamaForCausalLM"])
        config.dtype = torch.bfloat16
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.eval()
        shutil.rmtree(MODEL_DIR, ignore_errors=True)
        model.save_pretrained(MODEL_DIR)
        cfg = json.loads((MODEL_DIR / "config.json").read_text())
        cfg["architectures"] = ["LlamaForCausalLM"]
        (MODEL_DIR / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        del model
    if not CALIB_FILE.is_file():
        gen = torch.Generator().manual_seed(SEED + 1)
        ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (CALIB_SEQUENCES, CALIB_SEQ_LEN), generator=gen)
        torch.save(list(ids.split(CALIB_BATCH)), CALIB_FILE)


def model_stats() -> dict:
    """Parameter count and bytes of the cached checkpoint, from the safetensors headers (no torch)."""
    params = 0
    nbytes = 0
    for f in sorted(MODEL_DIR.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                params += math.prod(info["shape"])
        nbytes += f.stat().st_size
    return {"params": params, "file_bytes": nbytes}


# --------------------------------------------------------------------------------------------------
# worker: one (tool, recipe) in a fresh process
# --------------------------------------------------------------------------------------------------


def _set_threads() -> None:
    """Apply ``--threads`` (passed to the subprocesses as BENCH_THREADS); by default torch's own choice."""
    import torch

    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


def flush_to_disk(directory: Path) -> float:
    """Seconds to ``fsync`` every file of ``directory`` (and the directory): what it takes, after export
    returns, until the checkpoint is on disk. Page-cache writes return before the disk has the data;
    ``O_DIRECT`` writes return after."""
    t0 = time.perf_counter()
    for path in [*sorted(p for p in directory.rglob("*") if p.is_file()), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def worker(tool: str, recipe: str, out_dir: Path) -> dict:
    import torch

    _set_threads()

    batches = torch.load(CALIB_FILE)
    shutil.rmtree(out_dir, ignore_errors=True)
    # Import the tool before timing anything, so import cost is outside the measured phases.
    # quantport imports transformers and its own stages lazily: import them here too, as the reference does.
    import transformers.models.llama.modeling_llama  # noqa: F401  (both tools build this model class)

    if tool == "quantport":
        import importlib

        import quantport
        from quantport.loading import load_model

        for stage in ("quantport.pipeline", "quantport.export", "quantport.check.runner"):
            importlib.import_module(stage)
    else:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
        from transformers import AutoModelForCausalLM
    rss_before_load = rss_bytes()
    result: dict = {"tool": tool, "recipe": recipe, "threads": torch.get_num_threads()}
    clock = PhaseClock()
    with RssSampler() as sampler:
        sampler.enter("load")
        clock.mark("load")
        if tool == "quantport":
            model, _ = load_model(MODEL_DIR, device="cpu")
        else:
            model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype="auto")
        clock.mark("calibrate")
        rss_after_load = rss_bytes()
        split_after_load = rss_split()
        sampler.enter("calibrate")
        if tool == "quantport":
            quantport.quantize(model, recipe, batches, progress=False)
        else:
            cfg = {"fp8": mtq.FP8_DEFAULT_CFG, "nvfp4": mtq.NVFP4_DEFAULT_CFG}[recipe]

            def loop(m):
                for b in batches:
                    m(b)

            with torch.no_grad():
                mtq.quantize(model, cfg, loop)
        clock.mark("export")
        rss_after_calib = rss_bytes()
        split_after_calib = rss_split()
        sampler.enter("export")
        if tool == "quantport":
            quantport.export(model, out_dir, progress=False)
        else:
            with torch.no_grad():
                export_hf_checkpoint(model, export_dir=out_dir)
        clock.mark("end")
        sampler.enter("end")
    flush_s = flush_to_disk(out_dir)
    ph = clock.phases()
    result.update(
        load_s=ph["load"]["wall_s"],
        calib_s=ph["calibrate"]["wall_s"],
        export_s=ph["export"]["wall_s"],
        durable_export_s=ph["export"]["wall_s"] + flush_s,
        total_s=sum(p["wall_s"] for p in ph.values()),
        load_cpu_s=ph["load"]["cpu_s"],
        calib_cpu_s=ph["calibrate"]["cpu_s"],
        export_cpu_s=ph["export"]["cpu_s"],
        total_cpu_s=sum(p["cpu_s"] for p in ph.values()),
        other_load={k: p["other_load"] for k, p in ph.items()},
        rss_before_load=rss_before_load,
        rss_after_load=rss_after_load,
        rss_after_calib=rss_after_calib,
        rss_after_export=rss_bytes(),
        split_after_load=split_after_load,
        split_after_calib=split_after_calib,
        split_after_export=rss_split(),
        peak_rss=peak_rss_bytes(),
        ru_maxrss=ru_maxrss_bytes(),
        phase_peak_rss=sampler.peaks,
        out_bytes=sum(p.stat().st_size for p in out_dir.glob("*.safetensors")),
    )
    return result


def paired_worker(recipe: str, rounds: int) -> dict:
    """Export timing only, both tools in ONE process, interleaved: robust to a shared, noisy machine.

    Both models are loaded and quantized first (not timed). quantport's export only reads the model, so
    it is run again each round; modelopt's export changes the model in place (weights become quantized),
    so each round exports a deep copy of the quantized model, made outside the timed region.
    """
    import copy

    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    import quantport
    from quantport.loading import load_model

    _set_threads()
    batches = torch.load(CALIB_FILE)
    qp_model, _ = load_model(MODEL_DIR, device="cpu")
    quantport.quantize(qp_model, recipe, batches, progress=False)
    ref_model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype="auto")
    cfg = {"fp8": mtq.FP8_DEFAULT_CFG, "nvfp4": mtq.NVFP4_DEFAULT_CFG}[recipe]
    with torch.no_grad():
        mtq.quantize(ref_model, cfg, lambda m: [m(b) for b in batches])

    def timed(fn) -> tuple[float, float, float]:
        clock = PhaseClock()
        clock.mark("x")
        fn()
        clock.mark("end")
        ph = clock.phases()["x"]
        return ph["wall_s"], ph["cpu_s"], ph["other_load"]

    def run_qp() -> tuple[float, float, float]:
        out = OUT_ROOT / f"paired_quantport_{recipe}"
        shutil.rmtree(out, ignore_errors=True)
        return timed(lambda: quantport.export(qp_model, out, progress=False))

    def run_ref() -> tuple[float, float, float]:
        out = OUT_ROOT / f"paired_modelopt_{recipe}"
        shutil.rmtree(out, ignore_errors=True)
        model = copy.deepcopy(ref_model)

        def go() -> None:
            with torch.no_grad():
                export_hf_checkpoint(model, export_dir=out)

        return timed(go)

    rounds_out = []
    for r in range(rounds):
        first, second = (run_qp, run_ref) if r % 2 == 0 else (run_ref, run_qp)
        a = first()
        b = second()
        qp, ref = (a, b) if r % 2 == 0 else (b, a)
        rounds_out.append({"quantport": qp, "modelopt": ref})
    return {"recipe": recipe, "rounds": rounds_out}


def prefault(gib: float) -> float:
    """Touch ``gib`` GiB of fresh anonymous memory once, then free it; returns the seconds it took.

    On this kind of VM (Firecracker guest) the first touch of a guest page that the host has not
    backed yet costs ~3 s/GiB instead of ~0.5 s/GiB, and freed guest pages are handed back to the
    host over time. Without this warm-up a worker's timings depend on how much fresh guest memory it
    happens to get (seen: the same export taking 1.1 s or 33 s). Both tools get the same warm-up.
    """
    if gib <= 0:
        return 0.0
    import mmap

    import numpy as np

    t0 = time.perf_counter()
    m = mmap.mmap(-1, int(gib * 2**30))
    a = np.frombuffer(m, dtype=np.uint8)
    a[:: mmap.PAGESIZE] = 1
    del a
    m.close()
    return time.perf_counter() - t0


def wait_quiet(max_wait_s: float, threshold: float = 0.25) -> tuple[float, float]:
    """Wait (at most ``max_wait_s``) until other processes use less than ``threshold`` of the machine's
    CPU over one second; returns (seconds waited, last busy fraction). Other engineers' test runs share
    this 2-core machine, and a worker that runs beside them measures them, not the tool."""
    t0 = time.perf_counter()
    while True:
        b0, t0_ = system_ticks()
        time.sleep(1.0)
        b1, t1_ = system_ticks()
        busy = (b1 - b0) / max(t1_ - t0_, 1)
        waited = time.perf_counter() - t0
        if busy < threshold or waited >= max_wait_s:
            return waited, busy


def _self_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _subprocess_json(*args: str) -> object:
    proc = subprocess.run(_self_cmd(*args), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.strip()][-1])  # the last line is the answer


def run_worker(tool: str, recipe: str, out_dir: Path, prefault_gib: float = 0.0, max_wait_s: float = 0.0) -> dict:
    waited, busy = wait_quiet(max_wait_s) if max_wait_s > 0 else (0.0, float("nan"))
    warm_s = float(_subprocess_json("--prefault", str(prefault_gib))) if prefault_gib > 0 else 0.0
    cmd = _self_cmd("--worker", tool, recipe, str(out_dir))
    print(f"[run] {tool} {recipe} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker {tool} {recipe} failed with exit code {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    res = json.loads(line)
    res["prefault_s"] = warm_s
    res["waited_s"] = waited
    res["busy_before"] = busy
    print(
        f"      load {res['load_s']:.1f}s calib {res['calib_s']:.1f}s export {res['export_s']:.1f}s "
        f"(export CPU {res['export_cpu_s']:.1f}s, others' load {res['other_load']['export']:.0%}) "
        f"peak {res['peak_rss'] / 1e9:.2f} GB (waited {waited:.0f}s for a quiet machine)",
        flush=True,
    )
    return res


# --------------------------------------------------------------------------------------------------
# output comparison
# --------------------------------------------------------------------------------------------------


def _load_tensors(directory: Path, predicate) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118  (safe_open is not a dict)
                if predicate(k):
                    out[k] = st.get_tensor(k)
    return out


def _all_keys(directory: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys.update(st.keys())
    return keys


def compare_outputs(qp_dir: Path, ref_dir: Path) -> dict:  # noqa: C901
    """Layer 0's quantized tensors: weight / weight_scale / weight_scale_2 bit for bit, input_scale
    within 1e-6 (relative); plus every input_scale of the model, key sets and quant config."""
    import torch

    layer0 = "model.layers.0."
    qp0 = _load_tensors(qp_dir, lambda k: k.startswith(layer0))
    ref0 = _load_tensors(ref_dir, lambda k: k.startswith(layer0))
    qp_in = _load_tensors(qp_dir, lambda k: k.endswith("input_scale"))
    ref_in = _load_tensors(ref_dir, lambda k: k.endswith("input_scale"))
    mismatches: list[str] = []
    checked = 0
    for k in sorted(set(qp0) | set(ref0)):
        if k not in qp0 or k not in ref0:
            mismatches.append(f"{k}: only in {'quantport' if k in qp0 else 'modelopt'}")
            continue
        a, b = qp0[k], ref0[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            mismatches.append(f"{k}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            continue
        if k.endswith("input_scale"):
            continue
        checked += 1
        one_byte = a.element_size() == 1  # fp8 / packed fp4: compare the raw bytes (NaN-safe, bit for bit)
        if not torch.equal(a.view(torch.uint8) if one_byte else a, b.view(torch.uint8) if one_byte else b):
            diff = (a.view(torch.uint8) != b.view(torch.uint8)).float().mean().item() if one_byte else None
            mismatches.append(f"{k}: not bit-identical" + (f" ({diff:.2%} bytes differ)" if diff is not None else ""))
    max_rel = 0.0
    for k in sorted(set(qp_in) | set(ref_in)):
        if k not in qp_in or k not in ref_in:
            mismatches.append(f"{k}: only in {'quantport' if k in qp_in else 'modelopt'}")
            continue
        a, b = qp_in[k].double(), ref_in[k].double()
        rel = (abs(a - b) / abs(b).clamp_min(1e-30)).max().item()
        max_rel = max(max_rel, rel)
        checked += 1
        if rel > 1e-6:
            mismatches.append(f"{k}: {a.item():.8g} vs {b.item():.8g} (rel {rel:.2e})")
    qp_keys, ref_keys = _all_keys(qp_dir), _all_keys(ref_dir)
    key_diff = sorted(qp_keys ^ ref_keys)

    def qcfg(d: Path) -> dict:
        c = json.loads((d / "config.json").read_text()).get("quantization_config", {})
        c = {k: v for k, v in c.items() if k != "producer"}
        for key in ("ignore",):
            if key in c:
                c[key] = sorted(c[key])
        return c

    try:
        a, b = qcfg(qp_dir), qcfg(ref_dir)
        cfg_equal = a == b
        cfg_diff = [
            f"{k}: quantport={json.dumps(a.get(k, '<absent>'))}, modelopt={json.dumps(b.get(k, '<absent>'))}"
            for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")
        ]
    except Exception as exc:  # noqa: BLE001
        cfg_equal, cfg_diff = False, [f"could not compare: {exc}"]
    return {
        "identical": not mismatches,
        "tensors_checked": checked,
        "input_scale_max_rel_diff": max_rel,
        "mismatches": mismatches[:20],
        "n_mismatches": len(mismatches),
        "key_sets_equal": not key_diff,
        "key_diff": key_diff[:10],
        "n_keys": len(qp_keys),
        "quant_config_equal": cfg_equal,
        "quant_config_diff": cfg_diff,
    }


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def src_digest() -> str:
    """sha256 (first 12 hex digits) of quantport's source files: identifies the code that was measured
    (the source tree changes while other people work on it)."""
    import hashlib
    import importlib.util

    root = Path(importlib.util.find_spec("quantport").origin).resolve().parent  # without importing it
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def _versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "nvidia-modelopt", "safetensors", "quantport"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = "?"
    return out


def _best(runs: list[dict]) -> dict:
    """Times: min over repeats (each run is an independent process). Memory figures: all taken from
    the run with the lowest peak RSS, so they stay consistent with one another."""
    best = dict(min(runs, key=lambda r: r["peak_rss"]))
    for key in (
        "load_s",
        "calib_s",
        "export_s",
        "durable_export_s",
        "total_s",
        "load_cpu_s",
        "calib_cpu_s",
        "export_cpu_s",
        "total_cpu_s",
    ):
        best[key] = min(r[key] for r in runs)
    best["n"] = len(runs)
    best["runs"] = runs
    best["peak_rss_range"] = (min(r["peak_rss"] for r in runs), max(r["peak_rss"] for r in runs))
    return best


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def write_results(  # noqa: C901
    recipes: tuple[str, ...], meta: dict, results: dict, comparisons: dict, wall_s: float
) -> str:
    gb = 1e9
    v = meta["versions"]
    when = meta.get("finished_at") or time.strftime("%Y-%m-%d %H:%M:%S %Z")
    digest = meta["src_digest"]
    if meta.get("src_digest_end") and meta["src_digest_end"] != digest:
        digest += f" at start, {meta['src_digest_end']} at the end (the source changed during the run!)"
    lines = [
        "# quantport vs nvidia-modelopt: dense Llama export on CPU",
        "",
        f"Generated by `bench/dense_export.py`, measured on {when} "
        f"(benchmark wall time {wall_s / 60:.1f} min). Do not edit by hand; rerun the script.",
        "",
        "## Setup",
        "",
        f"- Machine: {meta['cpu']}, {meta['cores']} cores (torch threads: {', '.join(map(str, meta['threads']))}), "
        f"{meta['mem_gb']:.1f} GB RAM, {platform.system()} {platform.release()}",
        f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"nvidia-modelopt {v['nvidia-modelopt']}, safetensors {v['safetensors']}, quantport {v['quantport']} "
        f"(source digest {digest})",
        f"- Model: random-init LlamaForCausalLM (seed {SEED}), hidden {MODEL_CONFIG['hidden_size']}, "
        f"intermediate {MODEL_CONFIG['intermediate_size']}, {MODEL_CONFIG['num_hidden_layers']} layers, "
        f"{MODEL_CONFIG['num_attention_heads']} heads / {MODEL_CONFIG['num_key_value_heads']} KV heads, "
        f"head_dim {MODEL_CONFIG['head_dim']}, vocab {MODEL_CONFIG['vocab_size']}, untied embeddings; "
        f"{meta['params'] / 1e9:.3f} B parameters ({meta['params']:,}), bf16 checkpoint "
        f"{meta['file_bytes'] / gb:.3f} GB",
        f"- Calibration: the same {CALIB_SEQUENCES} random-token sequences x {CALIB_SEQ_LEN} tokens "
        f"({CALIB_SEQUENCES * CALIB_SEQ_LEN} tokens) in batches of {CALIB_BATCH}, for both tools "
        f"(`bench/_work/calib.pt`)",
        "- quantport: `load_model(dir, device='cpu')`, `quantport.quantize(model, recipe, batches, progress=False)`, "
        "`quantport.export(model, out, progress=False)`",
        "- reference: `AutoModelForCausalLM.from_pretrained(dir, dtype='auto')`, "
        "`mtq.quantize(model, mtq.FP8_DEFAULT_CFG | mtq.NVFP4_DEFAULT_CFG, loop)` with `loop` = `m(b)` per batch, "
        "`export_hf_checkpoint(model, export_dir=out)` (both under `torch.no_grad()`)",
        "",
        "## Method",
        "",
        f"- Each (tool, recipe) ran {meta['repeats']}x, each run in a fresh process, the two tools alternating. "
        "Times are the minimum over the repeats (each phase separately); memory figures come from the repeat "
        "with the lowest peak RSS. Imports are not timed.",
        "- Peak RSS is the worker process's high-water mark over its whole life (imports, load, calibration, "
        "export), read as VmHWM; file-backed pages count. `ru_maxrss` is shown too: on Linux it carries the "
        "parent's peak across fork + exec, so the driver never imports torch (its own peak: "
        f'{meta["driver_peak_rss"] / gb:.3f} GB) and the two agree. "RSS after load" is VmRSS right after '
        "`from_pretrained`/`load_model`.",
        "- transformers memory-maps the safetensors file, so right after load the weights are mostly not resident "
        "yet; they become resident (file-backed pages) when calibration first touches them, and stay resident "
        'unless the tool drops them (quantport can: `madvise(MADV_DONTNEED)` once a layer is done). "Peak minus '
        '(imports + bf16 model bytes)" is what a tool needs beyond holding the whole model; it is negative when '
        "the model is never fully resident. Phase peaks are VmRSS sampled every 20 ms in a thread.",
        "- CPU s is user+system CPU time of the worker (all threads) in that phase. This 2-core machine is shared "
        "with other people's test runs. With one torch thread per core, one busy core slows calibration and export "
        "of both tools 4-10x and inflates their CPU time as well (threads spin waiting for a descheduled sibling), "
        "so runs with a high \"others' load\" (share of the machine's CPU used by other processes during the "
        "phase, from /proc/stat) are not comparable with quiet ones: see the run table. Before each "
        f"worker the driver waits up to {meta['max_wait']:g} s for the machine to be quiet (< 25% busy).",
        "- Paired export timing: one extra process per recipe loads and quantizes the model with both tools (not "
        "timed), then times the two exports alternately for a few rounds, so each pair runs under the same "
        "machine load. quantport exports the same model each round (its export only reads the model); modelopt's "
        "export quantizes the model in place, so each round exports a fresh `copy.deepcopy` of the modelopt-"
        "quantized model, made outside the timed region (the copied weights are resident anonymous memory, as "
        "they are after calibration in the separate runs). Memory is not measured there.",
        f"- VM memory warm-up: before each worker the driver touches and frees {meta['prefault_gib']:g} GiB "
        "(`--prefault-gib`). On this VM (Firecracker guest with free-page reporting) the first touch of guest "
        "memory the host has not backed costs ~3 s/GiB instead of ~0.5 s/GiB; same warm-up for both tools.",
        "- Writes: modelopt (safetensors) writes through the page cache, so its export returns before the disk has "
        "the data; quantport's export returns after it (it fsyncs every file before the final rename) and after "
        "running its own checker on what it wrote (`quantport check`, reading scales and every unquantized float "
        'tensor). "export + fsync" adds, after the timed export, the time to `fsync` every written file: the '
        "time until the checkpoint is on disk.",
        "",
    ]
    verdicts = []
    for recipe in recipes:
        qp, ref = results[("quantport", recipe)], results[("modelopt", recipe)]
        cmp_ = comparisons[recipe]
        lines += [
            f"## {recipe.upper()}",
            "",
            "| | quantport | modelopt (reference) | ratio qp/ref |",
            "|---|---:|---:|---:|",
        ]

        def row(label, a, b, fmt, lines=lines):
            r = f"{a / b:.2f}x" if a >= 0 and b > 0 else ""
            lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {r} |")

        for label, key in (("load", "load"), ("calibration", "calib"), ("export", "export"), ("total", "total")):
            row(f"{label} wall (s), min", qp[f"{key}_s"], ref[f"{key}_s"], "{:.2f}")
        row(
            "export wall (s), median",
            _median([r["export_s"] for r in qp["runs"]]),
            _median([r["export_s"] for r in ref["runs"]]),
            "{:.2f}",
        )
        row("export + fsync of its files (s), min", qp["durable_export_s"], ref["durable_export_s"], "{:.2f}")
        for label, key in (("calibration", "calib"), ("export", "export"), ("total", "total")):
            row(f"{label} CPU (s), min", qp[f"{key}_cpu_s"], ref[f"{key}_cpu_s"], "{:.2f}")
        row("**peak RSS (GB)**", qp["peak_rss"] / gb, ref["peak_rss"] / gb, "{:.3f}")
        row("ru_maxrss (GB)", qp["ru_maxrss"] / gb, ref["ru_maxrss"] / gb, "{:.3f}")
        row("RSS before load, i.e. imports (GB)", qp["rss_before_load"] / gb, ref["rss_before_load"] / gb, "{:.3f}")
        row("RSS after load (GB)", qp["rss_after_load"] / gb, ref["rss_after_load"] / gb, "{:.3f}")
        row("RSS after calibration (GB)", qp["rss_after_calib"] / gb, ref["rss_after_calib"] / gb, "{:.3f}")
        row("RSS after export (GB)", qp["rss_after_export"] / gb, ref["rss_after_export"] / gb, "{:.3f}")

        def split(r, key):
            d = r[key]
            return f"{d.get('RssAnon', 0) / gb:.3f} / {d.get('RssFile', 0) / gb:.3f}"

        for label, key in (
            ("load", "split_after_load"),
            ("calibration", "split_after_calib"),
            ("export", "split_after_export"),
        ):
            lines.append(f"| after {label}: anon / file-backed RSS (GB) | {split(qp, key)} | {split(ref, key)} | |")
        row(
            "peak minus RSS after load (GB)",
            (qp["peak_rss"] - qp["rss_after_load"]) / gb,
            (ref["peak_rss"] - ref["rss_after_load"]) / gb,
            "{:.3f}",
        )
        row(
            "peak minus (imports + bf16 model bytes) (GB; < 0: model never fully resident)",
            (qp["peak_rss"] - qp["rss_before_load"] - meta["file_bytes"]) / gb,
            (ref["peak_rss"] - ref["rss_before_load"] - meta["file_bytes"]) / gb,
            "{:.3f}",
        )
        for phase in ("calibrate", "export"):
            row(
                f"sampled peak RSS during {phase} (GB)",
                qp["phase_peak_rss"].get(phase, 0) / gb,
                ref["phase_peak_rss"].get(phase, 0) / gb,
                "{:.3f}",
            )
        lines.append(f"| checkpoint size (GB) | {qp['out_bytes'] / gb:.3f} | {ref['out_bytes'] / gb:.3f} | |")
        exp_r = qp["export_s"] / ref["export_s"]
        exp_cpu_r = qp["export_cpu_s"] / ref["export_cpu_s"]
        rss_r = qp["peak_rss"] / ref["peak_rss"]
        exp_ok, rss_ok = exp_r <= EXPORT_TARGET, rss_r <= RSS_TARGET
        paired = meta.get("paired", {}).get(recipe)
        paired_r = None
        paired_lines = []
        if paired:
            qs = [r["quantport"][0] for r in paired["rounds"]]
            ms = [r["modelopt"][0] for r in paired["rounds"]]
            per_round = [r["quantport"][0] / r["modelopt"][0] for r in paired["rounds"]]
            paired_r = _median(per_round)
            loads = [max(r["quantport"][2], r["modelopt"][2]) for r in paired["rounds"]]
            paired_lines = [
                f"- **paired export timing** ({len(qs)} rounds, both tools in one process, interleaved; see Method): "
                f"quantport min {min(qs):.2f} s / median {_median(qs):.2f} s, modelopt min {min(ms):.2f} s / median "
                f"{_median(ms):.2f} s; per-round ratios "
                + ", ".join(f"{x:.2f}x" for x in per_round)
                + f" (others' load up to {max(loads):.0%}); **median ratio {paired_r:.2f}x: "
                f"{'PASS' if paired_r <= EXPORT_TARGET else 'FAIL'}**; ratio of minima {min(qs) / min(ms):.2f}x",
            ]
        verdicts.append((recipe, exp_ok, paired_r, rss_ok))
        lines += [
            "",
            f"- **export time ratio: {exp_r:.2f}x** (wall, min of {qp['n']} vs min of {ref['n']}; target <= "
            f"{EXPORT_TARGET}x): **{'PASS' if exp_ok else 'FAIL'}**. Same ratio in CPU time: {exp_cpu_r:.2f}x "
            f"({'PASS' if exp_cpu_r <= EXPORT_TARGET else 'FAIL'}).",
            *paired_lines,
            f"- export until the checkpoint is on disk (export + `fsync` of its files, measured after the export "
            f"phase): {qp['durable_export_s']:.2f} s vs {ref['durable_export_s']:.2f} s, ratio "
            f"{qp['durable_export_s'] / ref['durable_export_s']:.2f}x (informative; the target is on export wall "
            "time, where page-cache writes count as done before the disk has them)",
            f"- **peak RSS ratio: {rss_r:.2f}x** (target <= {RSS_TARGET}x): **{'PASS' if rss_ok else 'FAIL'}**",
            f"- calibration time ratio: {qp['calib_s'] / ref['calib_s']:.2f}x (CPU "
            f"{qp['calib_cpu_s'] / ref['calib_cpu_s']:.2f}x); total time ratio: {qp['total_s'] / ref['total_s']:.2f}x "
            f"(CPU {qp['total_cpu_s'] / ref['total_cpu_s']:.2f}x)",
            f"- outputs identical: **{'yes' if cmp_['identical'] else 'no'}** "
            f"({cmp_['tensors_checked']} tensors checked: layer 0's weight / weight_scale / weight_scale_2 bit "
            f"for bit, every input_scale of the model within 1e-6 relative; max input_scale rel. diff "
            f"{cmp_['input_scale_max_rel_diff']:.1e})",
            f"- same tensor names, dtypes and shapes in layer 0 / same names everywhere: "
            f"{'yes' if cmp_['key_sets_equal'] else 'no'} ({cmp_['n_keys']} tensors); same `quantization_config` "
            f"in config.json (producer excluded): {'yes' if cmp_['quant_config_equal'] else 'no'}",
        ]
        if cmp_["mismatches"]:
            lines.append(
                f"- mismatches ({cmp_['n_mismatches']}, first shown): "
                + "; ".join(f"`{m}`" for m in cmp_["mismatches"][:8])
            )
        if cmp_["quant_config_diff"]:
            lines.append(
                "- `quantization_config` differences: " + "; ".join(f"`{d}`" for d in cmp_["quant_config_diff"])
            )
        if cmp_["key_diff"]:
            lines.append("- tensor names in only one checkpoint: " + ", ".join(f"`{k}`" for k in cmp_["key_diff"]))
        lines.append("")
    lines += [
        "## Verdict",
        "",
        "| recipe | export time <= 0.5x (separate runs, min/min) | export time <= 0.5x (paired, median) "
        "| peak RSS <= 0.6x |",
        "|---|---|---|---|",
    ]

    def pf(ok: bool | None, ratio: float | None = None) -> str:
        if ok is None:
            return "not run"
        return ("PASS" if ok else "FAIL") + (f" ({ratio:.2f}x)" if ratio is not None else "")

    met = True
    for recipe, e, pr, r in verdicts:
        qp, ref = results[("quantport", recipe)], results[("modelopt", recipe)]
        p_ok = None if pr is None else pr <= EXPORT_TARGET
        lines.append(
            f"| {recipe.upper()} | {pf(e, qp['export_s'] / ref['export_s'])} | {pf(p_ok, pr)} | "
            f"{pf(r, qp['peak_rss'] / ref['peak_rss'])} |"
        )
        met &= (p_ok if p_ok is not None else e) and r
    lines += [
        "",
        "The export-time verdict uses the paired measurement when it ran: on a shared machine, separate runs "
        "compare a tool measured in a busy moment with the other measured in a quiet one (see the run table).",
        "",
        f"All targets met: **{'yes' if met else 'no'}**.",
        "",
        "## All runs (in run order)",
        "",
        "| # | tool | recipe | load s | calib s | export s | total s | export CPU s | others' load calib / export "
        "| peak RSS GB | waited s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(meta["raw"], 1):
        ol = r["other_load"]
        lines.append(
            f"| {i} | {r['tool']} | {r['recipe']} | {r['load_s']:.2f} | {r['calib_s']:.2f} | {r['export_s']:.2f} | "
            f"{r['total_s']:.2f} | {r['export_cpu_s']:.2f} | {ol['calibrate']:.0%} / {ol['export']:.0%} | "
            f"{r['peak_rss'] / gb:.3f} | {r.get('waited_s', 0):.0f} |"
        )
    lines.append("")
    text = "\n".join(lines)
    RESULTS.write_text(text)
    return text


# --------------------------------------------------------------------------------------------------


def main() -> None:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "RECIPE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefault", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--compare", nargs=2, metavar=("QP_DIR", "REF_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--paired-worker", nargs=2, metavar=("RECIPE", "ROUNDS"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--paired",
        type=int,
        default=4,
        help="rounds of the paired export timing (both tools in one process, interleaved); 0: skip",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per (tool, recipe); min is reported")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument(
        "--max-wait",
        type=float,
        default=20.0,
        help="seconds to wait, before each worker, for other processes to leave the CPU idle; 0: off",
    )
    parser.add_argument(
        "--prefault-gib",
        type=float,
        default=4.0,
        help="GiB of memory touched (and freed) before each worker to warm the VM's memory; 0: off",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in the measuring processes (default: torch's choice, one per core). 1 makes the "
        "comparison far less sensitive to other processes busy on one of the cores",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite bench/RESULTS.md from bench/_work/results.json"
    )
    args = parser.parse_args()
    if args.threads > 0:
        os.environ["BENCH_THREADS"] = str(args.threads)  # inherited by every subprocess
    if args.worker:
        tool, recipe, out = args.worker
        print(json.dumps(worker(tool, recipe, Path(out))), flush=True)
        return
    if args.prepare:
        prepare()
        print("{}")
        return
    if args.prefault is not None:
        print(json.dumps(prefault(args.prefault)))
        return
    if args.paired_worker:
        print(json.dumps(paired_worker(args.paired_worker[0], int(args.paired_worker[1]))))
        return
    if args.compare:
        print(json.dumps(compare_outputs(Path(args.compare[0]), Path(args.compare[1]))))
        return
    if args.report_only:  # rewrite RESULTS.md from the last run's raw data (bench/_work/results.json)
        saved = json.loads((WORK / "results.json").read_text())
        mtime = time.localtime((WORK / "results.json").stat().st_mtime)
        saved["meta"].setdefault("finished_at", time.strftime("%Y-%m-%d %H:%M:%S %Z", mtime))
        runs: dict[tuple[str, str], list[dict]] = {}
        for r in saved["meta"]["raw"]:
            runs.setdefault((r["tool"], r["recipe"]), []).append(r)
        results = {k: _best(v) for k, v in runs.items()}
        print(write_results(tuple(saved["recipes"]), saved["meta"], results, saved["comparisons"], saved["wall_s"]))
        return
    # The driver stays small (no torch): see peak_rss_bytes.
    start = time.perf_counter()
    _subprocess_json("--prepare")
    meta = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_gb": _mem_total_gb(),
        "versions": _versions(),
        "repeats": args.repeats,
        "prefault_gib": args.prefault_gib,
        "max_wait": args.max_wait,
        "src_digest": src_digest(),
        **model_stats(),
    }
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for recipe in args.recipes:
            order = TOOLS if rep % 2 == 0 else TOOLS[::-1]
            for tool in order:
                res = run_worker(tool, recipe, OUT_ROOT / f"{tool}_{recipe}", args.prefault_gib, args.max_wait)
                res["seq"] = sum(len(v) for v in runs.values())
                runs.setdefault((tool, recipe), []).append(res)
    results = {k: _best(v) for k, v in runs.items()}
    comparisons = {}
    for recipe in args.recipes:
        comparisons[recipe] = _subprocess_json(
            "--compare", str(OUT_ROOT / f"quantport_{recipe}"), str(OUT_ROOT / f"modelopt_{recipe}")
        )
    meta["paired"] = {}
    if args.paired > 0:
        for recipe in args.recipes:
            wait_quiet(args.max_wait) if args.max_wait > 0 else None
            print(f"[paired] {recipe}: {args.paired} interleaved export rounds ...", flush=True)
            meta["paired"][recipe] = _subprocess_json("--paired-worker", recipe, str(args.paired))
            for r in meta["paired"][recipe]["rounds"]:
                print(
                    f"      quantport {r['quantport'][0]:.2f}s (others' load {r['quantport'][2]:.0%})  "
                    f"modelopt {r['modelopt'][0]:.2f}s (others' load {r['modelopt'][2]:.0%})",
                    flush=True,
                )
    meta["threads"] = sorted({r["threads"] for v in runs.values() for r in v})
    meta["driver_peak_rss"] = peak_rss_bytes()
    meta["src_digest_end"] = src_digest()
    meta["raw"] = sorted((r for v in runs.values() for r in v), key=lambda r: r["seq"])
    wall_s = time.perf_counter() - start
    meta["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (WORK / "results.json").write_text(
        json.dumps({"recipes": args.recipes, "meta": meta, "comparisons": comparisons, "wall_s": wall_s}, indent=1)
    )
    text = write_results(tuple(args.recipes), meta, results, comparisons, wall_s)
    print(text)


if __name__ == "__main__":
    main()

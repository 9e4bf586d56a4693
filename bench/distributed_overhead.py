"""What the torch.distributed code path costs with one rank, against the plain path (issue 15); and the
command for the multi-GPU scaling measurement (issue 16).

The stack of bench/gpu_moe_calibration.py: Qwen3-30B-A3B-, GPT-OSS-20B- and Qwen3-8B-shaped 4-layer models
with random bf16 weights, built from configs on the device (nothing is downloaded), ``quantport.quantize``
(fp8 and nvfp4) on 8 batches of 4 x 512 tokens, then ``quantport.export`` (Qwen3 shape). Each measurement runs
in a fresh worker process: *plain* without torch.distributed, *one-rank* with torchrun's variables for a world
of one (RANK=0, WORLD_SIZE=1, ...), so quantport joins a run (NCCL on the GPU, gloo on the CPU) and takes
the distributed path: rank share of the batches, the votes, the statistics reduced by collectives, the
agreed rename. The process group's start-up (``join_s``, once per process) is timed on its own; each worker
quantizes and exports ``--reps`` fresh models (built outside the timed region) and reports the medians; the
driver alternates plain and one-rank workers ``--rounds`` times and takes the median of their medians.

    python bench/distributed_overhead.py --json OUT.json                 # one GPU (H200)
    python bench/distributed_overhead.py --cpu --json OUT.json           # tiny shapes on the CPU
    # issue 16, N GPUs of one node: every rank calibrates 1/N of the batches (compare N = 1, 2, 4, 8)
    torchrun --nproc-per-node N bench/distributed_overhead.py --worker distributed --shape qwen3 \
        --recipe nvfp4 --batches 64 --reps 3 --json scaling-N.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import gpu_moe_calibration as stack  # noqa: E402
import torch  # noqa: E402

import quantport  # noqa: E402
import quantport.pipeline as pipeline  # noqa: E402
from quantport.distributed import close_session, current_session  # noqa: E402
from quantport.distributed.session import RankSession  # noqa: E402

SHAPES = {"qwen3": "Qwen3-30B-A3B shape", "gpt-oss": "GPT-OSS-20B shape", "dense": "Qwen3-8B shape (dense)"}
CPU_SHAPES = {"qwen3": "qwen3 tiny", "gpt-oss": "gpt-oss tiny"}
MARK = "DISTRIBUTED_OVERHEAD "


def _shape(name: str, cpu: bool) -> tuple[str, dict, bool]:
    return stack.SMOKE[CPU_SHAPES[name]] if cpu else stack.SHAPES[SHAPES[name]]


class PathTimers:
    """Seconds spent in the distributed path's own steps: every vote, and the statistics step of quantize
    (its vote, the collectives, writing the statistics back); the rest is the same code as the plain path.
    The statistics step starts once the GPU has finished the calibration forward (a synchronisation that both
    paths make there anyway), so that the calibration's queued GPU work is not counted as the step's."""

    def __init__(self, device: torch.device) -> None:
        self.seconds = {"votes_s": 0.0, "statistics_step_s": 0.0}
        self._agree, self._statistics = RankSession.agree, pipeline.agree_on_statistics
        RankSession.agree = self._timed("votes_s", self._agree)
        pipeline.agree_on_statistics = self._timed("statistics_step_s", self._statistics, device)

    def _timed(self, key, function, device: torch.device | None = None):
        def run(*args, **kwargs):
            if device is not None:
                stack.sync(device)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start

        return run

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return out


def _phase(device: torch.device, function) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``function()``; CPU time is what a loaded machine does not distort."""
    stack.sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    stack.sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def worker(args: argparse.Namespace) -> dict:
    """Quantize (and export) ``args.reps`` fresh models in this process; medians of the phases."""
    device = torch.device("cpu" if args.cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    start = time.perf_counter()
    session = current_session(device)
    join_s = time.perf_counter() - start
    model_type, config, export = _shape(args.shape, args.cpu)
    seq, batch = (64, 2) if args.cpu else (stack.SEQ, stack.BATCH)
    data = stack.batches(config["vocab_size"], args.batches, batch, seq, device)
    runs = []
    timers = PathTimers(device)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for rep in range(args.reps):
            model = stack.build(model_type, config, device)
            run = {}
            run["quantize_s"], run["quantize_cpu_s"] = _phase(
                device, lambda m=model: quantport.quantize(m, args.recipe, data, progress=False, release_weights=False)
            )
            if export:
                out_dir = Path(tmp) / f"out{rep}"
                run["export_s"], run["export_cpu_s"] = _phase(
                    device, lambda m=model, o=out_dir: quantport.export(m, o, progress=False)
                )
            run["total_s"] = run["quantize_s"] + run.get("export_s", 0.0)
            run["total_cpu_s"] = run["quantize_cpu_s"] + run.get("export_cpu_s", 0.0)
            run.update(timers.take())  # zeros on the plain path
            runs.append(run)
            del model
            stack.free_memory()
    close_session()
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out.update(
        path="one-rank" if session is not None and session.world_size == 1 else "plain",
        world_size=session.world_size if session is not None else 1,
        rank=session.rank if session is not None else 0,
        join_s=join_s,
        runs=runs,
        tokens=args.batches * batch * seq,
    )
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: argparse.Namespace, shape: str, recipe: str, one_rank: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    if one_rank:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        env["MASTER_PORT"] = str(_free_port())
    command = [sys.executable, __file__, "--worker", "distributed" if one_rank else "plain", "--shape", shape]
    command += ["--recipe", recipe, "--batches", str(args.batches), "--reps", str(args.reps)]
    command += ["--cpu"] if args.cpu else []
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line[len(MARK) :] for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def driver(args: argparse.Namespace) -> dict:
    results = {}
    for shape in args.shapes:
        for recipe in args.recipes:
            rounds: dict[str, list[dict]] = {"plain": [], "one-rank": []}
            for _ in range(args.rounds):
                for one_rank in (False, True):
                    run = _launch(args, shape, recipe, one_rank)
                    rounds[run["path"]].append(run)
            summary = {}
            for key in rounds["plain"][0]:
                if key.endswith("_s") and key not in ("join_s", "votes_s", "statistics_step_s"):
                    plain = statistics.median(r[key] for r in rounds["plain"])
                    dist = statistics.median(r[key] for r in rounds["one-rank"])
                    summary[key] = {"plain": plain, "one_rank": dist, "overhead": dist / plain - 1}
            for key in ("join_s", "votes_s", "statistics_step_s"):
                summary[key] = statistics.median(r[key] for r in rounds["one-rank"])
            own = summary["votes_s"] + summary["statistics_step_s"]  # its vote counted twice: an upper bound
            summary["own_steps_share_of_total"] = own / summary["total_s"]["one_rank"]
            results[f"{shape} {recipe}"] = {"summary": summary, "rounds": rounds}
            print(f"{shape} {recipe}: " + ", ".join(
                f"{k} {v['plain']:.3f} s vs {v['one_rank']:.3f} s ({100 * v['overhead']:+.1f}%)"
                for k, v in summary.items() if isinstance(v, dict)
            ) + f"; votes {summary['votes_s']:.4f} s, statistics step {summary['statistics_step_s']:.4f} s "
              f"({100 * summary['own_steps_share_of_total']:.2f}% of the one-rank total); "
              f"process group start {summary['join_s']:.3f} s", flush=True)  # fmt: skip
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    return {"device": device, "torch": torch.__version__, "batches": args.batches, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["plain", "distributed"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="qwen3", choices=sorted(SHAPES))
    parser.add_argument("--recipe", default="fp8")
    parser.add_argument("--shapes", nargs="+", default=None, help="driver: shapes (default: all; CPU: qwen3 gpt-oss)")
    parser.add_argument("--recipes", nargs="+", default=["fp8", "nvfp4"])
    parser.add_argument("--batches", type=int, default=stack.CALIB_BATCHES, help="calibration batches (default 8)")
    parser.add_argument("--reps", type=int, default=3, help="models quantized per worker process (median)")
    parser.add_argument("--rounds", type=int, default=3, help="plain / one-rank worker pairs (median)")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (gloo)")
    parser.add_argument("--tmp", default=None, help="where checkpoints are written (default: the system's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.worker:
        out = worker(args)
        if args.json is not None and out["rank"] == 0:
            args.json.write_text(json.dumps(out, indent=2))
        print(MARK + json.dumps(out), flush=True)
        return
    args.shapes = args.shapes or (sorted(CPU_SHAPES) if args.cpu else sorted(SHAPES))
    out = driver(args)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

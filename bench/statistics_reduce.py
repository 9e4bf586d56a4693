"""What ``reduce_statistics`` costs on the statistics of a full-size MoE model (issue 15), on a group of one.

The statistics quantport collects from a Qwen3-30B-A3B-sized model (48 layers, 128 experts): a 0-d input amax
per attention projection, expert input amax ``[128]`` per projection, tokens per expert (int64 ``[128]``) per
layer, and the calibration token count on the CPU, on ``--device``. A process group of one (gloo on the CPU,
NCCL on a GPU) is reduced over as a world of one (the collectives skipped) and as if it were a world of two
(the same buffers, the collectives run on the group of one); the first call is a warm-up (for NCCL it creates
the communicator) and is reported apart.

    python bench/statistics_reduce.py --device cpu
    python bench/statistics_reduce.py --device cuda --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from quantport.distributed import Statistics, reduce_statistics  # noqa: E402
from quantport.distributed.session import RankSession  # noqa: E402


def model_statistics(device: torch.device, layers: int, experts: int) -> Statistics:
    stats = Statistics()
    for i in range(layers):
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            stats.maximum[f"model.layers.{i}.self_attn.{projection}#input"] = torch.rand((), device=device)
        for projection in ("gate_up", "down"):
            stats.maximum[f"model.layers.{i}.mlp.experts#experts.{projection}"] = torch.rand(experts, device=device)
        stats.sums[f"model.layers.{i}.mlp.experts#experts.tokens"] = torch.randint(0, 999, (experts,), device=device)
    stats.sums["calibration_tokens"] = torch.tensor(layers * 1000)
    return stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_reduce(session: RankSession, device: torch.device, layers: int, experts: int, reps: int) -> dict:
    calls = []
    all_reduce = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counted
    seconds = []
    try:
        for _ in range(reps + 1):
            stats = model_statistics(device, layers, experts)
            calls.clear()
            _sync(device)
            start = time.perf_counter()
            out = reduce_statistics(stats, session)
            _sync(device)
            seconds.append(time.perf_counter() - start)
    finally:
        dist.all_reduce = all_reduce
    assert int(out.sums["calibration_tokens"]) == layers * 1000  # a group of one: every value is its own
    return {
        "first_s": seconds[0],
        "median_s": statistics.median(seconds[1:]),
        "min_s": min(seconds[1:]),
        "collectives": len(calls),
        "elements": calls,
        "statistics": len(stats.maximum) + len(stats.sums),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    results = {}
    try:
        for world_size in (1, 2):  # 2: the collectives run (on the group of one) as with two ranks
            session = RankSession(0, world_size, None, 60.0, owns_group=False)
            results[f"world_size_{world_size}"] = run = time_reduce(
                session, device, args.layers, args.experts, args.reps
            )
            print(
                f"{backend}, as world of {world_size}: first {1e3 * run['first_s']:.2f} ms, then median "
                f"{1e3 * run['median_s']:.2f} ms (min {1e3 * run['min_s']:.2f}); {run['collectives']} collectives "
                f"for {run['statistics']} statistics",
                flush=True,
            )
    finally:
        dist.destroy_process_group()
    if args.json is not None:
        out = {"device": str(device), "backend": backend, "torch": torch.__version__, "results": results}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

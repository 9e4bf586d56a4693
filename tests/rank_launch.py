"""Start N ranks of a command the way torchrun does (its environment variables, a free port on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
WORKER = Path(__file__).resolve().parent / "distributed" / "rank_worker.py"
SEQUENTIAL_WORKER = WORKER.with_name("sequential_worker.py")


@dataclass(frozen=True)
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def run_plain(args: list[str], timeout: float = 120) -> RankResult:
    """The command in one process without torchrun's variables (the plain path)."""
    done = subprocess.run(
        [sys.executable, *args], env=_environment({}), capture_output=True, text=True, timeout=timeout
    )
    return RankResult(0, done.returncode, done.stdout, done.stderr)


def run_ranks(
    args: list[str], world_size: int, timeout: float = 120, extra: dict[str, str] | None = None
) -> list[RankResult]:
    """``python ARGS`` as ``world_size`` ranks of one torch.distributed run; waits for all of them."""
    port = str(_free_port())
    processes = []
    for rank in range(world_size):
        env = _environment(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                **(extra or {}),
            }
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    try:
        for rank, process in enumerate(processes):
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(RankResult(rank, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

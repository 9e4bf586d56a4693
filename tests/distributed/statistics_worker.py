"""One rank of the flattening test: ``python statistics_worker.py OUT_DIR`` under torchrun's variables (gloo).

Builds statistics from its rank (values the test checks by hand), reduces them with
:func:`quantport.distributed.reduce_statistics` (flat buffers) and, as the reference, one tensor at a time with
its own ``dist.all_reduce`` each; saves both, and the number of collectives the flat reduction made, to
``OUT_DIR/rank{RANK}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from quantport.distributed import Statistics, close_session, current_session, reduce_statistics, statistics

LARGE = 16
"""Elements from which a tensor is reduced on its own in this test (``statistics.LARGE_TENSOR``)."""


def rank_statistics(rank: int, world_size: int) -> Statistics:
    """What rank ``rank`` observed (see the test for the reduced values, worked out by hand)."""
    nan = float("nan")
    return Statistics(
        maximum={
            "a": torch.tensor(1.5 + rank),
            "bf16": torch.tensor([rank, -2 * rank, 3], dtype=torch.bfloat16),
            "experts": torch.tensor([rank, 10 - rank, 5], dtype=torch.float32),
            "only_rank1": torch.tensor(7.0) if rank == 1 else None,
            "never": None,
            "nan_on_last": torch.tensor(nan if rank == world_size - 1 else float(rank)),
            "large": torch.arange(20, dtype=torch.float32) * (rank + 1),
        },
        sums={
            "tokens": torch.tensor([rank, 1, 2**40, -rank], dtype=torch.int64),
            "calibration_tokens": torch.tensor(100 * (rank + 1), dtype=torch.int64),
            "h_small": torch.full((2, 2), rank + 0.25),
            "h_large": torch.full((5, 5), rank + 0.5),
            "f64": torch.tensor([0.25 * rank, -1.0], dtype=torch.float64),
        },
    )


def one_by_one(stats: Statistics) -> Statistics:
    """The reference: every tensor reduced by its own collective (None as -inf, NaN as +inf)."""
    out = Statistics()
    for name in sorted(stats.maximum):
        value = stats.maximum[name]
        reduced = torch.tensor(float("-inf")) if value is None else value.float()
        reduced = torch.nan_to_num(reduced, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        never = value is None and reduced.item() == float("-inf")
        out.maximum[name] = None if never else reduced.to(value.dtype if value is not None else torch.float32)
    for name in sorted(stats.sums):
        reduced = stats.sums[name].clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        out.sums[name] = reduced
    return out


def main() -> None:
    out = Path(sys.argv[1])
    session = current_session(torch.device("cpu"))
    assert session is not None, "run under torchrun's variables"
    statistics.LARGE_TENSOR = LARGE
    calls = []
    all_reduce = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counted
    flat = reduce_statistics(rank_statistics(session.rank, session.world_size), session)
    dist.all_reduce = all_reduce
    reference = one_by_one(rank_statistics(session.rank, session.world_size))
    torch.save(
        {"flat": (flat.maximum, flat.sums), "one_by_one": (reference.maximum, reference.sums), "calls": calls},
        out / f"rank{session.rank}.pt",
    )
    close_session()


if __name__ == "__main__":
    main()

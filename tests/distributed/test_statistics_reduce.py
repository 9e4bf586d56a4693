"""The pieces of the distributed path in this process: the batch split, and the reducer on a 1-rank gloo group
(None, NaN, the large-tensor path, dtypes kept). Several ranks are covered by the subprocess tests."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from quantport.distributed import RankShare, Statistics, reduce_statistics, statistics
from quantport.distributed.session import RankSession
from quantport.errors import CalibrationDataError, DistributedRunError


@pytest.mark.parametrize("total", [0, 1, 2, 5, 7])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shares_are_disjoint_and_cover_the_batches_in_order(total: int, world_size: int):
    if total == 0:
        with pytest.raises(CalibrationDataError, match="calibration data is empty"):
            list(RankShare([], 0, world_size))
        return
    source = list(range(total))
    shares = [list(RankShare(source, rank, world_size)) for rank in range(world_size)]
    assert sorted(b for share in shares for b in share) == source
    assert [len(RankShare(source, rank, world_size)) for rank in range(world_size)] == [len(s) for s in shares]
    assert shares[0] == source[::world_size]


def test_a_share_of_an_iterator_walks_the_whole_source():
    assert list(RankShare(iter(range(7)), 2, 3)) == [2, 5]


@pytest.fixture
def session():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timedelta(seconds=30)
    )
    try:
        yield RankSession(0, 1, dist.new_group(backend="gloo"), 30.0, owns_group=True)
    finally:
        dist.destroy_process_group()


def test_reduce_keeps_values_dtypes_and_unobserved(session, monkeypatch):
    monkeypatch.setattr(statistics, "LARGE_TENSOR", 4)  # the [3, 3] sum takes the one-by-one path
    stats = Statistics(
        maximum={"a": torch.tensor(2.5), "never": None, "nan": torch.tensor(float("nan")), "e": torch.ones(3)},
        sums={"tokens": torch.tensor([1, 2], dtype=torch.int64), "h": torch.full((3, 3), 0.5)},
    )
    out = reduce_statistics(stats, session)
    assert out.maximum["a"].item() == 2.5 and out.maximum["a"].dim() == 0
    assert out.maximum["never"] is None
    assert out.maximum["nan"].item() == float("inf")  # non-finite stays non-finite
    assert torch.equal(out.maximum["e"], torch.ones(3))
    assert out.sums["tokens"].dtype == torch.int64 and out.sums["tokens"].tolist() == [1, 2]
    assert torch.equal(out.sums["h"], torch.full((3, 3), 0.5))


def test_a_failed_vote_raises_the_same_error_again(session):
    assert session.agree("first", 7) == [7]
    error = session.fail("second", ValueError("bad\nthing"))
    assert isinstance(error, DistributedRunError)
    assert str(error) == "rank 0 of 1 failed in second: ValueError: bad thing (every rank stopped; nothing was written)"
    with pytest.raises(DistributedRunError) as again:
        session.agree("third")
    assert again.value is error


def test_votes_of_different_steps_are_refused(monkeypatch):
    from quantport.distributed import session as session_module

    def gather(ballots, ballot, group=None):
        ballots[:] = [ballot, session_module.Ballot(1, True, "another step")]

    monkeypatch.setattr(dist, "all_gather_object", gather)
    two_ranks = RankSession(0, 2, None, 30.0, owns_group=False)
    with pytest.raises(DistributedRunError, match=r"out of step \(rank 0 at 'this step', rank 1 at 'another step'\)"):
        two_ranks.agree("this step")


def _counted_all_reduce(monkeypatch) -> list[tuple[int, torch.dtype]]:
    calls: list[tuple[int, torch.dtype]] = []
    all_reduce = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append((tensor.numel(), tensor.dtype))
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counted)
    return calls


def _layer_statistics() -> Statistics:
    """What a model leaves: 0-d input amax per Linear, expert amax [E] and tokens [E], CPU token counts."""
    maximum: dict[str, torch.Tensor | None] = {
        f"layers.{i}.{p}#input": torch.tensor(float(i)) for i in range(4) for p in "qkvo"
    }
    maximum.update({f"layers.{i}.mlp#experts.gate_up": torch.full((8,), 2.0) for i in range(4)})
    maximum["layers.3.unused#input"] = None
    sums = {f"layers.{i}.mlp#experts.tokens": torch.arange(8) for i in range(4)}
    sums["calibration_tokens"] = torch.tensor(1024)
    return Statistics(maximum=maximum, sums=sums)


def test_one_collective_per_op_and_dtype(session, monkeypatch):
    two_ranks = RankSession(0, 2, session.votes, 30.0, owns_group=False)  # collectives run (on a group of one)
    calls = _counted_all_reduce(monkeypatch)
    out = reduce_statistics(_layer_statistics(), two_ranks)
    assert calls == [(16 + 32 + 1, torch.float32), (32 + 1, torch.int64)]  # not one per tensor (37)
    assert out.maximum["layers.2.k#input"].item() == 2.0 and out.maximum["layers.3.unused#input"] is None
    assert out.sums["layers.1.mlp#experts.tokens"].tolist() == list(range(8))
    assert out.sums["calibration_tokens"].item() == 1024


def test_a_world_of_one_reduces_without_a_collective(session, monkeypatch):
    calls = _counted_all_reduce(monkeypatch)
    stats = _layer_statistics()
    out = reduce_statistics(stats, session)
    assert calls == []  # the identity: NCCL's communicator is never created for one rank
    for name, value in stats.maximum.items():
        assert (out.maximum[name] is None) if value is None else torch.equal(out.maximum[name], value), name
        assert value is None or out.maximum[name] is not value  # new tensors, as with several ranks
    assert all(torch.equal(out.sums[name], value) for name, value in stats.sums.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_nccl_rank_reduces_statistics_on_the_gpu_without_a_host_synchronisation():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpu = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        one_rank = RankSession(0, 1, None, 30.0, owns_group=False)
        stats = _layer_statistics()
        stats.maximum = {name: value.to(gpu) for name, value in stats.maximum.items() if value is not None}
        stats.sums = {name: value.to(gpu) for name, value in stats.sums.items()}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
        try:
            out = reduce_statistics(stats, one_rank)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(torch.equal(out.maximum[name], value) for name, value in stats.maximum.items())
        assert all(torch.equal(out.sums[name], value) for name, value in stats.sums.items())
    finally:
        dist.destroy_process_group()

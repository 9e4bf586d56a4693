"""This process's place in a torch.distributed run: rank, world size, and the votes that keep ranks in step.

A run is distributed when ``torch.distributed`` is already initialised (the caller's process group is used
as it is) or when the process was started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR`` are set); quantport then initialises the process group itself: NCCL when the model is on a
GPU (device ``cuda:LOCAL_RANK``), gloo on the CPU. ``NCCL_*`` variables are left as the environment sets them.

Ranks meet at *votes*: every rank says "ok" (with an optional value) or "failed: message"; all ranks receive
all ballots, so all of them take the same decision. A rank that raises votes "failed" at its next vote (see
:mod:`.agreement`), and every rank then raises the same one-line :class:`~quantport.errors.DistributedRunError`.
Votes run on a gloo group with a timeout (``QUANTPORT_DIST_TIMEOUT_S``, default 3600 s): a rank that died
makes the others fail at once (its connection closes), a rank that hangs makes them fail after the timeout
instead of waiting forever. The timeout must cover the longest time one rank can wait for another at a vote:
the difference in calibration time between ranks, and rank 0 writing the checkpoint while the others wait.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import DistributedRunError, InvalidArgumentError, QuantportError

__all__ = [
    "TIMEOUT_VARIABLE",
    "TORCHRUN_VARIABLES",
    "RankSession",
    "close_session",
    "current_session",
    "joined_session",
    "launched_by_torchrun",
    "rank_device",
    "vote_timeout_s",
]

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
"""Set by ``torchrun`` (and by any launcher that follows its conventions) in every rank's environment."""
TIMEOUT_VARIABLE = "QUANTPORT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3600.0


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its variables are all set)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def vote_timeout_s() -> float:
    """Seconds a rank waits for the others at a vote (``QUANTPORT_DIST_TIMEOUT_S``, default 3600)."""
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidArgumentError(
            f"{TIMEOUT_VARIABLE}={text!r} is not a positive number of seconds; unset it or fix it"
        )
    return value


def rank_device(device: str) -> str:
    """The device a rank uses for ``--device device``: under torchrun, ``auto`` and ``cuda`` mean the rank's own
    GPU ``cuda:LOCAL_RANK`` when there is a GPU; anything else is kept."""
    if launched_by_torchrun() and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


@dataclass(frozen=True, slots=True)
class Ballot:
    """One rank's answer at a vote."""

    rank: int
    ok: bool
    step: str
    message: str = ""
    value: Any = None


@dataclass
class RankSession:
    """This rank in a distributed run.

    Attributes:
        rank: this process's rank (0 writes the checkpoint).
        world_size: the number of ranks.
        votes: the gloo group votes run on (its timeout is ``timeout_s``).
        timeout_s: how long a vote waits for every rank.
        owns_group: whether quantport initialised the default process group (and destroys it at the end).
        failure: the error every rank raised after a failed vote; later votes raise it again.
    """

    rank: int
    world_size: int
    votes: Any
    timeout_s: float
    owns_group: bool
    failure: DistributedRunError | None = None

    @property
    def writes_checkpoint(self) -> bool:
        """Whether this rank writes the checkpoint (rank 0)."""
        return self.rank == 0

    def collective_device(self) -> torch.device:
        """Where tensors of the statistics collectives live: this rank's GPU under NCCL, else the CPU."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree(self, step: str, value: Any = None) -> list[Any]:
        """Vote "ok" at ``step``; returns every rank's ``value`` in rank order, or raises the shared
        :class:`DistributedRunError` when a rank failed or did not answer within the timeout."""
        ballots = self._gather(step, Ballot(self.rank, True, step, value=value))
        failure = self._shared_failure(ballots)
        if failure is not None:
            raise failure
        steps = {ballot.step for ballot in ballots}
        if len(steps) > 1:  # e.g. ranks started with different options: their votes no longer pair up
            where = ", ".join(f"rank {b.rank} at '{b.step}'" for b in ballots)
            self.failure = DistributedRunError(
                f"the ranks are out of step ({where}); start every rank with the same arguments and data"
            )
            raise self.failure
        return [ballot.value for ballot in ballots]

    def fail(self, step: str, error: BaseException) -> DistributedRunError:
        """Vote "failed" at ``step`` with ``error``'s message; returns the error every rank raises."""
        message = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, QuantportError):
            message = f"{type(error).__name__}: {message}"
        try:
            ballots = self._gather(step, Ballot(self.rank, False, step, message))
        except DistributedRunError as unanswered:
            return unanswered
        return self._shared_failure(ballots) or DistributedRunError(message)

    def _gather(self, step: str, ballot: Ballot) -> list[Ballot]:
        if self.failure is not None:
            raise self.failure
        ballots: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(ballots, ballot, group=self.votes)
        except Exception as exc:  # noqa: BLE001  (gloo raises RuntimeError or DistBackendError subclasses)
            reason = " ".join(str(exc).split())[:300]
            self.failure = DistributedRunError(
                f"rank {self.rank} of {self.world_size}: not every rank answered at '{step}' within "
                f"{self.timeout_s:g} s (a rank died or hangs: {reason}); look for the first error in the other "
                f"ranks' output, or raise {TIMEOUT_VARIABLE} if a rank is just slower"
            )
            raise self.failure from exc
        return ballots

    def _shared_failure(self, ballots: list[Ballot]) -> DistributedRunError | None:
        """The error of the lowest failed rank, the same on every rank (None when all are ok): it names the step
        that rank failed in, which is not always the vote the others are at."""
        failed = [b for b in ballots if not b.ok]
        if not failed:
            return None
        first = min(failed, key=lambda b: b.rank)
        self.failure = DistributedRunError(
            f"rank {first.rank} of {self.world_size} failed in {first.step}: {first.message} "
            f"(every rank stopped; nothing was written)"
        )
        return self.failure


_SESSION: RankSession | None = None


def current_session(device: torch.device | str | None = None) -> RankSession | None:
    """This process's :class:`RankSession`, joining the run on the first call; None outside a distributed run.

    ``device``: where the model is (picks NCCL for a GPU, gloo for the CPU) when quantport initialises the
    process group; ignored when ``torch.distributed`` is initialised already.
    """
    global _SESSION
    if _SESSION is not None:
        return _SESSION
    if not dist.is_available():
        return None
    timeout = vote_timeout_s() if (dist.is_initialized() or launched_by_torchrun()) else DEFAULT_TIMEOUT_S
    owns = False
    if not dist.is_initialized():
        if not launched_by_torchrun():
            return None
        device = torch.device(device) if device is not None else torch.device("cpu")
        backend = "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            backend = "nccl"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        owns = True
    votes = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    _SESSION = RankSession(dist.get_rank(), dist.get_world_size(), votes, timeout, owns)
    logger.info(
        "distributed run: rank %d of %d (%s), votes time out after %g s",
        _SESSION.rank,
        _SESSION.world_size,
        dist.get_backend(),
        timeout,
    )
    return _SESSION


def joined_session() -> RankSession | None:
    """The session if this process joined a run already (never joins one)."""
    return _SESSION


def close_session() -> None:
    """Leave the run: the process group is destroyed when quantport created it."""
    global _SESSION
    session, _SESSION = _SESSION, None
    if session is not None and session.owns_group and dist.is_initialized():
        dist.destroy_process_group()

"""Where ranks agree: a failure on one rank stops all of them, rank 0 writes, the rename waits for every rank.

Each function is a no-op (or the plain call) outside a distributed run, so that :func:`quantport.quantize`,
:func:`quantport.export` and the CLI call them unconditionally.

Every rank passes the same votes in the same order: ``quantize`` votes on the automatic batch size (when
asked for), after calibration (before the statistics are reduced) and at its end; ``export`` votes when rank
0 has staged the checkpoint (the others have waited) and once it is renamed into place. A model opened layer by
layer adds votes: after the layer inputs are captured and after each decoder layer (:mod:`.layers`), and three
in ``export``, where every rank writes its share of the shards (:mod:`.shard_writers`). A rank that raises
between two votes casts "failed" in place of the next one (:func:`failures_shared`), so the others learn it
there and all raise the same :class:`~quantport.errors.DistributedRunError`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import DistributedRunError
from .session import close_session, current_session, joined_session

__all__ = [
    "agreed_batch_size",
    "all_ranks_agree",
    "commit_when_all_agree",
    "committed_by_rank_zero",
    "distributed_command",
    "failures_shared",
    "in_distributed_run",
    "progress_here",
    "written_by_rank_zero",
    "writes_checkpoint",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def failures_shared(step: str) -> Iterator[None]:
    """An exception in the body (on this rank) becomes a "failed" vote and the error every rank raises."""
    try:
        yield
    except DistributedRunError:
        raise
    except Exception as exc:
        session = joined_session()
        if session is None:
            raise
        raise session.fail(step, exc) from exc


def _model_device(model: Any) -> torch.device | None:
    if isinstance(model, nn.Module):
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else None
    return None


def all_ranks_agree(function: F) -> F:
    """Decorate ``quantize(model, ...)``: joins the run (from the model's device), shares a failure, and has
    every rank vote at the end, so all ranks leave it with the same outcome."""

    @functools.wraps(function)
    def run(model: Any, *args: Any, **kwargs: Any) -> Any:
        session = current_session(_model_device(model))
        if session is None:
            return function(model, *args, **kwargs)
        with failures_shared(function.__name__):
            result = function(model, *args, **kwargs)
        session.agree(f"{function.__name__} done")
        return result

    return run  # type: ignore[return-value]


def in_distributed_run() -> bool:
    """Whether this process joined a distributed run (it does in :func:`quantport.quantize` under torchrun)."""
    return joined_session() is not None


def writes_checkpoint() -> bool:
    """Whether this process writes the checkpoint: rank 0, or the only process of a plain run."""
    session = current_session()
    return session is None or session.writes_checkpoint


def progress_here(progress: bool) -> bool:
    """Progress bars on rank 0 only (N bars on one terminal are noise)."""
    return progress and writes_checkpoint()


def agreed_batch_size(batch_size: int) -> int:
    """The smallest of the ranks' automatic batch sizes: every rank must cut the same batches."""
    session = current_session()
    if session is None:
        return batch_size
    return min(session.agree("automatic batch size", batch_size))


def _out_path(out_dir: Any) -> Path:
    return Path(getattr(out_dir, "path", out_dir))


def written_by_rank_zero(function: F) -> F:
    """Decorate ``export(model, out_dir, ...)``: rank 0 runs it; the other ranks write nothing, pass the same two
    votes as rank 0 (:func:`commit_when_all_agree`) and return OUT's path. A model opened layer by layer is
    written by every rank, each its share of the shard files (:mod:`.shard_writers`): every rank runs it."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        from .shard_writers import writes_in_shares

        session = current_session()
        if session is None:
            return function(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        if session.writes_checkpoint or writes_in_shares(arguments["model"]):
            with failures_shared(function.__name__):
                return function(*args, **kwargs)
        return committed_by_rank_zero(arguments["out_dir"])

    return run  # type: ignore[return-value]


def committed_by_rank_zero(out_dir: Any) -> Path:
    """On a rank other than 0: the two votes of :func:`commit_when_all_agree` (rank 0 renames OUT into place);
    returns OUT's path."""
    session = current_session()
    if session is not None:
        session.agree("checkpoint staged")
        session.agree("checkpoint renamed")
    return _out_path(out_dir)


def commit_when_all_agree(target: Any) -> Path:
    """``target.commit()`` (an :class:`~quantport.export.OutputTarget`), in a distributed run only once every
    rank voted that it succeeded; the staging directory is removed when one did not."""
    session = current_session()
    if session is None:
        return target.commit()
    try:
        session.agree("checkpoint staged")
    except DistributedRunError:
        target.abort()
        raise
    with failures_shared("checkpoint renamed"):
        path = target.commit()
    session.agree("checkpoint renamed")
    return path


@contextmanager
def distributed_command() -> Iterator[None]:
    """Around a CLI command: a failure on this rank stops every rank; the process group quantport created is
    destroyed at the end."""
    try:
        with failures_shared("quantize command"):
            yield
    finally:
        close_session()

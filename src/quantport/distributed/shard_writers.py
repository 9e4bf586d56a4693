"""Export of a model opened layer by layer under torchrun: every rank writes its share of the shard files.

Every rank holds the same statistics after calibration (:mod:`.layers`), so every rank plans the same
tensors, the same shard files and the same bytes for each; shard ``i`` (in file order) is written by rank
``i % world_size``, each rank reading only the decoder layers of its own shards. The votes, the same on every
rank:

1. ``checkpoint staging``: rank 0 claimed OUT and created the staging directory; it names it, with a token
   it wrote to a marker file there.
2. ``staging directory shared``: each rank says whether it reads that token at that path. When every rank
   does (one node, or several nodes on a shared file system for OUT), each writes its share; when one does
   not, rank 0 writes every shard and the others write nothing (same bytes, no speed-up), with a warning.
3. ``checkpoint shards written``: each rank wrote its shards (a rank that failed stops every rank here;
   rank 0 removes the staging directory only after it); the value tests each rank ran on the bytes it
   wrote (:mod:`quantport.export.value_witness`) are merged for rank 0's self-check.

Rank 0 writes the index, the configs, the report and the tokenizer, runs the self-check on the whole
staging directory, and renames it to OUT once every rank voted ``checkpoint staged``
(:func:`~.agreement.commit_when_all_agree`).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..check.witnessed import WitnessedValues
from .session import current_session

__all__ = ["MARKER", "WriterShare", "shards_written", "staging_shared", "writes_in_shares"]

logger = logging.getLogger(__name__)

MARKER = ".quantport-staging-token"
"""The file rank 0 writes into the staging directory for the other ranks to find (removed before any shard)."""


@dataclass(frozen=True, slots=True)
class WriterShare:
    """This rank's part in writing the shard files: shard ``i`` is written by writer ``i % writers`` (a rank
    whose ``writer`` is not below ``writers`` writes none), into ``staging``."""

    writer: int
    writers: int
    staging: Path | None


def writes_in_shares(model: Any) -> bool:
    """Whether every rank writes a share of ``model``'s checkpoint: a distributed run, and a model opened layer
    by layer (a model loaded whole is written by rank 0 alone)."""
    from ..sequential.attached import layer_store_of

    return current_session() is not None and layer_store_of(model) is not None


def _reads_token(staging: Path, token: str) -> bool:
    try:
        return (staging / MARKER).read_text() == token
    except OSError:
        return False


def staging_shared(staging: Path | None) -> WriterShare:
    """Votes 1 and 2 of the module docstring: the shard files this rank writes, and where.
    ``staging``: rank 0's staging directory (None on the other ranks). Outside a distributed run: every
    shard, into ``staging``."""
    session = current_session()
    if session is None:
        return WriterShare(0, 1, staging)
    offer = None
    if staging is not None:
        token = secrets.token_hex(16)
        (staging / MARKER).write_text(token)
        offer = (str(staging), token)
    named, token = session.agree("checkpoint staging", offer)[0]
    path = Path(named)
    seen = session.agree("staging directory shared", _reads_token(path, token))
    if staging is not None:
        (staging / MARKER).unlink()
    if all(seen):
        logger.info("rank %d writes shard files %d + k * %d", session.rank, session.rank, session.world_size)
        return WriterShare(session.rank, session.world_size, path)
    if staging is not None:
        blind = [str(rank) for rank, ok in enumerate(seen) if not ok]
        logger.warning(
            "rank(s) %s do not see the staging directory %s (another node, no shared file system): rank 0 "
            "writes every shard; put OUT on a file system every node mounts to share the writing",
            ", ".join(blind),
            path,
        )
    return WriterShare(session.rank, 1, path)


def _merged(parts: list[WitnessedValues | None]) -> WitnessedValues:
    clean: set[str] = set()
    scalars: dict[str, float] = {}
    for part in parts:
        if part is not None:
            clean |= part.clean
            scalars.update(part.scalars)
    return WitnessedValues(frozenset(clean), scalars)


def shards_written(witnessed: WitnessedValues | None) -> WitnessedValues | None:
    """Vote 3 of the module docstring: every rank wrote its shards; the value tests of every rank, merged
    (``witnessed`` itself outside a distributed run)."""
    session = current_session()
    if session is None:
        return witnessed
    return _merged(session.agree("checkpoint shards written", witnessed))

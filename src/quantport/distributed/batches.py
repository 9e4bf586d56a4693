"""Each rank's share of the calibration batches: batch ``i`` goes to rank ``i % world_size``.

Every rank builds the same batches (same data, same tokenizer, same batch size: the automatic one is agreed
first) and keeps its share; the shares are disjoint and their union is exactly the single-process set, each
batch unchanged (same sequences, same padding), so each batch's forward computes the same activations as in
one process. A source without a length is walked in full on every rank (tokenizing is cheap next to the
forward).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import CalibrationDataError
from .session import current_session

__all__ = ["RankShare", "rank_share"]


class RankShare:
    """The batches of ``source`` whose index is ``rank`` modulo ``world_size``; ``len()`` when the source has one.

    Iterating raises :class:`CalibrationDataError` when the whole source is empty (the same on every rank), and
    an empty share of a non-empty source is not an error (three ranks, two batches)."""

    def __init__(self, source: Iterable[Any], rank: int, world_size: int) -> None:
        self.source = source
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        total = len(self.source)  # type: ignore[arg-type]  (TypeError without one, as for any iterable)
        return max(0, (total - self.rank + self.world_size - 1) // self.world_size)

    def __iter__(self) -> Iterator[Any]:
        seen = 0
        for index, batch in enumerate(self.source):
            seen += 1
            if index % self.world_size == self.rank:
                yield batch
        if seen == 0:
            raise CalibrationDataError("calibration data is empty")


def rank_share(batches: Iterable[Any]) -> Iterable[Any]:
    """This rank's share of ``batches`` in a distributed run; ``batches`` unchanged otherwise."""
    session = current_session()
    if session is None:
        return batches
    share = RankShare(batches, session.rank, session.world_size)
    if not hasattr(batches, "__len__"):
        return iter(share)  # no len(): run_calibration must not ask for one
    return share

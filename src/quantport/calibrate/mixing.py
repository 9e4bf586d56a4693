"""Calibration sequences from one or more data sets, mixed by weight and shuffled by a seed.

Each source gets ``samples_per_source`` of the sequences. Its rows, drawn through a shuffle buffer, are
turned into token ids (:mod:`.documents`) and packed end to end, each document with the special tokens
it has when served; the packed ids are cut into sequences of ``seq_len`` (a document may run on into the
next sequence). Rows are read only until the source's sequences are full. The sequences of all sources
are then shuffled together, so every batch mixes the sources.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..calibration_sources import CalibrationData, CalibrationSource
from ..errors import CalibrationDataError
from .dataset_rows import open_rows, shuffled
from .documents import RowField, choose_field, document_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["dataset_batches", "samples_per_source", "source_rng"]

logger = logging.getLogger(__name__)


def samples_per_source(weights: Sequence[float], samples: int) -> list[int]:
    """Split ``samples`` in proportion to ``weights`` (largest remainder; ties go to the earlier source).

    >>> samples_per_source([0.7, 0.3], 10)
    [7, 3]
    >>> samples_per_source([1, 1, 1], 4)
    [2, 1, 1]
    """
    total = math.fsum(weights)
    exact = [samples * w / total for w in weights]
    counts = [math.floor(e + 1e-9) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: samples - sum(counts)]:
        counts[i] += 1
    return counts


def source_rng(seed: int, index: int) -> random.Random:
    """The random generator of the ``index``-th source: its own stream, the same for the same seed."""
    return random.Random(f"quantport-calibration/{seed}/{index}")


def _source_ids(
    tokenizer: PreTrainedTokenizerBase, source: CalibrationSource, rng: random.Random, needed: int, buffer: int
) -> list[int]:
    """At least ``needed`` token ids from the source's rows, or a :class:`CalibrationDataError` that says
    how many it had."""
    ids: list[int] = []
    field: RowField | None = None
    rows_read = 0
    where = f"a row of calibration data set {source.name}"
    rows = shuffled(open_rows(source, rng), rng, buffer)
    try:
        for row in rows:
            rows_read += 1
            if field is None:
                field = choose_field(row, source, tokenizer)
            ids += document_ids(tokenizer, row, field, where)
            if len(ids) >= needed:
                break
    finally:
        rows.close()
    split = f"split {source.split!r}"
    if rows_read == 0:
        raise CalibrationDataError(f"calibration data set {source.name} ({split}) is empty: it has no rows")
    if len(ids) < needed:
        raise CalibrationDataError(
            f"calibration data set {source.name} ({split}) has {len(ids)} tokens in {rows_read} rows, fewer than "
            f"the {needed} its sequences need; give more data or lower --calib-samples / --calib-seq-len"
        )
    logger.info("calibration: %d rows of %s read for %d tokens", rows_read, source.name, needed)
    return ids


def dataset_batches(
    tokenizer: PreTrainedTokenizerBase,
    data: CalibrationData,
    *,
    samples: int = 64,
    seq_len: int = 512,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """``samples`` sequences of ``seq_len`` token ids from ``data``'s sources, in batches.

    Returns:
        A list of int64 tensors ``[B, seq_len]`` with ``B <= batch_size``, ``samples`` sequences in all.
    """
    if samples < 1 or seq_len < 1 or batch_size < 1:
        raise CalibrationDataError("calibration samples, sequence length and batch size must be positive")
    counts = samples_per_source([s.weight for s in data.sources], samples)
    sequences: list[torch.Tensor] = []
    for index, (source, count) in enumerate(zip(data.sources, counts, strict=True)):
        if count == 0:
            logger.warning("calibration: %s gets no sequence of the %d (its weight is too small)", source.name, samples)
            continue
        rng = source_rng(data.seed, index)
        ids = _source_ids(tokenizer, source, rng, count * seq_len, data.shuffle_buffer)
        sequences += torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len).unbind(0)
    order = list(range(len(sequences)))
    random.Random(data.seed).shuffle(order)
    tokens = torch.stack([sequences[i] for i in order])
    return list(tokens.split(batch_size))

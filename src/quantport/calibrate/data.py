"""Calibration batches: token ids from the bundled English text or a user's text file."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from ..errors import CalibrationDataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["CHARS_PER_TOKEN", "bundled_calibration_text", "calibration_batches"]

CHARS_PER_TOKEN = 8
"""Characters read per token still needed: twice what English text takes with common tokenizers, so one
read is enough; the next read doubles when it is not (code, other scripts)."""


def bundled_calibration_text() -> str:
    """The bundled sample of English Wikipedia text (CC BY-SA 4.0, see data/SOURCES.md)."""
    return resources.files("quantport.data").joinpath("calibration_en.txt").read_text(encoding="utf-8")


def _cut(text: str) -> int:
    """Where to end a chunk so that no word is split between two tokenizer calls: at its last whitespace,
    which starts the next chunk (tokenizers attach a word's leading space to the word)."""
    cut = max(text.rfind("\n"), text.rfind(" "))
    return cut if cut > 0 else len(text)


def _read_tokens(tokenizer: PreTrainedTokenizerBase, source: TextIO, needed: int, name: str) -> list[int]:
    """Token ids from ``source`` until ``needed`` are read or the text ends: read in growing chunks and
    tokenized chunk by chunk, so a large file costs what calibration uses, not its size."""
    ids: list[int] = []
    carry = ""
    chunk = max(needed * CHARS_PER_TOKEN, 4096)
    while len(ids) < needed:
        try:
            text = source.read(chunk)
        except UnicodeDecodeError as exc:
            raise CalibrationDataError(
                f"{name} is not UTF-8 text ({exc.reason}); convert it to UTF-8 or give another file"
            ) from None
        if "\x00" in text:
            raise CalibrationDataError(f"{name} is a binary file (it holds NUL bytes); give a UTF-8 text file")
        ended = not text
        text = carry + text
        cut = len(text) if ended else _cut(text)
        piece, carry = text[:cut], text[cut:]
        if piece:
            encoded = tokenizer(piece, add_special_tokens=False, return_attention_mask=False, verbose=False)
            ids += encoded["input_ids"]
        if ended:
            break
        chunk *= 2
    return ids


@contextmanager
def _text_source(text: str | None, text_path: str | Path | None) -> Iterator[tuple[TextIO, str]]:
    if text is not None:
        yield io.StringIO(text), "calibration text"
    elif text_path is None:
        yield io.StringIO(bundled_calibration_text()), "the bundled calibration text"
    else:
        path = Path(text_path)
        if path.is_dir():
            raise CalibrationDataError(f"calibration text {path} is a directory; give a UTF-8 text file")
        if not path.is_file():
            raise CalibrationDataError(f"calibration text file not found: {path}")
        try:
            handle = path.open(encoding="utf-8", errors="strict")
        except OSError as exc:
            raise CalibrationDataError(f"calibration text {path} cannot be read ({exc.strerror})") from None
        with handle:
            yield handle, f"calibration text {path}"


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    *,
    text: str | None = None,
    text_path: str | Path | None = None,
    samples: int = 64,
    seq_len: int = 512,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Tokenize the text and cut it into ``samples`` sequences of ``seq_len`` tokens.

    Only the start of the text that gives ``samples * seq_len`` tokens is read and tokenized.

    Returns:
        A list of int64 tensors ``[B, seq_len]`` with ``B <= batch_size``. When the text is shorter
        than ``samples * seq_len`` tokens, fewer samples are returned (at least one).
    """
    if samples < 1 or seq_len < 1 or batch_size < 1:
        raise CalibrationDataError("calibration samples, sequence length and batch size must be positive")
    with _text_source(text, text_path) as (source, name):
        ids = _read_tokens(tokenizer, source, samples * seq_len, name)
    if len(ids) < seq_len:
        raise CalibrationDataError(
            f"{name} has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
            "give a longer --calib-text or a smaller --calib-seq-len"
        )
    n = min(samples, len(ids) // seq_len)
    tokens = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return list(tokens.split(batch_size))

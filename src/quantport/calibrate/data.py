"""Calibration batches: token ids from the bundled English text or a user's text file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CalibrationDataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["bundled_calibration_text", "calibration_batches"]


def bundled_calibration_text() -> str:
    """The bundled sample of English Wikipedia text (CC BY-SA 4.0, see data/SOURCES.md)."""
    return resources.files("quantport.data").joinpath("calibration_en.txt").read_text(encoding="utf-8")


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

    Returns:
        A list of int64 tensors ``[B, seq_len]`` with ``B <= batch_size``. When the text is shorter
        than ``samples * seq_len`` tokens, fewer samples are returned (at least one).
    """
    if samples < 1 or seq_len < 1 or batch_size < 1:
        raise CalibrationDataError("calibration samples, sequence length and batch size must be positive")
    if text is None:
        if text_path is not None:
            path = Path(text_path)
            if not path.is_file():
                raise CalibrationDataError(f"calibration text file not found: {path}")
            text = path.read_text(encoding="utf-8", errors="replace")
        else:
            text = bundled_calibration_text()
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if len(ids) < seq_len:
        raise CalibrationDataError(
            f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
            "give a longer --calib-text or a smaller --calib-seq-len"
        )
    n = min(samples, len(ids) // seq_len)
    tokens = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return list(tokens.split(batch_size))

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from quantport.calibrate import bundled_calibration_text, calibration_batches
from quantport.errors import CalibrationDataError
from quantport.loading import resolve_model_dir


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_dir("bundled:tiny-llama"))


def test_bundled_text_is_real_english():
    text = bundled_calibration_text()
    assert text.startswith("Anarchism") and len(text) > 200_000


def test_batches_shape(tokenizer):
    batches = calibration_batches(tokenizer, samples=10, seq_len=64, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 64), (4, 64), (2, 64)]
    assert batches[0].dtype == torch.long


def test_user_text_file(tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    batches = calibration_batches(tokenizer, text_path=path, samples=100, seq_len=32)
    assert sum(b.shape[0] for b in batches) >= 1


def test_short_text_and_missing_file(tokenizer, tmp_path):
    with pytest.raises(CalibrationDataError, match="fewer than one sequence"):
        calibration_batches(tokenizer, text="too short", seq_len=512)
    with pytest.raises(CalibrationDataError, match="not found"):
        calibration_batches(tokenizer, text_path=tmp_path / "nope.txt")

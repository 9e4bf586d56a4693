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


def test_large_file_is_read_only_as_far_as_calibration_needs(tokenizer, tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 400_000)  # 18 MB
    tokenized = []

    def counting(text, **kwargs):
        tokenized.append(len(text))
        return tokenizer(text, **kwargs)

    batches = calibration_batches(counting, text_path=path, samples=4, seq_len=64)
    assert sum(b.shape[0] for b in batches) == 4
    assert sum(tokenized) < 20_000, f"tokenized {sum(tokenized)} characters for 256 tokens"


def test_chunked_tokenization_equals_whole_text(tokenizer, monkeypatch):
    import quantport.calibrate.data as data

    text = bundled_calibration_text()
    whole = tokenizer(text[:200_000], add_special_tokens=False, verbose=False)["input_ids"]
    monkeypatch.setattr(data, "CHARS_PER_TOKEN", 1)  # many small chunks
    batches = calibration_batches(tokenizer, text=text, samples=40, seq_len=512, batch_size=64)
    ids = torch.cat(batches).flatten().tolist()
    assert ids == whole[: len(ids)] and len(ids) == 40 * 512


def test_text_file_errors(tokenizer, tmp_path):
    with pytest.raises(CalibrationDataError, match="is a directory"):
        calibration_batches(tokenizer, text_path=tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(CalibrationDataError, match="not UTF-8"):
        calibration_batches(tokenizer, text_path=tmp_path / "latin1.txt", seq_len=8)
    (tmp_path / "binary.bin").write_bytes(b"ab\x00cd" * 100)
    with pytest.raises(CalibrationDataError, match="binary"):
        calibration_batches(tokenizer, text_path=tmp_path / "binary.bin", seq_len=8)

"""The batch tests of scale values agree with the per-tensor test, code by code, and the scale rule
reports the same findings whether it reads its tensors in batches or one at a time."""

from __future__ import annotations

import os

import pytest
import torch

import quantport.check.rules.scales as scales_rule
import quantport.check.scalars as scalars_module
from quantport.check import check_checkpoint
from quantport.check.checkpoint import Checkpoint
from quantport.check.rules.scale_values import e4m3_bytes_clean, e8m0_bytes_clean, floats_clean
from quantport.read import HeaderError

CODES = torch.arange(256, dtype=torch.uint8)


def test_every_e4m3_code_is_clean_exactly_when_it_is_finite_and_not_negative():
    values = CODES.view(torch.float8_e4m3fn).to(torch.float32)  # decoded by torch, not by the byte rule
    for code, value in zip(CODES, values, strict=True):
        expected = bool(value.isfinite()) and not bool(value < 0)
        assert e4m3_bytes_clean(code.reshape(1)) == expected, hex(int(code))
    assert not e4m3_bytes_clean(CODES)
    assert e4m3_bytes_clean(torch.tensor([0x00, 0x7E, 0x80, 0x38], dtype=torch.uint8))  # -0 (0x80) is clean


def test_every_e8m0_code_is_clean_except_255():
    for code in CODES:
        assert e8m0_bytes_clean(code.reshape(1)) == (int(code) != 255)
    assert e8m0_bytes_clean(torch.empty(0, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("values", "clean"),
    [
        ([1.0, 0.0, -0.0, 3.0], True),
        ([1.0, -1e-3], False),
        ([1.0, float("nan")], False),
        ([float("inf"), 1.0], False),
        ([-float("inf"), 1.0], False),
        ([], True),
    ],
)
def test_floats_are_clean_when_finite_and_not_negative(dtype, values, clean):
    assert floats_clean(torch.tensor(values, dtype=dtype)) == clean


def _one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every batch read fail, so the rules read each tensor alone (the path before batching)."""

    def refuse(ckpt, infos, pool=None):
        raise HeaderError("batch reads disabled for the test")

    monkeypatch.setattr(scales_rule, "read_batch", refuse)
    monkeypatch.setattr(scalars_module, "read_batch", refuse)


def _findings(path) -> list[tuple[str, str, str]]:
    return [(f.rule, f.target, f.message) for f in check_checkpoint(path).findings]


def _corrupt_scales(e) -> None:
    names = e.names()
    blocks = [n for n in names if n.endswith(".weight_scale") and e.get(n).numel() > 1]
    scalars = [n for n in names if n.endswith((".input_scale", ".weight_scale_2"))]
    e.update(blocks[0], lambda t: _set_byte(t, 0, 0x7F))  # NaN
    e.update(blocks[-1], lambda t: _set_byte(t, 3, 0xB8))  # -1.0
    e.update(scalars[1], lambda t: t * 0)


def _set_byte(tensor: torch.Tensor, index: int, code: int) -> torch.Tensor:
    raw = tensor.view(torch.uint8).clone()
    raw.view(-1)[index] = code
    return raw.view(tensor.dtype)


def test_batched_and_single_reads_report_the_same_findings(quantport_ckpt, edit, monkeypatch):
    e = edit(quantport_ckpt("qwen3", "nvfp4"))
    _corrupt_scales(e)
    batched = _findings(e.path)
    rules = [rule for rule, _, _ in batched]
    assert rules.count("scale.not-finite") == 1 and rules.count("scale.not-positive") == 2
    _one_at_a_time(monkeypatch)
    assert _findings(e.path) == batched


def test_a_shard_cut_after_its_header_was_read_ends_in_the_same_finding(quantport_ckpt, edit, monkeypatch):
    e = edit(quantport_ckpt("qwen3", "nvfp4"))
    opened = Checkpoint.open

    def open_then_cut(path):
        ckpt = opened(path)
        for file in ckpt.files:
            os.truncate(ckpt.path / file, ckpt.data_starts[file] + 100)
        return ckpt

    monkeypatch.setattr(Checkpoint, "open", open_then_cut)
    batched = _findings(e.path)
    assert "shards.unreadable" in {rule for rule, _, _ in batched}
    assert any("the file ends inside it" in message for _, _, message in batched)
    e_single = edit(quantport_ckpt("qwen3", "nvfp4"))
    _one_at_a_time(monkeypatch)
    single = _findings(e_single.path)
    assert [(r, m.replace(str(e_single.path), "")) for r, _, m in single] == [
        (r, m.replace(str(e.path), "")) for r, _, m in batched
    ]

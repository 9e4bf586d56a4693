"""Host memory returned after each layer, oneDNN's caches capped (issue 12: flat host memory layer by layer)."""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

import pytest

import quantport
from moe_models import VOCAB, tiny_moe
from quantport.sequential import calibrate, host_memory, open_layer_by_layer, streaming
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=VOCAB, n=2, batch=2, seq=16)


def test_release_freed_memory_trims_where_glibc_has_it() -> None:
    glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    assert host_memory.release_freed_memory() is glibc
    assert host_memory.release_freed_memory() is glibc  # called again: harmless


def test_release_freed_memory_is_a_no_op_without_malloc_trim(monkeypatch) -> None:
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
    assert host_memory.release_freed_memory() is False


def test_malloc_trim_missing_from_the_c_library_is_none(monkeypatch) -> None:
    host_memory._malloc_trim.cache_clear()
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    try:
        assert host_memory._malloc_trim() is None
    finally:
        host_memory._malloc_trim.cache_clear()


def test_onednn_caches_capped_unless_the_user_set_a_capacity(monkeypatch) -> None:
    primitive, ideep = host_memory.ONEDNN_CACHE_VARIABLES
    monkeypatch.delenv(primitive, raising=False)
    monkeypatch.setenv(ideep, "512")
    assert host_memory.bound_onednn_caches(32) == {primitive: "32"}
    assert os.environ[primitive] == "32" and os.environ[ideep] == "512"
    assert host_memory.bound_onednn_caches(16) == {}  # set once: the later call changes nothing
    assert os.environ[primitive] == "32"


def test_onednn_cache_capacity_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        host_memory.bound_onednn_caches(0)


def test_layer_loops_release_memory_after_every_layer(tmp_path: Path, monkeypatch) -> None:
    model = tiny_moe("qwen3_moe")
    layers = model.config.num_hidden_layers
    assert layers >= 2
    model.save_pretrained(tmp_path / "model")
    calls: list[str] = []
    monkeypatch.setattr(calibrate, "release_freed_memory", lambda: calls.append("calibrate") or True)
    monkeypatch.setattr(streaming, "release_freed_memory", lambda: calls.append("export") or True)
    monkeypatch.setattr(calibrate, "bound_onednn_caches", lambda: calls.append("bound") or {})
    sequential = open_layer_by_layer(tmp_path / "model")
    quantport.quantize(sequential, "nvfp4", BATCHES, progress=False)
    assert calls == ["bound"] + ["calibrate"] * layers
    quantport.export(sequential, tmp_path / "out", progress=False)
    assert calls[1 + layers :] == ["export"] * layers

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


_SHAPES_CHILD = """
import sys
import torch
from quantport.sequential.host_memory import bound_onednn_caches, release_freed_memory
if sys.argv[1] == "capped":
    bound_onednn_caches()
def rss():
    release_freed_memory()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1])
weight = torch.randn(256, 256, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(3, 256, dtype=torch.bfloat16), weight)
before = rss()
for rows in range(1, 400):  # a new shape each time, as an MoE layer's experts see
    torch.nn.functional.linear(torch.randn(rows, 256, dtype=torch.bfloat16), weight)
print((rss() - before) * 4096)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_capped_onednn_caches_do_not_grow_with_new_shapes(tmp_path: Path) -> None:
    """The bug: every new bf16 product shape kept a compiled oneDNN primitive, up to 2 x 1,024 of them."""
    import subprocess

    grown = {}
    for run in ("default", "capped"):
        env = {k: v for k, v in os.environ.items() if k not in host_memory.ONEDNN_CACHE_VARIABLES}
        env["PYTHONPATH"] = os.pathsep.join(sys.path)
        done = subprocess.run(
            [sys.executable, "-c", _SHAPES_CHILD, run], env=env, capture_output=True, text=True, check=True
        )
        grown[run] = int(done.stdout.split()[-1])
    if grown["default"] < 32 * 2**20:
        pytest.skip(f"bf16 products do not go through oneDNN's caches here (grew {grown['default']} bytes)")
    assert grown["capped"] < grown["default"] / 4

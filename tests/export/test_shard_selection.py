"""Several processes writing one plan's shard files between them (layer by layer under torchrun) write the
files one process writes: shard ``i`` by writer ``i % writers``, the index by writer 0, and only the tensors
of its own shards computed (and passed to ``wrap``) by each."""

from __future__ import annotations

from pathlib import Path

import torch

from quantport.export.shards import PlannedTensor, ShardSelection, write_sharded_safetensors
from quantport.schemes import TensorSpec

TENSORS = {f"layers.{i}.weight": torch.full((4, 4), float(i), dtype=torch.bfloat16) for i in range(7)}
INDEX = "model.safetensors.index.json"


def _plan(computed: list[str]) -> list[PlannedTensor]:
    def compute(name: str) -> torch.Tensor:
        computed.append(name)
        return TENSORS[name]

    return [PlannedTensor(n, TensorSpec(t.dtype, tuple(t.shape)), lambda n=n: compute(n)) for n, t in TENSORS.items()]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_selection_writes_shard_i_on_writer_i_mod_writers():
    selections = [ShardSelection(w, 3) for w in range(3)]
    assert [[i for i in range(7) if s.writes(i)] for s in selections] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [s.writes_index for s in selections] == [True, False, False]
    assert ShardSelection(1, 1).writes(0) is False  # a rank that writes nothing (staging not shared)
    assert all(ShardSelection().writes(i) for i in range(7))


def test_writers_together_write_the_bytes_of_one(tmp_path: Path):
    computed: list[str] = []
    (tmp_path / "one").mkdir()
    files = write_sharded_safetensors(_plan(computed), tmp_path / "one", max_shard_size=64, progress=False)
    assert len(files) == 4  # two 32-byte tensors per shard
    (tmp_path / "split").mkdir()
    wrapped: list[list[str]] = []
    per_writer: list[list[str]] = []
    for writer in range(3):
        computed.clear()

        def wrap(entries: list[PlannedTensor]) -> list[PlannedTensor]:
            wrapped.append([e.name for e in entries])
            return entries

        selection = ShardSelection(writer, 3)
        names = write_sharded_safetensors(
            _plan(computed), tmp_path / "split", max_shard_size=64, progress=False, selection=selection, wrap=wrap
        )
        assert names == files
        per_writer.append(sorted(computed))
    assert _files(tmp_path / "split") == _files(tmp_path / "one")
    assert INDEX in _files(tmp_path / "one")
    assert per_writer == [
        ["layers.0.weight", "layers.1.weight", "layers.6.weight"],
        ["layers.2.weight", "layers.3.weight"],
        ["layers.4.weight", "layers.5.weight"],
    ]
    assert [sorted(names) for names in wrapped] == per_writer  # wrap sees only what this writer computes


def test_a_writer_without_shards_writes_nothing(tmp_path: Path):
    computed: list[str] = []
    write_sharded_safetensors(_plan(computed), tmp_path, progress=False, selection=ShardSelection(1, 2))
    assert computed == [] and list(tmp_path.iterdir()) == []

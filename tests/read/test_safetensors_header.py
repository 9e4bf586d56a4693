"""The validated safetensors header reader: what safetensors accepts passes, everything else is refused."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantport.errors import QuantportError
from quantport.read import (
    MAX_HEADER_BYTES,
    HeaderError,
    JSONFileError,
    model_field_problems,
    read_header,
    read_json_object,
    read_safetensors_header,
)


def _write(path: Path, header: dict | str | bytes, data: bytes = b"") -> Path:
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header))
    blob = text if isinstance(text, bytes) else text.encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_a_file_written_by_safetensors_reads_back(tmp_path):
    tensors = {
        "a": torch.zeros(3, 4, dtype=torch.bfloat16),
        "b": torch.ones(2, dtype=torch.float32),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(1.0),
    }
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "m.safetensors")
    assert header.metadata == {"format": "pt"}
    assert {n: (i.dtype, i.shape) for n, i in header.tensors.items()} == {
        "a": ("BF16", (3, 4)),
        "b": ("F32", (2,)),
        "empty": ("F32", (0, 5)),
        "scalar": ("F32", ()),
    }
    assert header.data_bytes == 24 + 8 + 0 + 4
    assert read_header(tmp_path / "m.safetensors")["a"].nbytes == 24


GOOD = {"x": _entry("F32", [2], 0, 8), "y": _entry("BF16", [2, 2], 8, 16)}
DATA = b"\0" * 16


def _with(name: str, **changes) -> dict:
    header = json.loads(json.dumps(GOOD))
    header[name].update(changes)
    return header


BAD_HEADERS = [
    ("string offsets", _with("x", data_offsets=["0", "8"]), "not two non-negative integers"),
    ("float offsets", _with("x", data_offsets=[0.0, 8.0]), "not two non-negative integers"),
    ("bool offsets", _with("x", data_offsets=[False, 8]), "not two non-negative integers"),
    ("negative offsets", _with("x", data_offsets=[-8, 0]), "not two non-negative integers"),
    ("three offsets", _with("x", data_offsets=[0, 4, 8]), "not two non-negative integers"),
    ("begin after end", _with("x", data_offsets=[8, 0]), "begin is after end"),
    ("overlap", _with("y", data_offsets=[4, 12]), "overlaps 'x'"),
    (
        "alias",
        {"x": _entry("F32", [2], 0, 8), "y": _entry("F32", [2], 0, 8), "z": _entry("F32", [2], 8, 16)},
        "aliases",
    ),
    ("gap", {"x": _entry("F32", [1], 0, 4), "y": _entry("F32", [2], 8, 16)}, "belong to no tensor"),
    ("size mismatch", _with("y", shape=[3]), "needs 6"),
    ("unknown dtype", _with("x", dtype="F128"), "unknown dtype"),
    ("dtype not a string", _with("x", dtype=5), "unknown dtype"),
    ("shape strings", _with("x", shape=["2"]), "not a list of non-negative integers"),
    ("shape negative", _with("x", shape=[-2]), "not a list of non-negative integers"),
    ("shape overflow", _with("x", shape=[2**40, 2**40]), "overflows 64 bits"),
    ("entry not an object", {**GOOD, "z": 5}, "not an object with dtype"),
    ("missing key", {**GOOD, "z": {"dtype": "F32", "shape": []}}, "not an object with dtype"),
    ("metadata a list", {**GOOD, "__metadata__": [1]}, "__metadata__ must be an object"),
    ("metadata numbers", {**GOOD, "__metadata__": {"a": 1}}, "__metadata__ must be an object"),
    ("trailing data", {"x": _entry("F32", [2], 0, 8)}, "8 bytes after the last tensor"),
    ("not an object", "[1]", "does not start with"),
    ("not json", "{nope", "not valid JSON"),
    ("nan", json.dumps(GOOD).replace("[0, 8]", "[NaN, 8]"), "not valid JSON"),
    ("duplicate key", json.dumps(GOOD)[:-1] + ', "x": ' + json.dumps(GOOD["x"]) + "}", "duplicate key 'x'"),
    ("deep nesting", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("not utf-8", b'{"\xff": 1}', "not valid UTF-8"),
    ("empty", "", "does not start with"),
]


@pytest.mark.parametrize(("header", "match"), [pytest.param(h, m, id=i) for i, h, m in BAD_HEADERS])
def test_bad_headers_are_refused(tmp_path, header, match):
    path = _write(tmp_path / "m.safetensors", header, DATA)
    with pytest.raises(HeaderError, match=match) as info:
        read_header(path)
    assert isinstance(info.value, QuantportError) and info.value.path == path
    assert not info.value.truncated


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "fewer than the 8-byte"),
        (b"\x08\0\0", "fewer than the 8-byte"),
        ((64).to_bytes(8, "little") + b"{}", "header declares 64 bytes"),
    ],
)
def test_short_files_are_truncated(tmp_path, raw, match):
    (tmp_path / "m.safetensors").write_bytes(raw)
    with pytest.raises(HeaderError, match=match) as info:
        read_header(tmp_path / "m.safetensors")
    assert info.value.truncated


def test_a_cut_data_section_is_truncated(tmp_path):
    path = _write(tmp_path / "m.safetensors", GOOD, DATA[:-4])
    with pytest.raises(HeaderError, match="has only 12 bytes") as info:
        read_header(path)
    assert info.value.truncated


def test_a_3gb_header_in_a_sparse_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes((3_000_000_000).to_bytes(8, "little") + b"{")
    os.truncate(path, 3_000_000_100)
    with pytest.raises(HeaderError, match=f"exceeds the {MAX_HEADER_BYTES}-byte limit"):
        read_header(path)


def _returns_quickly(fn) -> BaseException | None:
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome, "blocked"
    return outcome[0]


def test_non_regular_files_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    for name, match in (("fifo", "FIFO"), ("dir", "a directory"), ("loop", "symbolic links")):
        exc = _returns_quickly(lambda n=name: read_header(tmp_path / f"{n}.safetensors"))
        assert isinstance(exc, HeaderError) and match in str(exc), exc
    exc = _returns_quickly(lambda: read_json_object(tmp_path / "fifo.safetensors"))
    assert isinstance(exc, JSONFileError) and "FIFO" in str(exc)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1, 2]", "a JSON array, not an object"),
        ('"x"', "a JSON string, not an object"),
        ("{broken", "not valid JSON"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ],
)
def test_json_files(tmp_path, text, match):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(JSONFileError, match=match) as info:
        read_json_object(tmp_path / "config.json")
    assert info.value.located().startswith(str(tmp_path / "config.json"))


def test_json_file_size_cap(tmp_path):
    (tmp_path / "config.json").write_text('{"a": "' + "x" * 100 + '"}')
    with pytest.raises(JSONFileError, match="more than the 50-byte limit"):
        read_json_object(tmp_path / "config.json", max_bytes=50)


def test_model_field_problems():
    config = {
        "hidden_size": "abc",
        "num_hidden_layers": -1,
        "vocab_size": None,
        "intermediate_size": True,
        "num_attention_heads": 4,
        "num_key_value_heads": None,
        "head_dim": 2.5,
        "num_experts": 0,
        "text_config": {"hidden_size": 0},
    }
    problems = {p.key: p.expected for p in model_field_problems(config)}
    assert problems == {
        "hidden_size": "a positive integer",
        "num_hidden_layers": "a positive integer",
        "vocab_size": "a positive integer",
        "intermediate_size": "a positive integer",
        "head_dim": "a non-negative integer or null",
        "text_config.hidden_size": "a positive integer",
    }
    assert model_field_problems({"hidden_size": 64}) == [] and model_field_problems(None) == []


# -- the fast path: entries validated once per (dtype, shape), duplicates found by counting keys -------------
def _many(count: int) -> dict:
    return {f"t{i}": _entry("F32", [2, 2], 16 * i, 16 * (i + 1)) for i in range(count)}


REPEATED_SHAPE_BAD = [
    ("float dims equal to a validated shape", {"t1": {"shape": [2.0, 2.0]}}, "not a list of non-negative integers"),
    ("bool dims", {"t1": {"shape": [True, 4]}}, "not a list of non-negative integers"),
    ("bool offset", {"t1": {"data_offsets": [16, True]}}, "not two non-negative integers"),
    ("float offsets", {"t1": {"data_offsets": [16.0, 32]}}, "not two non-negative integers"),
    ("short range", {"t1": {"data_offsets": [16, 28]}}, "occupies 12 bytes"),
    ("missing key", {"t1": {"dtype": None}}, "unknown dtype"),
    ("unhashable dtype", {"t1": {"dtype": ["F32"]}}, "unknown dtype"),
    ("unhashable dims", {"t1": {"shape": [[2], 2]}}, "not a list of non-negative integers"),
]


@pytest.mark.parametrize(("changes", "match"), [pytest.param(c, m, id=i) for i, c, m in REPEATED_SHAPE_BAD])
def test_an_entry_like_a_validated_one_is_still_validated(tmp_path, changes, match):
    header = _many(3)
    for name, fields in changes.items():
        header[name].update(fields)
    with pytest.raises(HeaderError, match=match):
        read_header(_write(tmp_path / "m.safetensors", header, b"\0" * 48))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"a": {"dtype": "F32", "dtype": "U8", "shape": [1], "data_offsets": [0, 4]}}', "duplicate key 'dtype'"),
        ('{"__metadata__": {"k": "1", "k": "2"}, "a": ' + json.dumps(_entry("F32", [1], 0, 4)) + "}", "duplicate key"),
        (
            '{"a": ' + json.dumps(_entry("F32", [1], 0, 4)) + ' , "a"   :' + json.dumps(_entry("F32", [1], 0, 4)) + "}",
            "duplicate key 'a'",
        ),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": {"y": 1, "y": 2}}}', "duplicate key 'y'"),
    ],
)
def test_duplicate_keys_are_refused_at_any_depth(tmp_path, text, match):
    with pytest.raises(HeaderError, match=match):
        read_header(_write(tmp_path / "m.safetensors", text, b"\0" * 4))


@pytest.mark.parametrize(
    "text",
    [
        '{ "a" :\n {"dtype":"F32","shape":[1],"data_offsets":[0,4]} }',  # whitespace around the colon
        '{"__metadata__": {"note": "a\\":b", "x": "\\":"}, "a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        '{"a\\"b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": {"k": [1]}}}',
    ],
)
def test_headers_the_key_count_cannot_settle_still_read(tmp_path, text):
    header = read_safetensors_header(_write(tmp_path / "m.safetensors", text, b"\0" * 4))
    assert [(i.dtype, i.shape, i.offsets) for i in header.tensors.values()] == [("F32", (1,), (0, 4))]


def test_a_large_header_reads_as_safetensors_reads_it(tmp_path):
    tensors = {
        f"model.layers.{i // 8}.experts.{i % 8}.w{i % 3}": torch.full((i % 5 + 1, 3), float(i)) for i in range(600)
    }
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as handle:
        assert sorted(header.tensors) == sorted(handle.keys())
        for name, info in header.tensors.items():
            sliced = handle.get_slice(name)
            assert (info.dtype, list(info.shape)) == (sliced.get_dtype(), sliced.get_shape())
    assert header.metadata == {"format": "pt"}


def test_the_key_count_settles_ordinary_headers_and_declines_repeats():
    from quantport.read.safetensors_header import _parse_unique

    text = json.dumps({"__metadata__": {"format": "pt"}, **GOOD})
    assert _parse_unique(text.encode(), text) == {"__metadata__": {"format": "pt"}, **GOOD}
    repeated = text[:-1] + ', "x": ' + json.dumps(GOOD["x"]) + "}"
    assert _parse_unique(repeated.encode(), repeated) is None
    inner = '{"x": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    assert _parse_unique(inner.encode(), inner) is None

"""Hostile checkpoints: a valid quantport export broken one way each, and a child-process runner.

Each :class:`Kind` copies a valid checkpoint (a tiny Llama, FP8, ModelOpt format, exported by quantport
itself; single-file or sharded) and corrupts one thing: the safetensors header, its offsets, a shard,
the index, a config file or a tensor's values. :func:`run_batch` then runs ``quantport check``,
``quantport inspect`` and ``quantport.load`` on each directory inside a child process with a time and
an address-space limit; the child (this file run as a script) reports each command's exit code,
stdout and stderr as JSON.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEMORY_LIMIT = 4 << 30
"""Address-space limit of a child (RLIMIT_AS)."""
SINGLE = "model.safetensors"


# -- safetensors bytes ----------------------------------------------------------------------------
def split(file: Path) -> tuple[dict[str, Any], bytes]:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(file: Path, header: dict[str, Any] | str | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header))
    blob = text if isinstance(text, bytes) else text.encode()
    file.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def edit_header(fn: Callable[[dict[str, Any]], Any], file: str = SINGLE) -> Callable[[Path], None]:
    """A mutation that edits the parsed header of ``file`` in place (or returns replacement text)."""

    def apply(d: Path) -> None:
        header, data = split(d / file)
        out = fn(header)
        join(d / file, out if isinstance(out, str | bytes) else header, data)

    return apply


def raw_header(text: str | bytes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        _, data = split(d / SINGLE)
        join(d / SINGLE, text, data)

    return apply


def by_offset(header: dict[str, Any]) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def entry(header: dict[str, Any], suffix: str) -> dict[str, Any]:
    return header[next(k for k in by_offset(header) if k.endswith(suffix))]


def _overlap(h: dict[str, Any]) -> None:
    name = by_offset(h)[5]
    begin, end = h[name]["data_offsets"]
    h[name]["data_offsets"] = [begin - 1, end - 1]


def _alias(h: dict[str, Any]) -> None:
    scales = [k for k in by_offset(h) if k.endswith("input_scale")]
    h[scales[1]]["data_offsets"] = list(h[scales[0]]["data_offsets"])


def _gap(d: Path) -> None:
    header, data = split(d / SINGLE)
    last = by_offset(header)[-1]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 8, end + 8]
    join(d / SINGLE, header, data[:begin] + b"\0" * 8 + data[begin:])


def _duplicate_key(d: Path) -> None:
    header, data = split(d / SINGLE)
    text = json.dumps(header)
    name = by_offset(header)[0]
    first = json.dumps({name: header[name]})[1:-1]
    join(d / SINGLE, text[:-1] + ", " + first + "}", data)


def _deep(depth: int) -> str:
    return '{"a": ' + "[" * depth + "]" * depth + "}"


def _sparse_3gb(d: Path) -> None:
    file = d / SINGLE
    file.write_bytes((3_000_000_000).to_bytes(8, "little") + b"{")
    os.truncate(file, 3_000_000_100)


def _replace(d: Path, maker: Callable[[Path], None], file: str = SINGLE) -> None:
    (d / file).unlink()
    maker(d / file)


def _symlink_loop(d: Path) -> None:
    (d / SINGLE).unlink()
    (d / "loop.safetensors").symlink_to(d / SINGLE)
    (d / SINGLE).symlink_to(d / "loop.safetensors")


def _set_tensor(name: str, value: float) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / SINGLE)
        flat = tensors[name].view(-1)
        flat[flat.numel() // 2] = value
        save_file(tensors, d / SINGLE, metadata={"format": "pt"})

    return apply


def _json(file: str, fn: Callable[[Any], Any]) -> Callable[[Path], None]:
    """A mutation that edits JSON file ``file`` in place (``fn``'s return value is ignored)."""

    def apply(d: Path) -> None:
        data = json.loads((d / file).read_text())
        fn(data)
        (d / file).write_text(json.dumps(data))

    return apply


def _text(file: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / file).write_text(text)


def _quant(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def edit(config: dict[str, Any]) -> None:
        fn(config["quantization_config"])

    return _json("config.json", edit)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.__setitem__(key, value)


INDEX = "model.safetensors.index.json"


def _first_shard(d: Path) -> str:
    return sorted(json.loads((d / INDEX).read_text())["weight_map"].values())[0]


def _index_map(fn: Callable[[dict[str, str], Path], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        data = json.loads((d / INDEX).read_text())
        fn(data["weight_map"], d)
        (d / INDEX).write_text(json.dumps(data))

    return apply


def _retarget(target: str) -> Callable[[dict[str, str], Path], None]:
    def fn(weight_map: dict[str, str], d: Path) -> None:
        first = _first_shard(d)
        for name, file in weight_map.items():
            if file == first:
                weight_map[name] = target

    return fn


def _no_quant_config_broken_hfq(d: Path) -> None:
    _json("config.json", lambda c: c.pop("quantization_config"))(d)
    (d / "hf_quant_config.json").write_text("{broken")


# -- the kinds ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """One corruption.

    Attributes:
        id: stable name.
        apply: corrupts the directory in place.
        rule: the check rule that must report it.
        names: the file the error messages must name.
        base: ``single`` (one ``model.safetensors``) or ``sharded`` (index + shards).
        loads: True when ``quantport.load`` may succeed (the files are readable and consistent).
        inject: a file, relative to the directory, whose opening fails with EACCES.
    """

    id: str
    apply: Callable[[Path], None]
    rule: str
    names: str = SINGLE
    base: str = "single"
    loads: bool = False
    inject: str | None = None


U, T = "shards.unreadable", "shards.truncated"
KINDS: list[Kind] = [
    # -- the 8-byte length and the header bytes
    Kind("empty-file", lambda d: (d / SINGLE).write_bytes(b""), T),
    Kind("truncated-length", lambda d: (d / SINGLE).write_bytes(b"\x10\0\0\0"), T),
    Kind("header-longer-than-file", lambda d: (d / SINGLE).write_bytes((1 << 20).to_bytes(8, "little") + b"{}"), T),
    Kind("header-3gb-sparse", _sparse_3gb, U),
    Kind("header-over-cap", lambda d: (d / SINGLE).write_bytes((200_000_000).to_bytes(8, "little") + b"{}"), U),
    Kind("header-length-zero", raw_header(b""), U),
    Kind("header-not-utf8", raw_header(b'{"\xff\xfe": 1}'), U),
    Kind("header-not-json", raw_header("{this is not json"), U),
    Kind("header-json-array", raw_header("[1, 2, 3]"), U),
    Kind("header-deep-nesting", raw_header(_deep(100_000)), U),
    Kind("header-nan-constant", edit_header(lambda h: json.dumps(h).replace("[0, ", "[NaN, ", 1)), U),
    Kind("header-empty-object-with-data", raw_header("{}"), U),
    Kind("entry-not-object", edit_header(lambda h: h.__setitem__(by_offset(h)[0], 5)), U),
    Kind("entry-missing-dtype", edit_header(lambda h: h[by_offset(h)[0]].pop("dtype")), U),
    # -- offsets
    Kind("offsets-string", edit_header(lambda h: entry(h, "weight").__setitem__("data_offsets", ["0", "16"])), U),
    Kind(
        "offsets-float",
        edit_header(
            lambda h: h[by_offset(h)[0]].__setitem__(
                "data_offsets", [float(x) for x in h[by_offset(h)[0]]["data_offsets"]]
            )
        ),
        U,
    ),
    Kind("offsets-negative", edit_header(lambda h: h[by_offset(h)[1]].__setitem__("data_offsets", [-4, 0])), U),
    Kind("offsets-one-number", edit_header(lambda h: h[by_offset(h)[0]].__setitem__("data_offsets", [0])), U),
    Kind("offsets-begin-after-end", edit_header(lambda h: h[by_offset(h)[0]]["data_offsets"].reverse()), U),
    Kind("offsets-overlap", edit_header(_overlap), U),
    Kind("offsets-aliased", edit_header(_alias), U),
    Kind("offsets-gap", _gap, U),
    Kind(
        "offsets-huge", edit_header(lambda h: h[by_offset(h)[-1]].__setitem__("data_offsets", [10**30, 10**30 + 4])), U
    ),
    Kind(
        "offsets-size-mismatch",
        edit_header(
            lambda h: h[by_offset(h)[-1]]["data_offsets"].__setitem__(1, h[by_offset(h)[-1]]["data_offsets"][1] - 1)
        ),
        U,
    ),
    Kind("trailing-bytes", lambda d: (d / SINGLE).write_bytes((d / SINGLE).read_bytes() + b"\0" * 16), U),
    Kind("truncated-data", lambda d: (d / SINGLE).write_bytes((d / SINGLE).read_bytes()[:-64]), T),
    # -- dtype and shape
    Kind("dtype-unknown", edit_header(lambda h: h[by_offset(h)[0]].__setitem__("dtype", "F128")), U),
    Kind("dtype-not-string", edit_header(lambda h: h[by_offset(h)[0]].__setitem__("dtype", 5)), U),
    Kind("shape-strings", edit_header(lambda h: h[by_offset(h)[0]].__setitem__("shape", ["a", 2])), U),
    Kind("shape-negative", edit_header(lambda h: h[by_offset(h)[0]].__setitem__("shape", [-1, 2])), U),
    Kind("shape-not-list", edit_header(lambda h: h[by_offset(h)[0]].__setitem__("shape", "128x128")), U),
    Kind("shape-product-overflow", edit_header(lambda h: h[by_offset(h)[0]].__setitem__("shape", [2**40, 2**40])), U),
    Kind("zero-length-tensor-mismatch", edit_header(lambda h: entry(h, "input_scale").__setitem__("shape", [0])), U),
    # -- keys and metadata
    Kind("duplicate-keys", _duplicate_key, U),
    Kind("metadata-not-object", edit_header(lambda h: h.__setitem__("__metadata__", [1, 2])), U),
    Kind("metadata-non-string-value", edit_header(lambda h: h.__setitem__("__metadata__", {"format": 1})), U),
    # -- the file itself
    Kind("directory-named-model-safetensors", lambda d: _replace(d, lambda p: p.mkdir()), U),
    Kind("fifo-named-model-safetensors", lambda d: _replace(d, os.mkfifo), U),
    Kind("symlink-loop", _symlink_loop, U, ".safetensors"),
    Kind("unreadable-file", lambda d: None, U, inject=SINGLE),
    # -- index and shards
    Kind("index-not-json", _text(INDEX, "{not json"), "shards.index-unreadable", INDEX, "sharded"),
    Kind("index-json-array", _text(INDEX, "[]"), "shards.index-unreadable", INDEX, "sharded"),
    Kind(
        "index-weight-map-list",
        _json(INDEX, _set("weight_map", ["a", "b"])),
        "shards.index-unreadable",
        INDEX,
        "sharded",
    ),
    Kind(
        "index-missing-shard",
        _index_map(_retarget("model-00099-of-00099.safetensors")),
        "shards.missing-file",
        "model-00099-of-00099.safetensors",
        "sharded",
    ),
    Kind(
        "index-path-outside",
        _index_map(_retarget("../outside.safetensors")),
        "shards.index-path",
        "../outside.safetensors",
        "sharded",
    ),
    Kind(
        "index-total-size-wrong",
        _json(INDEX, lambda d: d["metadata"].__setitem__("total_size", 12345)),
        "shards.index-total-size",
        INDEX,
        "sharded",
        loads=True,
    ),
    Kind("shard-deleted", lambda d: (d / _first_shard(d)).unlink(), "shards.missing-file", "safetensors", "sharded"),
    Kind("shard-fifo", lambda d: _replace(d, os.mkfifo, _first_shard(d)), U, "safetensors", "sharded"),
    # -- config files
    Kind("config-missing", lambda d: (d / "config.json").unlink(), "config.missing", "config.json"),
    Kind("config-not-json", _text("config.json", '{"hidden_size": '), "config.missing", "config.json"),
    Kind("config-json-list", _text("config.json", "[1, 2]"), "config.missing", "config.json"),
    Kind("config-deep-nesting", _text("config.json", _deep(100_000)), "config.missing", "config.json"),
    Kind("config-fifo", lambda d: _replace(d, os.mkfifo, "config.json"), "config.missing", "config.json"),
    Kind(
        "quantization-config-string",
        _json("config.json", _set("quantization_config", "fp8")),
        "config.quant-config-type",
        "config.json",
    ),
    Kind(
        "quantization-config-list",
        _json("config.json", _set("quantization_config", ["fp8"])),
        "config.quant-config-type",
        "config.json",
    ),
    Kind("quant-method-null", _quant(_set("quant_method", None)), "config.quant-method", "config.json"),
    Kind("quant-method-unknown", _quant(_set("quant_method", "gptq-magic")), "config.quant-method", "config.json"),
    Kind(
        "quantized-layers-list",
        _quant(lambda q: (q.__setitem__("quant_algo", "MIXED_PRECISION"), q.__setitem__("quantized_layers", ["a"]))),
        "config.mixed-precision",
        "config.json",
    ),
    Kind(
        "num-hidden-layers-string",
        _json("config.json", _set("num_hidden_layers", "abc")),
        "config.model-field",
        "config.json",
    ),
    Kind("hidden-size-negative", _json("config.json", _set("hidden_size", -1)), "config.model-field", "config.json"),
    Kind("vocab-size-null", _json("config.json", _set("vocab_size", None)), "config.model-field", "config.json"),
    Kind(
        "num-kv-heads-float",
        _json("config.json", _set("num_key_value_heads", 2.5)),
        "config.model-field",
        "config.json",
    ),
    Kind("hf-quant-config-broken", _no_quant_config_broken_hfq, "hfq.unreadable", "hf_quant_config.json"),
    # -- values
    Kind("nan-lm-head", _set_tensor("lm_head.weight", float("nan")), "weight.not-finite", "lm_head.weight"),
    Kind("inf-norm", _set_tensor("model.norm.weight", float("inf")), "weight.not-finite", "model.norm.weight"),
    Kind(
        "nan-embedding",
        _set_tensor("model.embed_tokens.weight", float("nan")),
        "weight.not-finite",
        "model.embed_tokens.weight",
    ),
]


def make(kind: Kind, bases: dict[str, Path], root: Path) -> Path:
    """A corrupted copy of the kind's base under ``root``."""
    target = root / kind.id
    shutil.copytree(bases[kind.base], target)
    kind.apply(target)
    return target


# -- the child process ----------------------------------------------------------------------------
def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_batch(jobs: list[dict[str, Any]], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run this file as a child on ``jobs`` (``{"id", "dir", "inject"}``), under the time and memory limits."""
    return subprocess.run(
        [sys.executable, __file__],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit_memory,
        check=False,
    )


def _inject_eacces(path: str) -> None:
    import errno

    real = os.open
    target = os.path.realpath(path)

    def fake_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.path.realpath(os.fsdecode(file)) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))
        return real(file, flags, *args, **kwargs)

    os.open = fake_open  # type: ignore[assignment]


def _capture(fn: Callable[[], int]) -> dict[str, Any]:
    import contextlib
    import io
    import traceback

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = fn()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001  (the point: any escape is reported as a traceback)
            traceback.print_exc()
            code = 99
    return {"code": code, "stdout": out.getvalue()[-4000:], "stderr": err.getvalue()[-4000:]}


def _load(directory: str) -> int:
    import quantport

    try:
        quantport.load(directory)
    except quantport.QuantportError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    return 0


def _child() -> None:
    import logging

    from quantport.check.commands import main as check_main

    class _CurrentStderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sys.stderr.write(self.format(record) + "\n")

    logging.basicConfig(level=logging.WARNING, handlers=[_CurrentStderr()])
    results = {}
    for job in json.loads(sys.stdin.read()):
        if job.get("inject"):
            _inject_eacces(job["inject"])
        results[job["id"]] = {
            "check": _capture(lambda j=job: check_main(["check", j["dir"], "--json"])),
            "inspect": _capture(lambda j=job: check_main(["inspect", j["dir"]])),
            "load": _capture(lambda j=job: _load(j["dir"])),
        }
        if job.get("inject"):
            os.open = _REAL_OPEN  # type: ignore[assignment]
    sys.stdout.write(json.dumps(results))


_REAL_OPEN = os.open

if __name__ == "__main__":
    _child()

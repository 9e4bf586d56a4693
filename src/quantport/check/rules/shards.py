"""Shard integrity: every file readable and complete, the index consistent with the shards.

vLLM loads the files the index names (all ``*.safetensors`` without an index) and looks every
tensor up by name; a truncated shard fails the load, a key in the wrong shard is loaded from the
wrong place or not at all, and a tensor stored twice is loaded twice (the last copy wins).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePath

from ..checkpoint import INDEX_FILE
from ..findings import Finding, Rule, Severity
from ..structure import Context

__all__ = ["check"]

NO_WEIGHTS = Rule(
    "shards.no-weights",
    "the directory has no *.safetensors file",
    "export the weights as safetensors into this directory",
)
UNREADABLE = Rule(
    "shards.unreadable", "a safetensors header cannot be parsed", "re-export the checkpoint; the file is corrupt"
)
TRUNCATED = Rule(
    "shards.truncated",
    "a safetensors file is shorter than its header says",
    "the file was cut short (interrupted copy or download); copy or export it again (tensor rules run "
    "once every shard is readable)",
)
INDEX_UNREADABLE = Rule(
    "shards.index-unreadable",
    f"{INDEX_FILE} is not valid JSON with a weight_map",
    "re-export the checkpoint, or delete the index if there is a single shard",
)
MISSING_FILE = Rule(
    "shards.missing-file",
    "the index names a shard that does not exist",
    "copy the missing shard into the directory, or re-export (tensor rules run once every shard is present)",
)
MISSING_KEY = Rule(
    "shards.index-missing-key",
    "an indexed tensor is in no shard",
    "re-export the checkpoint; the index and the shards come from different exports",
)
WRONG_SHARD = Rule(
    "shards.index-wrong-shard",
    "the index points a tensor at a shard that does not hold it",
    "rewrite the index's weight_map so that every tensor points at the file that holds it",
)
DUPLICATE = Rule("shards.duplicate", "a tensor is stored in more than one shard", "keep one copy of each tensor")
UNINDEXED = Rule(
    "shards.unindexed",
    "a tensor or shard file is not listed in the index",
    "add it to the index's weight_map, or delete it",
    Severity.WARNING,
)
INDEX_PATH = Rule(
    "shards.index-path",
    "the index names a shard outside the checkpoint directory",
    "write bare file names of shards in this directory into the index's weight_map",
)
TOTAL_SIZE = Rule(
    "shards.index-total-size",
    "the index's metadata.total_size is not the tensors' byte count",
    "write metadata.total_size as the sum of the tensors' byte sizes (re-export)",
    Severity.WARNING,
)
NO_INDEX = Rule(
    "shards.no-index",
    "several shards and no index",
    f"write {INDEX_FILE} (transformers needs it to load several shards)",
    Severity.WARNING,
)


def _file_findings(ctx: Context) -> Iterator[Finding]:
    ckpt = ctx.ckpt
    if not ckpt.files:
        yield NO_WEIGHTS.finding(str(ckpt.path), "no *.safetensors file in the checkpoint directory")
    for file, error in ckpt.file_errors.items():
        rule = TRUNCATED if error.truncated else UNREADABLE
        yield rule.finding(file, f"{file}: {error}")
    holders: dict[str, list[str]] = {}
    for file, tensors in ckpt.headers.items():
        for name in tensors:
            holders.setdefault(name, []).append(file)
    for name, files in sorted(holders.items()):
        if len(files) > 1:
            yield DUPLICATE.finding(name, f"{name} is stored in {', '.join(files)}")


def _index_findings(ctx: Context) -> Iterator[Finding]:
    ckpt = ctx.ckpt
    if INDEX_FILE in ckpt.json_errors:
        yield INDEX_UNREADABLE.finding(INDEX_FILE, ckpt.json_errors[INDEX_FILE])
    if ckpt.index is None:
        if len(ckpt.files) > 1 and INDEX_FILE not in ckpt.json_errors:
            yield NO_INDEX.finding(str(ckpt.path), f"{len(ckpt.files)} safetensors files and no {INDEX_FILE}")
        return
    yield from _index_entries(ctx, ckpt.index)


def _outside(file: str) -> bool:
    return file in ("", ".", "..") or "/" in file or "\\" in file or PurePath(file).is_absolute()


def _total_size(ctx: Context, index: dict[str, str]) -> Iterator[Finding]:
    ckpt = ctx.ckpt
    written = ckpt.index_total_size
    if written is None or ckpt.file_errors or not set(index.values()) <= set(ckpt.files):
        return
    actual = sum(info.nbytes for file in set(index.values()) for info in ckpt.headers[file].values())
    if isinstance(written, bool) or not isinstance(written, int | float) or written != actual:
        yield TOTAL_SIZE.finding(
            INDEX_FILE, f"metadata.total_size is {str(written)[:40]!r}, but the tensors take {actual} bytes"
        )


def _index_entries(ctx: Context, index: dict[str, str]) -> Iterator[Finding]:
    ckpt = ctx.ckpt
    outside = sorted({f for f in index.values() if _outside(f)})
    for file in outside:
        count = sum(1 for f in index.values() if f == file)
        yield INDEX_PATH.finding(
            file, f"the index maps {count} tensors to {file!r}, which is not a file name in the checkpoint directory"
        )
    index = {name: file for name, file in index.items() if not _outside(file)}
    present, listed = set(ckpt.files), set(index.values())
    for file in sorted(listed - present):
        count = sum(1 for f in index.values() if f == file)
        yield MISSING_FILE.finding(file, f"the index maps {count} tensors to {file}, which does not exist")
    where = {name: file for file, tensors in ckpt.headers.items() for name in tensors}
    for name, file in sorted(index.items()):
        if file not in present or file in ckpt.file_errors or name in ckpt.headers.get(file, {}):
            continue
        if name in where:
            yield WRONG_SHARD.finding(name, f"the index says {name} is in {file}, but it is in {where[name]}")
        else:
            yield MISSING_KEY.finding(name, f"the index says {name} is in {file}, but no shard holds it")
    for file in sorted(present - listed):
        yield UNINDEXED.finding(file, f"{file} is not referenced by the index; engines will not read it")
    for name, file in sorted(where.items()):
        if name not in index and file in listed:
            yield UNINDEXED.finding(name, f"{name} (in {file}) is missing from the index")
    yield from _total_size(ctx, index)


def check(ctx: Context) -> Iterator[Finding]:
    yield from _file_findings(ctx)
    yield from _index_findings(ctx)

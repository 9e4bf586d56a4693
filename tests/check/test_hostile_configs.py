"""Every value of every config key, of every JSON type: a finding or nothing, never a crash.

The rules read ``quantization_config``, ``hf_quant_config.json`` and the model config, all written by
someone else. Each key of a valid checkpoint's blocks is replaced by values of every JSON type; the
checker must not raise nor report ``check.internal-error``, and ``inspect`` must not raise.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quantport.check import check_checkpoint
from quantport.inspect_checkpoint import inspect_checkpoint

VALUES: list[Any] = ["x", 0, -1, 1.5, True, None, [1, "a"], {"a": [None]}]


def _paths(block: Any, prefix: tuple = ()) -> Iterator[tuple]:
    if isinstance(block, dict):
        for key, value in block.items():
            yield (*prefix, key)
            if isinstance(value, dict):
                yield from _paths(value, (*prefix, key))


def _set(data: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def _sweep(source: Path, target: Path, file: str, root: tuple) -> list[str]:
    shutil.copytree(source, target)
    original = json.loads((source / file).read_text())
    block = original
    for key in root:
        block = block[key]
    failures = []
    for path in [(*root, *p) for p in _paths(block)]:
        for value in VALUES:
            data = json.loads(json.dumps(original))
            _set(data, path, value)
            (target / file).write_text(json.dumps(data))
            where = f"{file}:{'.'.join(map(str, path))}={value!r}"
            try:
                report = check_checkpoint(target)
                inspect_checkpoint(target)
            except Exception as exc:  # noqa: BLE001  (collect every crash, report them together)
                failures.append(f"{where}: {exc!r}")
                continue
            if "check.internal-error" in report.rules():
                failures.append(
                    f"{where}: " + "; ".join(f.message for f in report.findings if f.rule == "check.internal-error")
                )
    return failures


@pytest.mark.parametrize(
    ("base", "file", "root"),
    [
        ("modelopt-nvfp4", "config.json", ("quantization_config",)),
        ("modelopt-nvfp4", "hf_quant_config.json", ()),
        ("ct-w4a16", "config.json", ("quantization_config",)),
        ("ct-fp8-block", "config.json", ("quantization_config",)),
        ("modelopt-nvfp4", "config.json", ()),
    ],
)
def test_any_config_value_is_a_finding_never_a_crash(base, file, root, quantport_ckpt, ct_ckpt, tmp_path):
    sources = {
        "modelopt-nvfp4": lambda: quantport_ckpt("llama", "nvfp4", kv=True),
        "ct-w4a16": lambda: ct_ckpt("W4A16"),
        "ct-fp8-block": lambda: ct_ckpt("FP8_BLOCK"),
    }
    source = sources[base]()
    failures = _sweep(source, tmp_path / "copy", file, root)
    assert not failures, "\n".join(failures[:30])

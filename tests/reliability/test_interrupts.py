"""Faults around OUT: signals, a killed run, a full or read-only disk, a long name, OUT that is the model or
the current directory, and a directory created at OUT while a run writes. Every case: exit code 2, one
``error:`` line naming the fix, no traceback, no hidden directory left, and nothing of the user's touched."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import quantport.cli as cli
import quantport.loading as loading
import quantport.pipeline as pipeline
from quantport.errors import OutputPathError
from quantport.export import checkpoint_file, output_dir
from quantport.loading import resolve_model_dir

FAST = ["--recipe", "fp8", "--device", "cpu", "--quiet", "--calib-samples", "4", "--calib-seq-len", "64"]

CHILD = """
import importlib
import sys
import time
from pathlib import Path

import quantport.cli as cli
import quantport.pipeline as pipeline
from quantport.export.shards import PlannedTensor

export = importlib.import_module("quantport.export")  # the module, not quantport.export()

phase, ready = sys.argv[1], Path(sys.argv[2])


def stall():
    ready.touch()
    time.sleep(120)


if phase == "calibrate":
    real_quantize = pipeline.quantize

    def slow_quantize(*args, **kwargs):
        stall()
        return real_quantize(*args, **kwargs)

    pipeline.quantize = slow_quantize  # the CLI imports it from there when it needs it
else:  # stall half way through the tensors, with the first ones already written
    real_write = export.write_sharded_safetensors

    def slow_write(plan, directory, **kwargs):
        def stalled(compute):
            return lambda: (stall(), compute())[1]

        half = len(plan) // 2
        plan = [PlannedTensor(e.name, e.spec, stalled(e.compute), e.borrowed) if i == half else e
                for i, e in enumerate(plan)]
        return real_write(plan, directory, **kwargs)

    export.write_sharded_safetensors = slow_write
sys.exit(cli.main(sys.argv[3:]))
"""


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _start_and_stall(tmp_path: Path, out: Path, phase: str) -> subprocess.Popen:
    """A real ``quantport quantize`` child that stops (sleeping, interruptible) in ``phase``."""
    ready = tmp_path / f"ready-{phase}"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, phase, str(ready), "quantize", "bundled:tiny-llama", str(out), *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child did not reach {phase}: {child.communicate()[1]}")
        time.sleep(0.05)
    return child


def _error_line(stderr: str) -> str:
    # transformers' own "Loading weights" bar is drawn even with --quiet in a process that loaded it once
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def _run(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["quantize", *args])
    return code, capsys.readouterr().err


@pytest.fixture
def no_loading(monkeypatch):
    """The model must not be loaded: OUT is judged first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before OUT was checked")

    monkeypatch.setattr(loading, "load_model", refuse)  # the CLI imports it from there when it needs it


@pytest.mark.parametrize("phase", ["calibrate", "write"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_removes_the_partial_output(tmp_path, signum, phase):
    out = tmp_path / "out" / "ckpt"
    child = _start_and_stall(tmp_path, out, phase)
    staging = out.parent / f".ckpt.quantport-staging-{child.pid}"
    assert staging.is_dir()
    if phase == "write":
        assert (staging / "model.safetensors").exists()  # a partial checkpoint is there
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 2
    line = _error_line(stderr)
    assert line == f"error: interrupted by {signum.name}; removed the partial output {staging}"
    assert not out.parent.exists()  # the staging directory and the parent the run created are gone


def test_a_killed_run_is_reported_and_cleaned_by_the_next(tmp_path, capsys, caplog):
    out = tmp_path / "ckpt"
    child = _start_and_stall(tmp_path, out, "write")
    child.kill()
    child.communicate(timeout=60)
    stale = tmp_path / f".ckpt.quantport-staging-{child.pid}"
    assert stale.is_dir() and not out.exists()
    with caplog.at_level(logging.WARNING):
        code, _ = _run(capsys, "bundled:tiny-llama", str(out), *FAST)
    assert code == 0 and (out / "model.safetensors").is_file() and _hidden(tmp_path) == []
    assert any(str(stale) in r.getMessage() and "killed" in r.getMessage() for r in caplog.records)


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or result.returncode})")


def _unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=False)


def test_a_full_disk(tmp_path, capsys):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=512k")  # the probe fits, the 1.4 MB checkpoint does not
    try:
        code, stderr = _run(capsys, "bundled:tiny-llama", str(disk / "ckpt"), *FAST)
        assert code == 2
        line = _error_line(stderr)
        assert "No space left on device" in line and "free space" in line and str(disk / "ckpt") in line
        assert list(disk.iterdir()) == []
    finally:
        _unmount(disk)


def test_disk_full_at_a_write_call(tmp_path, capsys, monkeypatch):
    calls = []

    def disk_full(fd, data, offset):
        calls.append(offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_file.os, "pwrite", disk_full)
    code, stderr = _run(capsys, "bundled:tiny-llama", str(tmp_path / "ckpt"), *FAST)
    assert code == 2 and calls
    line = _error_line(stderr)
    assert "No space left on device" in line and "free space" in line and str(tmp_path / "ckpt") in line
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_file_system(tmp_path, capsys, no_loading):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "ro,size=1m")
    try:
        code, stderr = _run(capsys, "bundled:tiny-llama", str(disk / "ckpt"), *FAST)
        assert code == 2
        line = _error_line(stderr)
        assert "Read-only file system" in line and "writable file system" in line
        assert list(disk.iterdir()) == []
    finally:
        _unmount(disk)


def test_read_only_injected(tmp_path, capsys, monkeypatch, no_loading):
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if "quantport-staging" in os.fspath(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(output_dir.os, "mkdir", read_only)
    code, stderr = _run(capsys, "bundled:tiny-llama", str(tmp_path / "new" / "ckpt"), *FAST)
    assert code == 2
    line = _error_line(stderr)
    assert "Read-only file system" in line and "writable file system" in line and str(tmp_path / "new") in line
    assert list(tmp_path.iterdir()) == []


def test_a_name_too_long(tmp_path, capsys, no_loading):
    code, stderr = _run(capsys, "bundled:tiny-llama", str(tmp_path / ("x" * 300)), *FAST)
    assert code == 2
    line = _error_line(stderr)
    assert "File name too long" in line and "shorter OUT" in line
    assert list(tmp_path.iterdir()) == []


def _copy_of_the_model(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    model = tmp_path / "models" / "tiny"
    shutil.copytree(resolve_model_dir("bundled:tiny-llama"), model)
    return model, _digests(model)


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("which", ["model", "parent", "grandparent", "link to the parent"])
def test_out_is_never_the_model_or_above_it(tmp_path, capsys, which, no_loading):
    model, before = _copy_of_the_model(tmp_path)
    if which == "link to the parent":
        (tmp_path / "link").symlink_to(model.parent)
    out = {"model": model, "parent": model.parent, "grandparent": tmp_path, "link to the parent": tmp_path / "link"}
    code, stderr = _run(capsys, str(model), str(out[which]), *FAST, "--overwrite")
    assert code == 2
    line = _error_line(stderr)
    assert str(out[which]) in line and str(model) in line and "even with --overwrite" in line
    assert _digests(model) == before and _hidden(model) == [] and _hidden(model.parent) == []


@pytest.mark.parametrize("out", [".", ".."])
def test_out_is_never_the_current_directory(tmp_path, capsys, monkeypatch, out, no_loading):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    code, stderr = _run(capsys, "bundled:tiny-llama", out, *FAST, "--overwrite")
    assert code == 2 and "current directory" in _error_line(stderr)
    assert (work / "notes.txt").read_text() == "keep"


def test_the_api_never_replaces_the_model_directory(tmp_path):
    import quantport
    from quantport.loading import load_model

    model_dir, before = _copy_of_the_model(tmp_path)
    model, _ = load_model(model_dir, device="cpu")
    quantport.quantize(model, "fp8", calib_samples=4, calib_seq_len=64, progress=False)
    for out in (model_dir, model_dir.parent):
        with pytest.raises(OutputPathError, match="model directory"):
            quantport.export(model, out, overwrite=True, progress=False)
    assert _digests(model_dir) == before and _hidden(model_dir.parent) == []


@pytest.mark.parametrize("intruder", ["an empty directory", "a directory with a file", "a second quantport run"])
def test_a_directory_created_at_out_during_the_run_is_left_intact(tmp_path, capsys, monkeypatch, intruder):
    out = tmp_path / "ckpt"
    real_quantize = pipeline.quantize
    theirs = {}

    def meanwhile(*args, **kwargs):
        monkeypatch.setattr(pipeline, "quantize", real_quantize)
        if intruder == "a second quantport run":
            assert cli.main(["quantize", "bundled:tiny-llama", str(out), *FAST]) == 0
        else:
            out.mkdir()
            if intruder == "a directory with a file":
                (out / "mine.txt").write_text("mine")
        theirs.update(_digests(out), inode=out.stat().st_ino)
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize", meanwhile)
    code, _ = _run(capsys, "bundled:tiny-llama", str(out), *FAST)
    assert code == 2 and {**_digests(out), "inode": out.stat().st_ino} == theirs and _hidden(tmp_path) == []
    assert intruder != "a second quantport run" or "model.safetensors" in theirs


def test_the_failure_message_of_a_directory_created_meanwhile(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ckpt"
    real_quantize = pipeline.quantize

    def meanwhile(*args, **kwargs):
        out.mkdir()
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize", meanwhile)
    code, stderr = _run(capsys, "bundled:tiny-llama", str(out), *FAST)
    assert code == 2
    line = _error_line(stderr)
    assert "appeared while quantport was writing" in line and "choose another OUT" in line

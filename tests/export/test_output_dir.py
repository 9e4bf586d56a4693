"""OUT claimed once, written beside it, renamed into place only if it is still what the claim found."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from quantport.errors import OutputChangedError, OutputExistsError, OutputPathError, OutputWriteError
from quantport.export import durable, leftovers, output_dir
from quantport.export.output_dir import OutputMode, claim_output


def _hidden(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.fixture(params=["renameat2", "fallback"])
def rename_kind(request, monkeypatch):
    """Both ways of a rename that never replaces: Linux renameat2, and check-then-rename elsewhere."""
    if request.param == "renameat2" and durable.RENAMEAT2 is None:
        pytest.skip("no renameat2 in this libc")
    if request.param == "fallback":
        monkeypatch.setattr(durable, "RENAMEAT2", None)
    return request.param


def test_create_writes_beside_and_renames(tmp_path, rename_kind):
    out = tmp_path / "ckpt"
    target = claim_output(out)
    assert target.mode is OutputMode.CREATE and not out.exists()
    assert target.staging.parent == tmp_path and target.staging.name == f".ckpt.quantport-staging-{os.getpid()}"
    with target.writing() as staging:
        (staging / "model.safetensors").write_bytes(b"data")
    assert target.commit() == out and target.committed
    assert (out / "model.safetensors").read_bytes() == b"data" and _hidden(tmp_path) == []


def test_abort_removes_staging_and_the_parents_it_created(tmp_path):
    target = claim_output(tmp_path / "a" / "b" / "ckpt")
    with pytest.raises(RuntimeError), target.writing() as staging:
        (staging / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert target.removed == target.staging and list(tmp_path.iterdir()) == []
    assert target.abort() == target.staging  # idempotent


def test_existing_output_refused_unless_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        claim_output(out)
    assert (out / "old.txt").read_text() == "keep" and _hidden(tmp_path) == []
    target = claim_output(out, overwrite=True)
    assert target.mode is OutputMode.REPLACE
    with target.writing() as staging:
        (staging / "new.txt").write_text("new")
    target.commit()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt"
    ]


def test_empty_output_is_replaced_without_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    target = claim_output(out)
    assert target.mode is OutputMode.REPLACE_EMPTY
    (target.staging / "x").write_text("x")
    target.commit()
    assert (out / "x").read_text() == "x" and _hidden(tmp_path) == []


def test_a_file_at_out_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("file")
    with pytest.raises(OutputExistsError, match="not a directory"):
        claim_output(tmp_path / "ckpt", overwrite=True)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_out_is_never_the_model_or_a_parent_of_it(tmp_path, depth):
    model = tmp_path / "models" / "llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    out = [model, model.parent, tmp_path][depth]
    with pytest.raises(OutputPathError, match="model directory") as info:
        claim_output(out, overwrite=True, source=model)
    assert str(out) in str(info.value) and str(model) in str(info.value) and "\n" not in str(info.value)
    assert (model / "config.json").read_text() == "{}" and _hidden(out) == []


def test_model_compared_with_links_resolved(tmp_path):
    model = tmp_path / "models" / "llama"
    model.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models")
    with pytest.raises(OutputPathError, match="model directory"):
        claim_output(tmp_path / "link", overwrite=True, source=model)
    with pytest.raises(OutputPathError, match="model directory"):
        claim_output(tmp_path / "models", overwrite=True, source=tmp_path / "link" / "llama")
    target = claim_output(tmp_path / "models" / "llama-fp8", source=model)  # inside the model's parent: fine
    target.abort()


@pytest.mark.parametrize("out", [".", "..", "cwd-absolute"])
def test_out_is_never_the_current_directory_or_a_parent(tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    with pytest.raises(OutputPathError, match="current directory"):
        claim_output(work if out == "cwd-absolute" else out, overwrite=True)
    assert (work / "notes.txt").read_text() == "keep"


def test_a_mount_point_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "mnt"
    out.mkdir()
    monkeypatch.setattr(output_dir.os.path, "ismount", lambda p: os.fspath(p) == os.fspath(out))
    with pytest.raises(OutputPathError, match="mount point.*inside it"):
        claim_output(out, overwrite=True)


def test_a_name_too_long_is_one_clear_error(tmp_path):
    with pytest.raises(OutputWriteError, match="File name too long.*shorter OUT") as info:
        claim_output(tmp_path / ("x" * 300))
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_a_long_name_that_fits_gets_a_short_staging_name(tmp_path):
    out = tmp_path / ("n" * 250)
    target = claim_output(out)
    assert len(target.staging.name) < 255
    target.commit()
    assert out.is_dir() and _hidden(tmp_path) == []


@pytest.mark.parametrize(
    ("code", "fix"), [(errno.EROFS, "read-only"), (errno.ENOSPC, "free space"), (errno.EACCES, "permissions")]
)
def test_the_probe_catches_an_unwritable_parent_before_anything_runs(tmp_path, monkeypatch, code, fix):
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if os.fspath(path).endswith(output_dir.PROBE):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(output_dir.os, "open", refuse)
    with pytest.raises(OutputWriteError, match=f"{os.strerror(code)}.*{fix}"):
        claim_output(tmp_path / "new" / "ckpt")
    assert list(tmp_path.iterdir()) == []  # staging and the parent it created are gone


def test_an_os_error_while_writing_is_one_clear_error(tmp_path):
    target = claim_output(tmp_path / "ckpt")
    with pytest.raises(OutputWriteError, match=r"ckpt: No space left on device.*free space") as info, target.writing():
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_a_failing_final_rename_leaves_no_hidden_checkpoint(tmp_path, monkeypatch):
    def fail(source, destination):
        raise OSError(errno.EIO, "Input/output error", os.fspath(destination))

    monkeypatch.setattr(output_dir, "rename_noreplace", fail)
    target = claim_output(tmp_path / "ckpt")
    (target.staging / "model.safetensors").write_bytes(b"finished")
    with pytest.raises(OutputWriteError, match="cannot move the finished checkpoint.*Input/output error"):
        target.commit()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what", ["empty directory", "directory with a file", "file"])
def test_something_created_at_out_meanwhile_is_never_replaced(tmp_path, rename_kind, what):
    out = tmp_path / "ckpt"
    target = claim_output(out)
    (target.staging / "model.safetensors").write_bytes(b"ours")
    if what == "file":
        out.write_text("theirs")
    else:
        out.mkdir()
        if what == "directory with a file":
            (out / "theirs.txt").write_text("theirs")
    identity = out.lstat().st_ino
    with pytest.raises(OutputChangedError, match="appeared while quantport was writing"):
        target.commit()
    assert out.lstat().st_ino == identity and _hidden(tmp_path) == []
    if what == "file":
        assert out.read_text() == "theirs"
    else:
        assert [p.name for p in out.iterdir()] == ([] if what == "empty directory" else ["theirs.txt"])


def test_entries_that_appear_in_an_empty_out_are_kept(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    target = claim_output(out)
    (out / "theirs.txt").write_text("theirs")
    with pytest.raises(OutputChangedError, match="has entries now"):
        target.commit()
    assert (out / "theirs.txt").read_text() == "theirs" and _hidden(tmp_path) == []


def test_an_out_replaced_meanwhile_is_kept(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    target = claim_output(out, overwrite=True)
    out.rename(tmp_path / "moved")
    out.mkdir()
    (out / "theirs.txt").write_text("theirs")
    with pytest.raises(OutputChangedError, match="replaced by another directory"):
        target.commit()
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and _hidden(tmp_path) == []


def test_an_out_removed_meanwhile_is_simply_created(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    target = claim_output(out, overwrite=True)
    (out / "old.txt").unlink()
    out.rmdir()
    (target.staging / "new.txt").write_text("new")
    target.commit()
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_commit_fsyncs_every_file_the_staging_directory_and_the_parent(tmp_path, monkeypatch):
    synced = []
    real = durable._fsync
    monkeypatch.setattr(durable, "_fsync", lambda path, flags: (synced.append(os.fspath(path)), real(path, flags)))
    target = claim_output(tmp_path / "ckpt")
    (target.staging / "sub").mkdir()
    for name in ("model.safetensors", "config.json", "sub/tokenizer.json"):
        (target.staging / name).write_text(name)
    staging = os.fspath(target.staging)
    target.commit()
    expected = {os.path.join(staging, n) for n in ("model.safetensors", "config.json", "sub/tokenizer.json")}
    assert expected | {staging, os.path.join(staging, "sub"), os.fspath(tmp_path)} <= set(synced)
    assert synced.index(os.fspath(tmp_path)) > synced.index(staging)  # the parent after the rename


def test_stale_staging_of_a_dead_process_is_reported_and_removed(tmp_path, caplog):
    out = tmp_path / "ckpt"
    pid = _dead_pid()
    stale = tmp_path / f".ckpt.quantport-staging-{pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    other = tmp_path / f".other.quantport-staging-{pid}"  # another OUT's: not ours to judge
    other.mkdir()
    with caplog.at_level(logging.WARNING):
        claim_output(out).abort()
    assert not stale.exists() and other.exists()
    assert any(str(stale) in r.getMessage() and "killed or crashed" in r.getMessage() for r in caplog.records)


def test_staging_of_a_live_process_is_left_alone(tmp_path, caplog):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".ckpt.quantport-staging-{child.pid}"
        live.mkdir()
        with caplog.at_level(logging.WARNING):
            claim_output(tmp_path / "ckpt").abort()
        assert live.exists()
        assert any(f"process {child.pid} is also writing" in r.getMessage() for r in caplog.records)
    finally:
        child.kill()
        child.wait()


def test_a_reused_pid_does_not_keep_a_stale_staging(tmp_path, monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".ckpt.quantport-staging-{child.pid}"
        stale.mkdir()
        monkeypatch.setattr(leftovers, "_process_start", lambda pid: time.time() + 3600)  # started after the dir
        claim_output(tmp_path / "ckpt").abort()
        assert not stale.exists()
    finally:
        child.kill()
        child.wait()


def test_a_stale_trash_is_kept_when_it_is_the_only_copy(tmp_path, caplog):
    pid = _dead_pid()
    trash = tmp_path / f".ckpt.quantport-old-{pid}"
    trash.mkdir()
    (trash / "model.safetensors").write_bytes(b"previous")
    with caplog.at_level(logging.WARNING):
        claim_output(tmp_path / "ckpt").abort()
    assert trash.exists() and any("rename it back" in r.getMessage() for r in caplog.records)
    (tmp_path / "ckpt").mkdir()  # once OUT exists again, the trash is just a leftover
    claim_output(tmp_path / "ckpt").abort()
    assert not trash.exists()


def test_signals_are_held_during_the_swap_and_delivered_after():
    steps = []
    with pytest.raises(KeyboardInterrupt), durable.signals_deferred():
        signal.raise_signal(signal.SIGINT)
        steps.append("finished")
    assert steps == ["finished"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler

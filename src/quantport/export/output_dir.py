"""The output directory OUT: claimed once at the start, written beside it, renamed into place at the end.

:func:`claim_output` decides, before anything is loaded, whether OUT is created or replaced (replacing a
non-empty OUT needs ``overwrite``), refuses an OUT that is (or contains) the model, the current directory or
a mount point, removes what killed runs left beside OUT (:mod:`.leftovers`), and proves that OUT's parent
takes a file (a staging directory is created and a probe written, fsynced and removed). The checkpoint is
written into that hidden staging directory; :meth:`OutputTarget.commit` fsyncs it and renames it to OUT, only
if OUT is still what it was at the claim: a directory that appeared meanwhile is never replaced, and a
replaced OUT must be the very directory (device and inode) that was there. :meth:`OutputTarget.abort` removes
the staging directory. Every ``OSError`` becomes an :class:`~quantport.errors.OutputWriteError`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..errors import OutputChangedError, OutputExistsError, OutputPathError
from .durable import fsync_directory, fsync_tree, os_error, rename_noreplace, signals_deferred
from .leftovers import LeftoverKind, find_leftovers, hidden_name, owner_is_alive, remove_stale_leftovers

__all__ = ["OutputMode", "OutputTarget", "claim_output"]

logger = logging.getLogger(__name__)

PROBE = ".quantport-probe"


class OutputMode(str, Enum):
    """What the commit does to OUT, decided once, at the claim."""

    CREATE = "create"
    """OUT did not exist: the staging directory is renamed to it, never over anything that appeared since."""
    REPLACE_EMPTY = "replace-empty"
    """OUT was an empty directory: renamed over, which the kernel refuses if entries appeared in it since."""
    REPLACE = "replace"
    """OUT was a directory to replace (``overwrite``): moved aside, the staging directory renamed in, the old
    one removed; refused if OUT is no longer that directory."""


class _State(Enum):
    CLAIMED = "claimed"
    COMMITTED = "committed"
    ABORTED = "aborted"


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or inner.is_relative_to(outer)


def refuse_if_contains(out: Path, real: Path, source: Path | str | None) -> None:
    """Refuse an OUT that is the model directory ``source`` or one of its parents (replacing OUT would delete
    the model), comparing paths with symbolic links resolved."""
    if source is None or not Path(source).is_dir():
        return
    model = Path(os.path.realpath(source))
    if _contains(real, model):
        relation = "is" if real == model else "contains"
        raise OutputPathError(
            f"output directory {out} {relation} the model directory {model}; replacing it would delete the model, "
            f"so it is refused even with --overwrite: choose an OUT that is neither {model} nor one of its parents"
        )


def _refuse_unusable(out: Path, real: Path, existing: os.stat_result | None) -> None:
    if existing is None:
        return
    if not stat.S_ISDIR(existing.st_mode):
        raise OutputExistsError(f"output path {out} exists and is not a directory; choose another path")
    cwd = Path(os.path.realpath(os.getcwd()))
    if _contains(real, cwd):
        relation = "is" if real == cwd else "contains"
        raise OutputPathError(
            f"output directory {out} {relation} the current directory {cwd}; choose an OUT that is neither the "
            f"current directory nor one of its parents, e.g. {cwd / 'quantized'}"
        )
    if os.path.ismount(real):
        raise OutputPathError(
            f"output directory {out} is a mount point, which cannot be replaced by a rename; choose a directory "
            f"inside it, e.g. {out / 'checkpoint'}"
        )


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; returns those created, outermost first."""
    missing = []
    while _lstat(directory) is None:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir()
    return missing[::-1]


def _probe(directory: Path) -> None:
    """Write, fsync and remove a small file: the file system takes writes there (not read-only, not full)."""
    probe = directory / PROBE
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    probe.unlink()


RESUME_DIR = ".quantport-resume"
"""The staging directory's subdirectory of a resumable run's progress (:mod:`quantport.sequential.resume`)."""


@dataclass
class OutputTarget:
    """OUT as claimed at the start of a run: where it is written, and what the commit will do.

    ``path`` is OUT as given; ``real`` is where the checkpoint goes (symbolic links resolved); ``identity`` is
    the ``(st_dev, st_ino)`` of the directory to replace (``None`` when creating)."""

    path: Path
    real: Path
    mode: OutputMode
    identity: tuple[int, int] | None
    staging: Path = field(init=False)
    removed: Path | None = field(default=None, init=False)
    resumable: bool = field(default=False, init=False)
    """Saved progress survives an abort (``--resume``), for the next ``--resume`` run to take over."""
    kept: Path | None = field(default=None, init=False)
    _created: list[Path] = field(default_factory=list, init=False, repr=False)
    _state: _State = field(default=_State.CLAIMED, init=False, repr=False)

    def _create_staging(self) -> None:
        try:
            self._created = _make_parents(self.real.parent)
            for serial in range(1000):
                self.staging = hidden_name(self.real, LeftoverKind.STAGING, os.getpid(), serial)
                try:
                    self.staging.mkdir()
                    break
                except FileExistsError:
                    continue
            _probe(self.staging)
        except OSError as error:
            self.abort()
            raise os_error(f"cannot write the output directory {self.path}", error) from error
        except BaseException:
            self.abort()
            raise

    @property
    def resume_dir(self) -> Path:
        """Where a resumable run keeps its progress: inside the staging directory, removed before the commit."""
        return self.staging / RESUME_DIR

    def _adopt_progress(self) -> None:
        """Move the saved progress of the newest killed run to this OUT into this run's staging directory."""
        dead = [
            leftover
            for leftover in find_leftovers(self.real)
            if leftover.kind is LeftoverKind.STAGING
            and not owner_is_alive(leftover)
            and (leftover.path / RESUME_DIR / "progress.json").is_file()
        ]
        if not dead:
            logger.info("--resume: no interrupted run of %s found; starting from the first layer", self.path)
            return
        newest = max(dead, key=lambda leftover: (leftover.path / RESUME_DIR / "progress.json").stat().st_mtime)
        try:
            os.rename(newest.path / RESUME_DIR, self.resume_dir)
        except OSError as error:
            raise os_error(f"cannot take over the progress saved in {newest.path}", error) from error
        logger.info("--resume: continuing the run saved in %s", newest.path)

    def _keep_only_progress(self, staging: Path) -> None:
        for entry in staging.iterdir():
            if entry.name != RESUME_DIR:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        self.kept = staging
        logger.warning("kept the calibration progress in %s: run the same command with --resume to go on", staging)

    def drop_progress(self) -> None:
        """The checkpoint is written: the saved progress is not part of it."""
        shutil.rmtree(self.staging / RESUME_DIR, ignore_errors=True)

    @property
    def committed(self) -> bool:
        """Whether the checkpoint is at OUT."""
        return self._state is _State.COMMITTED

    def check_source(self, source: Path | str | None) -> None:
        """Refuse (:class:`OutputPathError`) if OUT is or contains the model directory ``source``."""
        refuse_if_contains(self.path, self.real, source)

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """Yield the staging directory to write into; on any error remove it (an ``OSError`` is raised as an
        :class:`~quantport.errors.OutputWriteError` naming OUT, the reason and the fix)."""
        try:
            yield self.staging
        except OSError as error:
            self.abort()
            raise os_error(f"cannot write the checkpoint to {self.path}", error) from error
        except BaseException:
            self.abort()
            raise

    def commit(self) -> Path:
        """fsync the staging directory, rename it to OUT as the claim decided, fsync OUT's parent."""
        if self._state is not _State.CLAIMED:
            raise RuntimeError(f"{self.path}: commit after {self._state.value}")
        with signals_deferred():
            try:
                fsync_tree(self.staging)
                {OutputMode.CREATE: self._create, OutputMode.REPLACE_EMPTY: self._replace_empty,
                 OutputMode.REPLACE: self._replace}[self.mode]()  # fmt: skip
                fsync_directory(self.real.parent)
            except OSError as error:
                self.abort()
                raise os_error(f"cannot move the finished checkpoint to {self.path}", error) from error
            except BaseException:
                self.abort()
                raise
            self._state = _State.COMMITTED
        logger.info("wrote %s", self.path)
        return self.path

    def abort(self) -> Path | None:
        """Remove the staging directory (and the parents the claim created, when empty); returns the staging
        directory if there was one to remove. Does nothing after a commit; a second call returns the same."""
        if self._state is not _State.CLAIMED:
            return self.removed
        self._state = _State.ABORTED
        with signals_deferred():
            staging = getattr(self, "staging", None)
            if self.resumable and staging is not None and (staging / RESUME_DIR / "progress.json").is_file():
                self._keep_only_progress(staging)
                return None
            if staging is not None and os.path.lexists(staging):
                shutil.rmtree(staging, ignore_errors=True)
                if os.path.lexists(staging):
                    logger.warning("could not remove the partial output %s; remove it by hand", staging)
                else:
                    self.removed = staging
            for parent in reversed(self._created):
                try:
                    parent.rmdir()
                except OSError:
                    break
        return self.removed

    def _changed(self, what: str) -> OutputChangedError:
        return OutputChangedError(
            f"{self.path} {what} while quantport was writing (another run, or by hand); it was left as it is and "
            f"this run's checkpoint was discarded: remove it or choose another OUT, and run again"
        )

    def _still_there(self) -> bool:
        """Whether the directory to replace is still at OUT (False: it is gone); refused if another took its
        place."""
        status = _lstat(self.real)
        if status is None:
            return False
        if _identity(status) != self.identity:
            raise self._changed("was replaced by another directory")
        return True

    def _create(self) -> None:
        if not rename_noreplace(self.staging, self.real):
            raise self._changed("appeared")

    def _replace_empty(self) -> None:
        if not self._still_there():
            return self._create()
        try:
            os.rename(self.staging, self.real)  # onto an empty directory only: the kernel checks
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise self._changed("was empty when the run started and has entries now") from None
            raise
        return None

    def _replace(self) -> None:
        if not self._still_there():
            return self._create()
        trash = hidden_name(self.real, LeftoverKind.TRASH, os.getpid())
        if os.path.lexists(trash):
            shutil.rmtree(trash)
        os.rename(self.real, trash)
        status = trash.lstat()
        if _identity(status) != self.identity:  # swapped between the check and the rename: put it back
            rename_noreplace(trash, self.real)
            raise self._changed("was replaced by another directory")
        try:
            moved = rename_noreplace(self.staging, self.real)
        except OSError:
            rename_noreplace(trash, self.real)
            raise
        if not moved:
            raise OutputChangedError(
                f"a new {self.path} appeared while the old one was being replaced; it was left as it is, and the "
                f"old one is kept in {trash}: rename it back or remove it, and run again"
            )
        fsync_directory(self.real.parent)
        shutil.rmtree(trash, ignore_errors=True)
        if os.path.lexists(trash):
            logger.warning("could not remove the previous checkpoint, moved to %s; remove it by hand", trash)
        return None


def claim_output(
    out_dir: str | Path, *, overwrite: bool = False, source: Path | str | None = None, resume: bool = False
) -> OutputTarget:
    """Decide once, now, how OUT will be written, and prove that it can be (see the module docstring).

    ``source``: the model directory, which OUT may not be or contain. ``resume``: take over the saved progress
    (:attr:`OutputTarget.resume_dir`) of a run to the same OUT that was killed. Raises :class:`OutputExistsError`,
    :class:`OutputPathError` or :class:`~quantport.errors.OutputWriteError` with the fix; nothing is left
    behind then."""
    path = Path(out_dir)
    real = Path(os.path.realpath(path))
    try:
        existing = _lstat(real)
    except OSError as error:
        raise os_error(f"cannot use {path} as the output directory", error) from error
    refuse_if_contains(path, real, source)
    _refuse_unusable(path, real, existing)
    if existing is None:
        mode = OutputMode.CREATE
    else:
        try:
            empty = not any(real.iterdir())
        except OSError as error:
            raise os_error(f"cannot read the output directory {path}", error) from error
        if not empty and not overwrite:
            raise OutputExistsError(
                f"output directory {path} exists and is not empty; choose another path or pass --overwrite"
            )
        mode = OutputMode.REPLACE if overwrite else OutputMode.REPLACE_EMPTY
    target = OutputTarget(path, real, mode, None if existing is None else _identity(existing))
    if not resume:
        remove_stale_leftovers(real)
    target._create_staging()
    if resume:
        target.resumable = True
        target._adopt_progress()
        remove_stale_leftovers(real)
    return target

"""Hidden directories beside OUT that a killed run left behind, found and removed by the next run to that OUT.

A run writes into ``.{OUT}.quantport-staging-{pid}`` and, when it replaces an old OUT, moves that one to
``.{OUT}.quantport-old-{pid}`` for the moment of the swap. SIGKILL, a power loss or a crash leave them. The
next run to the same OUT removes those whose process is gone, logging a warning for each; those of a live
process (another run writing the same OUT) are left alone. A pid can be reused: a process that started after
the directory was last changed cannot be the one that wrote it (start time from ``/proc``, on Linux).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = ["Leftover", "LeftoverKind", "find_leftovers", "hidden_name", "remove_stale_leftovers"]

logger = logging.getLogger(__name__)

CLOCK_SLACK_S = 2.0  # /proc/stat's boot time has one-second steps
_PREFIX_BYTES = 160  # room in a 255-byte name for the dot, the kind and the pid


class LeftoverKind(str, Enum):
    """The two hidden directories a run creates beside OUT; the value is part of their name."""

    STAGING = "quantport-staging"
    """The checkpoint being written; complete only once it is renamed to OUT."""
    TRASH = "quantport-old"
    """The previous OUT, moved aside while the new one is renamed in, then removed."""


def _short(name: str) -> str:
    """``name``, or for a name too long to carry a suffix its start plus a hash of the whole."""
    raw = os.fsencode(name)
    if len(raw) <= _PREFIX_BYTES:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:12]
    return os.fsdecode(raw[: _PREFIX_BYTES - 13]) + "~" + digest  # bytes cut mid-character round-trip


def hidden_name(out: Path, kind: LeftoverKind, pid: int, serial: int = 0) -> Path:
    """``.{OUT}.{kind}-{pid}`` beside ``out`` (``-{pid}.{serial}`` for a second one of the same process)."""
    tail = f"{pid}.{serial}" if serial else f"{pid}"
    return out.parent / f".{_short(out.name)}.{kind.value}-{tail}"


@dataclass(frozen=True)
class Leftover:
    """A staging or trash directory of ``pid`` found beside OUT."""

    path: Path
    kind: LeftoverKind
    pid: int


def find_leftovers(out: Path) -> list[Leftover]:
    """Staging and trash directories beside ``out`` that belong to ``out``, of any process."""
    pattern = re.compile(rf"\.{re.escape(_short(out.name))}\.(quantport-staging|quantport-old)-(\d+)(?:\.\d+)?")
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:  # no parent yet, or unreadable: nothing to clean (creating OUT reports the error)
        return []
    found = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append(Leftover(entry, LeftoverKind(match[1]), int(match[2])))
    return found


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where ``/proc`` tells."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, counted from field 3 after the command name
    except (OSError, ValueError, IndexError):
        return None
    boot = _boot_time()
    return None if boot is None else boot + ticks / os.sysconf("SC_CLK_TCK")


def owner_is_alive(leftover: Leftover) -> bool:
    """Whether the process that made ``leftover`` may still be running (so it must be left alone)."""
    try:
        os.kill(leftover.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = _process_start(leftover.pid)
    if started is None:
        return True
    try:
        status = leftover.path.lstat()
    except OSError:
        return True
    return started <= max(status.st_mtime, status.st_ctime) + CLOCK_SLACK_S  # else: a later process, same pid


def remove_stale_leftovers(out: Path) -> list[Path]:
    """Remove the leftovers of dead processes beside ``out`` (a warning for each); returns what was removed.

    A trash directory is removed only when OUT exists: without OUT it is the only copy of the previous
    checkpoint (the run died between moving it aside and renaming the new one in), so it is reported and kept.
    """
    removed = []
    for leftover in find_leftovers(out):
        if owner_is_alive(leftover):
            if leftover.pid != os.getpid():
                logger.warning(
                    "process %d is also writing %s (%s); the run that finishes second will fail",
                    leftover.pid,
                    out,
                    leftover.path,
                )
            continue
        if leftover.kind is LeftoverKind.TRASH and not os.path.lexists(out):
            logger.warning(
                "%s holds the previous %s, moved aside by process %d, which stopped before it finished; "
                "kept: rename it back to %s or remove it",
                leftover.path,
                out,
                leftover.pid,
                out,
            )
            continue
        logger.warning(
            "removing %s, left by quantport process %d, which was killed or crashed", leftover.path, leftover.pid
        )
        shutil.rmtree(leftover.path, ignore_errors=True)
        if os.path.lexists(leftover.path):
            logger.warning("could not remove %s; remove it by hand", leftover.path)
        else:
            removed.append(leftover.path)
    return removed

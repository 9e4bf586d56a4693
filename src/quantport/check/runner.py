"""``check_checkpoint``: run every rule module over one checkpoint directory."""

from __future__ import annotations

import logging
from pathlib import Path

from quantport.memory.gc_pause import paused_gc
from quantport.read import UnreadableFileError

from .checkpoint import Checkpoint
from .findings import CheckReport, Engine, Rule
from .qconfig import model_facts, parse_quant_config
from .rules import CONTENT_RULES, FILE_RULES, shards
from .structure import Context
from .witnessed import WitnessedValues

__all__ = ["check_checkpoint"]

logger = logging.getLogger(__name__)

INTERNAL = Rule(
    "check.internal-error",
    "a rule crashed on this checkpoint",
    "report this as a quantport bug, with the checkpoint's file listing (quantport inspect)",
)


def check_checkpoint(
    path: str | Path, engine: Engine | str = Engine.VLLM, witnessed: WitnessedValues | None = None
) -> CheckReport:
    """Check the checkpoint directory ``path`` against ``engine``'s loading rules.

    Only files are read: the JSON configs, the safetensors headers, and the values of scale tensors
    and other small tensors. When a shard is unreadable or missing, only the file and config rules
    run (every tensor rule would report the consequences of the broken shard).

    ``witnessed``: what an export established about the values as it wrote them
    (:class:`~quantport.check.witnessed.WitnessedValues`); the findings are the same, fewer values are read.

    Returns a :class:`CheckReport`; ``report.ok`` is True when there is no error. Raises
    ``FileNotFoundError`` / ``NotADirectoryError`` when ``path`` is not a directory, and
    ``ValueError`` for an unknown engine.
    """
    try:
        engine = Engine(engine)
    except ValueError:
        raise ValueError(f"unknown engine {engine!r}; choose one of: {', '.join(e.value for e in Engine)}") from None
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory; pass the checkpoint directory")
    with paused_gc():  # a check allocates a few objects per tensor and makes no cycles
        return _check(path, engine, witnessed)


def _check(path: Path, engine: Engine, witnessed: WitnessedValues | None) -> CheckReport:
    ckpt = Checkpoint.open(path)
    if witnessed is not None:
        ckpt.witnessed = witnessed
    try:
        qcfg = parse_quant_config(ckpt)
        ctx = Context(ckpt, engine, qcfg, model_facts(ckpt.config))
        report = CheckReport(str(path), engine, qcfg.format.value, tensors=len(ckpt.tensors))
        missing = set((ckpt.index or {}).values()) - set(ckpt.files)
        complete = not ckpt.file_errors and not missing
        if not complete:
            logger.warning("%s: unreadable or missing shards; tensor rules skipped until they are fixed", path)
        for module in FILE_RULES + (CONTENT_RULES if complete else ()):
            name = module.__name__.rsplit(".", 1)[-1]
            try:
                report.findings.extend(module.check(ctx))
            except UnreadableFileError as exc:  # a tensor the header promised cannot be read
                report.findings.append(shards.UNREADABLE.finding(str(exc.path or path), exc.located()))
            except Exception as exc:  # a crash must not hide the other rules' findings
                logger.exception("rule module %s crashed on %s", name, path)
                report.findings.append(INTERNAL.finding(name, f"rules '{name}' crashed: {exc!r}"))
    finally:
        ckpt.close()
    logger.info("checked %s: %d errors, %d warnings", path, len(report.errors), len(report.warnings))
    return report

"""Findings, rules and the report of one checkpoint check.

A :class:`Rule` is one requirement of the engine contract (``shared/reference/engine-contract.md``),
with a stable id such as ``tensor.dtype``. Rule modules declare their rules at import time; every
rule is listed in :data:`RULES`, so the ids, their one-line summaries and the default fixes can be
printed and tested. A rule produces :class:`Finding` objects; :class:`CheckReport` collects them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

__all__ = ["RULES", "CheckReport", "Engine", "Finding", "Rule", "Severity"]


class Severity(str, Enum):
    """How bad a finding is."""

    ERROR = "error"
    """The engine refuses the checkpoint, or loads it and computes garbage."""
    WARNING = "warning"
    """The checkpoint loads, but something is suspicious or loses accuracy."""

    def __str__(self) -> str:
        return self.value


class Engine(str, Enum):
    """The serving engine whose loader the check imitates."""

    VLLM = "vllm"
    """vLLM 0.33 (engine-contract.md §1-§4)."""
    SGLANG = "sglang"
    """SGLang 0.5.23 (engine-contract.md §6)."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in a checkpoint.

    Attributes:
        severity: error or warning.
        rule: stable rule id, e.g. ``tensor.dtype``.
        target: the tensor, module or file concerned.
        message: what is wrong.
        fix: what to do about it.
    """

    severity: Severity
    rule: str
    target: str
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        data = asdict(self)
        data["severity"] = self.severity.value
        return data


RULES: dict[str, Rule] = {}
"""Every rule of the checker, by id."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One requirement, with a stable id, a one-line summary and the usual fix."""

    id: str
    summary: str
    fix: str
    severity: Severity = Severity.ERROR

    def __post_init__(self) -> None:
        if self.id in RULES:
            raise ValueError(f"duplicate rule id {self.id!r}")
        RULES[self.id] = self

    def finding(
        self, target: str, message: str, *, fix: str | None = None, severity: Severity | None = None
    ) -> Finding:
        """A finding of this rule, at the rule's severity unless ``severity`` is given."""
        return Finding(severity or self.severity, self.id, target, message, fix or self.fix)


@dataclass
class CheckReport:
    """Everything :func:`quantport.check.check_checkpoint` found.

    Attributes:
        path: the checkpoint directory.
        engine: the engine whose rules were applied.
        format: ``modelopt``, ``compressed-tensors``, ``mxfp4`` or ``unknown``.
        findings: errors and warnings, in the order the rules ran.
        tensors: number of tensors read from the headers.
    """

    path: str
    engine: Engine
    format: str = "unknown"
    findings: list[Finding] = field(default_factory=list)
    tensors: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARNING]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def rules(self) -> set[str]:
        """Ids of the rules that fired."""
        return {f.rule for f in self.findings}

    def summary(self) -> dict[str, Any]:
        by_rule = Counter(f.rule for f in self.findings)
        return {
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "tensors": self.tensors,
            "by_rule": dict(sorted(by_rule.items())),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "engine": self.engine.value,
            "format": self.format,
            "findings": [f.to_dict() for f in self.findings],
            "summary": self.summary(),
        }

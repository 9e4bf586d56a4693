"""Text rendering of a :class:`CheckReport`: a header line, then one block per finding."""

from __future__ import annotations

from collections import Counter

from .findings import CheckReport

__all__ = ["render_report"]


def render_report(report: CheckReport, *, max_per_rule: int = 20) -> str:
    """A readable table of findings; at most ``max_per_rule`` findings per rule are shown."""
    summary = report.summary()
    verdict = "OK" if report.ok else "FAILED"
    lines = [
        f"quantport check: {report.path}",
        f"  format {report.format}, engine {report.engine}, {report.tensors} tensors: {verdict} "
        f"({summary['errors']} errors, {summary['warnings']} warnings)",
    ]
    if not report.findings:
        return "\n".join(lines) + "\n"
    width = max(len(f.rule) for f in report.findings)
    lines += ["", f"{'SEVERITY':<8}  {'RULE':<{width}}  TARGET"]
    shown: Counter[str] = Counter()
    for finding in sorted(report.findings, key=lambda f: (f.severity.value != "error", f.rule, f.target)):
        shown[finding.rule] += 1
        if shown[finding.rule] > max_per_rule:
            continue
        lines.append(f"{finding.severity.value:<8}  {finding.rule:<{width}}  {finding.target}")
        lines.append(f"{'':<8}  {'':<{width}}    {finding.message}")
        lines.append(f"{'':<8}  {'':<{width}}    fix: {finding.fix}")
    for rule, count in sorted(shown.items()):
        if count > max_per_rule:
            lines.append(f"... and {count - max_per_rule} more {rule} findings (use --json for all)")
    return "\n".join(lines) + "\n"

"""``quantport check``: does a checkpoint follow what the serving engines require?

The checker reads files only (JSON configs, safetensors headers, scale values) and shares no code
with the exporter; it encodes ``shared/reference/engine-contract.md`` rule by rule. Usage::

    from quantport.check import check_checkpoint
    report = check_checkpoint("out/model-nvfp4", engine="vllm")
    assert report.ok, report.errors
"""

from __future__ import annotations

from .findings import RULES, CheckReport, Engine, Finding, Rule, Severity
from .render import render_report
from .runner import check_checkpoint

__all__ = ["RULES", "CheckReport", "Engine", "Finding", "Rule", "Severity", "check_checkpoint", "render_report"]

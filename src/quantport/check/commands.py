"""Command-line entry points: ``quantport check`` and ``quantport inspect``.

The lead's ``quantport.cli`` calls :func:`add_commands` on its subparsers; each command stores a
``func(args) -> int`` default that returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from quantport.errors import QuantportError
from quantport.read import UnreadableFileError

from .findings import Engine
from .render import render_report
from .runner import check_checkpoint

__all__ = ["add_commands", "check_command", "inspect_command", "main"]

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2


def _emit(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _fail(exc: BaseException) -> int:
    """One ``error:`` line on stderr (never a traceback); the usage exit code."""
    text = exc.located() if isinstance(exc, UnreadableFileError) else str(exc)
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or exc}"
    sys.stderr.write(f"error: {' '.join(text.split()) or type(exc).__name__}\n")
    return EXIT_USAGE


def check_command(args: argparse.Namespace) -> int:
    """Exit code 0: no error; 1: errors found; 2: the directory cannot be checked."""
    try:
        report = check_checkpoint(args.checkpoint, args.engine)
    except (QuantportError, OSError, ValueError) as exc:
        return _fail(exc)
    _emit(json.dumps(report.to_dict(), indent=2) if args.json else render_report(report))
    return EXIT_OK if report.ok else EXIT_FINDINGS


def inspect_command(args: argparse.Namespace) -> int:
    """Exit code 0; 1 when a file could not be read (the summary is incomplete); 2 when the directory
    cannot be read."""
    from ..inspect_checkpoint import format_summary, inspect_checkpoint

    try:
        summary = inspect_checkpoint(args.checkpoint)
    except (QuantportError, OSError, ValueError) as exc:
        return _fail(exc)
    _emit(json.dumps(summary.to_dict(), indent=2, default=str) if args.json else format_summary(summary))
    if summary.problems:
        sys.stderr.write(f"error: {len(summary.problems)} problem(s): {summary.problems[0]}\n")
        return EXIT_FINDINGS
    return EXIT_OK


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``check`` and ``inspect`` on an argparse subparsers object (``func`` returns the exit code)."""
    check = subparsers.add_parser(
        "check",
        help="check that a quantized checkpoint loads in vLLM / SGLang (reads files only)",
        description="Check a ModelOpt or compressed-tensors checkpoint against what the engine's loader "
        "requires. Exit code 0 when there is no error, 1 when there are errors, 2 when the "
        "directory cannot be read.",
    )
    check.add_argument("checkpoint", type=Path, help="checkpoint directory")
    check.add_argument(
        "--engine",
        choices=[e.value for e in Engine],
        default=Engine.VLLM.value,
        help="whose loading rules to apply (default vllm)",
    )
    check.add_argument("--json", action="store_true", help="print findings and summary as JSON")
    check.set_defaults(func=check_command)
    inspect = subparsers.add_parser(
        "inspect",
        help="summarise a quantized checkpoint: format, recipe, layer formats, sizes, experts",
        description="Summarise what a checkpoint holds, from its configs and safetensors headers. Exit code 0, "
        "1 when a file cannot be read (the summary lists it), 2 when the directory cannot be read.",
    )
    inspect.add_argument("checkpoint", type=Path, help="checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=inspect_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m quantport.check``) with the same two commands."""
    parser = argparse.ArgumentParser(prog="quantport")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))

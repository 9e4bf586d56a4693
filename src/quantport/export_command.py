"""``quantport export MODEL STATISTICS OUT``: a checkpoint from saved calibration statistics, no calibration.

One calibration (``quantport quantize ... --save-statistics S``) then gives every format: each ``export``
reads the model's weights again (whole, or one layer at a time) and quantizes them with the saved amax.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError
from .quantize_args import EXPORT_FORMATS, add_run_arguments

__all__ = ["add_export_command", "export_command"]


def add_export_command(commands: Any) -> None:
    e = commands.add_parser("export", help="write a checkpoint from saved calibration statistics (no calibration)")
    e.add_argument("model", help="the model the statistics were calibrated on (directory, hub id or bundled name)")
    e.add_argument("statistics", type=Path, help="file written by quantport quantize --save-statistics")
    e.add_argument("out", type=Path, help="output directory (must not exist or be empty, unless --overwrite)")
    e.add_argument("--format", choices=EXPORT_FORMATS, help="checkpoint format (default: the recipe's default)")
    add_run_arguments(e)


def export_command(args: argparse.Namespace, outputs: list) -> None:
    start = time.perf_counter()
    if not args.statistics.is_file():
        raise InvalidArgumentError(
            f"statistics file {args.statistics} does not exist; write one with --save-statistics"
        )
    from .calibration_statistics import apply_statistics, load_statistics
    from .export import ExportFormat, claim_output, export
    from .export.targets import default_format
    from .loading import open_model, resolve_model_dir
    from .state import state_of

    statistics = load_statistics(args.statistics)  # a bad file is refused before the model is read
    outputs.append(claim_output(args.out, overwrite=args.overwrite, source=resolve_model_dir(args.model)))
    model, directory, why = open_model(
        args.model, device=args.device, sequential=args.sequential, progress=not args.quiet
    )
    apply_statistics(model, statistics, args.format)
    state = state_of(model)
    fmt = ExportFormat(args.format) if args.format else default_format(state.recipe.scheme)
    export(
        model,
        outputs[-1],
        fmt,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet,
        allow_check_errors=args.allow_check_errors,
    )
    print(f"quantport: {state.recipe.name} ({fmt.value}) of {directory} from {args.statistics} -> {args.out}")
    print(f"  quantized layers : {len(state.quantized)}, experts modules: {len(state.experts)}")
    print(f"  path             : {state.path} ({why})")
    print(f"  time             : {time.perf_counter() - start:.1f} s")

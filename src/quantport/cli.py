"""Command line: ``quantport quantize | check | inspect | eval``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .calibrate.moe_policy import MoECalibration, MoEInputScales
from .check.commands import add_commands as add_check_commands
from .errors import QuantportError
from .eval_commands import add_commands as add_eval_commands
from .export import ExportFormat, export
from .export.targets import default_format, recipe_for_format
from .loading import load_model
from .pipeline import quantize
from .recipes import PRESETS, KVCacheFormat
from .state import state_of

__all__ = ["main"]


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantport", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quantize", help="calibrate, quantize and export a model")
    q.add_argument("model", help="local model directory, hub id (org/name) or bundled:tiny-llama")
    q.add_argument("out", type=Path, help="output directory (must not exist or be empty, unless --overwrite)")
    q.add_argument("--recipe", required=True, help=f"one of: {', '.join(PRESETS)}")
    q.add_argument("--format", choices=[f.value for f in ExportFormat],
                   help="checkpoint format (default: modelopt when the recipe has a ModelOpt form, "
                        "else compressed-tensors)")
    q.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    q.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    q.add_argument("--calib-batch-size", type=_batch_size, default="auto",
                   help="sequences per forward, or auto (default: from free GPU memory on CUDA, 8 on the CPU)")
    q.add_argument("--calib-text", type=Path, help="UTF-8 text file for calibration (default: bundled English)")
    q.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave modules matching this shell pattern unquantized (repeatable)")
    q.add_argument("--kv-cache", choices=[k.value for k in KVCacheFormat], default=KVCacheFormat.NONE.value)
    q.add_argument("--moe-input-scales", choices=[p.value for p in MoEInputScales], default="shared",
                   help="experts' input scales: one per projection per layer (shared, default) or per expert")
    q.add_argument("--moe-calib", choices=[c.value for c in MoECalibration], default="routed",
                   help="expert statistics from routed tokens (default) or from every token through every expert")
    q.add_argument("--coverage-png", type=Path, metavar="PATH",
                   help="also write a heat map of calibration tokens per expert (MoE models)")
    q.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    q.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    add_check_commands(commands)
    add_eval_commands(commands)
    return parser


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _quantize_command(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    recipe = recipe_for_format(args.recipe, args.format)  # fail on a bad (recipe, format) before loading
    fmt = ExportFormat(args.format) if args.format else default_format(recipe.scheme)
    from .export.shards import check_output_directory

    check_output_directory(args.out, args.overwrite)
    model, directory = load_model(args.model, device=args.device)
    quantize(
        model,
        recipe,
        exclude=args.exclude,
        kv_cache=args.kv_cache,
        calib_text=args.calib_text,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        batch_size=args.calib_batch_size,
        moe_input_scales=args.moe_input_scales,
        moe_calib=args.moe_calib,
        progress=not args.quiet,
    )
    export(model, args.out, fmt, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
           progress=not args.quiet)
    state = state_of(model)
    elapsed = time.perf_counter() - start
    print(f"quantport: {args.recipe} ({fmt.value}) of {directory} -> {args.out}")
    print(f"  quantized layers : {len(state.quantized)}")
    print(f"  excluded layers  : {len(state.excluded)}")
    for name, reason in sorted(state.excluded.items())[:10]:
        print(f"    {name}: {reason}")
    if len(state.excluded) > 10:
        print(f"    ... and {len(state.excluded) - 10} more (see quantport_report.json)")
    print(f"  kv cache         : {state.recipe.kv_cache.value}")
    if state.experts:
        print(f"  experts modules  : {len(state.experts)}")
    if state.coverage is not None:
        for line in state.coverage.summary_lines():
            print(f"    {line}")
        if args.coverage_png:
            from .report.heatmap import write_coverage_heatmap

            print(f"  coverage heat map: {write_coverage_heatmap(state.coverage, args.coverage_png)}")
    print(f"  calibration      : {state.calibration_tokens} tokens")
    print(f"  output size      : {_directory_size(args.out) / 1e6:.1f} MB")
    print(f"  time             : {elapsed:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "quantize":
            _quantize_command(args)
        elif hasattr(args, "func"):
            return args.func(args)
    except QuantportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

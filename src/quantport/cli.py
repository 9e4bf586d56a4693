"""Command line: ``quantport quantize | check | inspect | eval``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# Light imports only: the arguments are checked before torch and transformers are imported (seconds).
from .errors import InterruptedBySignal, InvalidArgumentError, QuantportError
from .loading import resolve_model_dir
from .moe_options import MoECalibration, MoEInputScales
from .quantize_args import (
    EXPORT_FORMATS,
    add_algorithm_arguments,
    add_dataset_arguments,
    add_run_arguments,
    algorithm_from_args,
    calibration_data,
    check_quantize_args,
    positive_int,
)
from .recipes import PRESETS, KVCacheFormat, QuantRecipe

if TYPE_CHECKING:
    from .export import OutputTarget
    from .state import QuantizationState

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error:`` line (exit code 2), like every other quantport error; options are spelled
    out in full (``--calib-sample`` is an error, not ``--calib-samples``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def _parser(*, quantize_only: bool = False) -> argparse.ArgumentParser:
    """The command line; ``quantize_only`` leaves out the commands whose modules import torch."""
    parser = _Parser(prog="quantport", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quantize", help="calibrate, quantize and export a model")
    q.add_argument("model", help="local model directory, hub id (org/name) or bundled:tiny-llama")
    q.add_argument("out", type=Path, help="output directory (must not exist or be empty, unless --overwrite)")
    q.add_argument("--recipe", required=True, help=f"one of: {', '.join(PRESETS)}")
    q.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        help="checkpoint format (default: modelopt when the recipe has a ModelOpt form, else compressed-tensors)",
    )
    q.add_argument("--calib-samples", type=positive_int, default=64, help="calibration sequences (default 64)")
    q.add_argument(
        "--calib-seq-len", type=positive_int, default=512, help="tokens per calibration sequence (default 512)"
    )
    q.add_argument(
        "--calib-batch-size",
        type=_batch_size,
        default="auto",
        help="sequences per forward, or auto (default: from free GPU memory on CUDA, 8 on the CPU)",
    )
    q.add_argument("--calib-text", type=Path, help="UTF-8 text file for calibration (default: bundled English)")
    add_dataset_arguments(q)
    add_run_arguments(q)
    q.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave modules matching this shell pattern unquantized (repeatable)",
    )
    q.add_argument("--kv-cache", choices=[k.value for k in KVCacheFormat], default=KVCacheFormat.NONE.value)
    q.add_argument(
        "--moe-input-scales",
        choices=[p.value for p in MoEInputScales],
        default="shared",
        help="experts' input scales: one per projection per layer (shared, default) or per expert",
    )
    q.add_argument(
        "--moe-calib",
        choices=[c.value for c in MoECalibration],
        default="routed",
        help="expert statistics from routed tokens (default) or from every token through every expert",
    )
    q.add_argument(
        "--coverage-png",
        type=Path,
        metavar="PATH",
        help="also write a plot of calibration tokens per expert per MoE layer (MoE models; needs quantport[plot])",
    )
    add_algorithm_arguments(q)
    q.add_argument(
        "--propagate",
        choices=("unquantized", "quantized"),
        default="unquantized",
        help="layer by layer: each layer is calibrated on the full-precision outputs of the one before (default; "
        "the same result as the whole model) or on its quantized outputs",
    )
    q.add_argument(
        "--resume",
        action="store_true",
        help="layer by layer: save the calibration progress as layers finish, and go on from the progress a killed "
        "or interrupted run with --resume left for the same OUT (same recipe, model and calibration data)",
    )
    q.add_argument(
        "--save-statistics",
        type=Path,
        metavar="PATH",
        help="also save what calibration found (safetensors), to export other formats later with quantport export",
    )
    if not quantize_only:
        from .check.commands import add_commands as add_check_commands
        from .eval_commands import add_commands as add_eval_commands
        from .export_command import add_export_command

        add_check_commands(commands)
        add_export_command(commands)
        add_eval_commands(commands)
    return parser


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _print_algorithm(state: Any) -> None:
    print(f"  algorithm        : {state.algorithm}")
    for name, reason in sorted(state.left_at_rtn.items())[:10]:
        print(f"    round-to-nearest {name}: {reason}")
    if len(state.left_at_rtn) > 10:
        print(f"    ... and {len(state.left_at_rtn) - 10} more at round-to-nearest (see quantport_report.json)")
    for name, note in sorted(state.algorithm_notes.items())[:10]:
        print(f"    {name}: {note}")
    if len(state.algorithm_notes) > 10:
        print(f"    ... and {len(state.algorithm_notes) - 10} more notes (see quantport_report.json)")


def _quantize_command(args: argparse.Namespace, outputs: list[OutputTarget]) -> None:
    start = time.perf_counter()
    check_quantize_args(args)  # every argument, before torch is imported and before OUT is claimed
    from .distributed import distributed_command

    with distributed_command():  # under torchrun: a failure on one rank stops every rank with its message
        _quantize_checked(args, outputs, start)


def _quantize_checked(args: argparse.Namespace, outputs: list[OutputTarget], start: float) -> None:
    from .distributed import current_session, rank_device, writes_checkpoint
    from .export import ExportFormat, claim_output, export
    from .export.targets import default_format, recipe_for_format
    from .loading import open_model, resolve_device
    from .pipeline import quantize
    from .state import state_of

    recipe = recipe_for_format(args.recipe, args.format)  # fail on a bad (recipe, format) before loading
    fmt = ExportFormat(args.format) if args.format else default_format(recipe.scheme)
    device = rank_device(args.device)  # under torchrun: the rank's own GPU
    current_session(resolve_device(device))  # --device cuda without a GPU; joins a torchrun run
    _check_coverage_recipe(args, recipe)
    # OUT is decided and proven writable once, before loading; main() removes its staging directory on failure
    if writes_checkpoint():  # under torchrun: rank 0 only
        outputs.append(
            claim_output(args.out, overwrite=args.overwrite, source=_local_model(args.model), resume=args.resume)
        )
    layered = args.resume or args.propagate != "unquantized"  # options of the layer-by-layer path
    sequential = True if layered and args.sequential is None else args.sequential
    model, directory, why = open_model(args.model, device=device, sequential=sequential, progress=not args.quiet)
    quantize(
        model,
        recipe,
        calibration_data(args),
        exclude=args.exclude,
        kv_cache=args.kv_cache,
        calib_text=args.calib_text,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        batch_size=args.calib_batch_size,
        moe_input_scales=args.moe_input_scales,
        moe_calib=args.moe_calib,
        progress=not args.quiet,
        format=fmt.value,  # a form known not to load is refused before calibration
        allow_check_errors=args.allow_check_errors,
        algorithm=algorithm_from_args(args),
        **({"resume_dir": outputs[-1].resume_dir} if args.resume and outputs else {}),
        **({"propagate": args.propagate} if args.propagate != "unquantized" else {}),
    )
    if args.save_statistics is not None:  # first: a failed export still leaves the calibration
        from .calibration_statistics import save_statistics

        save_statistics(model, args.save_statistics)
    export(
        model,
        outputs[-1] if outputs else args.out,
        fmt,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet,
        allow_check_errors=args.allow_check_errors,
    )
    if writes_checkpoint():  # under torchrun: rank 0 only
        _print_summary(args, fmt.value, directory, state_of(model), why, time.perf_counter() - start)


def _print_summary(
    args: argparse.Namespace, fmt: str, directory: Path, state: QuantizationState, why: str, elapsed: float
) -> None:
    print(f"quantport: {args.recipe} ({fmt}) of {directory} -> {args.out}")
    print(f"  quantized layers : {len(state.quantized)}")
    print(f"  excluded layers  : {len(state.excluded)}")
    for name, reason in sorted(state.excluded.items())[:10]:
        print(f"    {name}: {reason}")
    if len(state.excluded) > 10:
        print(f"    ... and {len(state.excluded) - 10} more (see quantport_report.json)")
    print(f"  kv cache         : {state.recipe.kv_cache.value}")
    _print_algorithm(state)
    if state.experts:
        print(f"  experts modules  : {len(state.experts)}")
    if state.coverage is not None:
        for line in state.coverage.summary_lines():
            print(f"    {line}")
        if args.coverage_png:
            from .report.coverage_plot import PlotContext, write_coverage_plot

            context = PlotContext(args.model, args.recipe, state.calibration_tokens)
            print(f"  coverage plot    : {write_coverage_plot(state.coverage, args.coverage_png, context)}")
    print(f"  calibration      : {state.calibration_tokens} tokens")
    print(f"  path             : {state.path} ({why})")
    _print_memory(state.memory)
    print(f"  output size      : {_directory_size(args.out) / 1e6:.1f} MB")
    print(f"  time             : {elapsed:.1f} s")


def _print_memory(memory: dict | None) -> None:
    if memory is None:
        return
    peaks = [f"host RSS {memory['peak_host_rss_bytes'] / 2**30:.2f} GiB"]
    if "peak_device_bytes" in memory:
        peaks.insert(0, f"{memory['device']} {memory['peak_device_bytes'] / 2**30:.2f} GiB")
    print(f"  peak memory      : {', '.join(peaks)}")


def _check_coverage_recipe(args: argparse.Namespace, recipe: QuantRecipe) -> None:
    """The coverage plot needs matplotlib, and calibration, which weight-only recipes without a KV-cache format skip."""
    from .report.coverage_plot import require_matplotlib
    from .schemes import codec_for

    if args.coverage_png is not None:
        require_matplotlib()  # before calibration, not after it
    if args.coverage_png is not None and not codec_for(recipe.scheme).static_input_scale and args.kv_cache == "none":
        raise InvalidArgumentError(
            f"--coverage-png {args.coverage_png}: recipe {args.recipe} is weight-only, so nothing is calibrated "
            "and there is no expert coverage to draw; add --kv-cache fp8, use a recipe with activation scales "
            "(fp8, nvfp4), or drop --coverage-png"
        )


def _local_model(model: str) -> Path | None:
    """MODEL's directory when it is on this machine already (a path or a bundled model), else None (a hub
    model: OUT is checked against its download directory by export())."""
    with contextlib.suppress(QuantportError, OSError):
        if Path(model).expanduser().is_dir() or model.startswith("bundled:"):
            return resolve_model_dir(model)
    return None


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise InterruptedBySignal(signum)


@contextlib.contextmanager
def _signals_stop_the_run() -> Iterator[None]:
    """SIGTERM raises :class:`InterruptedBySignal` (a ``KeyboardInterrupt``, as SIGINT raises), so the clean-up
    that a Ctrl-C runs also runs for ``kill``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _abort(outputs: list[OutputTarget]) -> list[Path]:
    """Remove the staging directories of unfinished outputs, deaf to further signals; returns those removed."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        return [removed for target in outputs if (removed := target.abort()) is not None]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _left_behind(outputs: list[OutputTarget], removed: list[Path]) -> str:
    written = [target.path for target in outputs if target.committed]
    kept = [target.kept for target in outputs if target.kept is not None]
    if kept:
        return f"kept the calibration progress in {kept[0]}: run the same command with --resume to go on"
    if removed:
        return f"removed the partial output {removed[0]}"
    return f"{written[0]} was complete before it" if written else "nothing was left behind"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; 0 on success, 2 (one ``error:`` line on stderr) on bad input, an OS error or a signal."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser(quantize_only=argv[:1] == ["quantize"]).parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    outputs: list[OutputTarget] = []
    try:
        with _signals_stop_the_run():
            if args.command == "quantize":
                _quantize_command(args, outputs)
            elif args.command == "export":
                from .export_command import export_command

                export_command(args, outputs)
            elif hasattr(args, "func"):
                return args.func(args)
    except KeyboardInterrupt as exc:
        removed = _abort(outputs)
        name = signal.Signals(exc.signum).name if isinstance(exc, InterruptedBySignal) else "SIGINT"
        print(f"error: interrupted by {name}; {_left_behind(outputs, removed)}", file=sys.stderr)
        return 2
    except (QuantportError, ValueError) as exc:
        _abort(outputs)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        _abort(outputs)
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

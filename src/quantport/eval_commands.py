"""``quantport eval BASE QUANT``: perplexity of both models and KL(base || quant) on held-out text.

``BASE`` is the unquantized model (a directory, hub id or ``bundled:`` name, loaded with transformers);
``QUANT`` a quantized checkpoint, read with :func:`quantport.loader.load` with activations simulated as
the engine computes them (``--weights-only``: dequantized weights, full-precision activations).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, QuantportError
from .evaluate import EvalDataError, EvalResult, eval_batches, evaluate
from .export import TOKENIZER_FILES

__all__ = ["add_commands", "run_eval"]

logger = logging.getLogger(__name__)


def add_commands(subparsers: Any) -> None:
    """Register ``eval`` on an ``argparse`` subparsers object (``args.func(args)`` returns the exit code)."""
    parser = subparsers.add_parser(
        "eval",
        help="perplexity and KL divergence of a quantized checkpoint against its base model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base", help="unquantized model: local directory, hub id (org/name) or bundled:NAME")
    parser.add_argument("quant", help="quantized checkpoint directory (as quantport quantize writes it)")
    parser.add_argument("--text", type=Path, help="UTF-8 text file to evaluate on (default: bundled English)")
    parser.add_argument("--samples", type=int, default=32, help="sequences to score (default 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward (default 4)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="dequantized weights only: do not simulate activation or KV-cache quantization",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or info logs")
    parser.set_defaults(func=run_eval)


def _tokenizer(*directories: Path) -> Any:
    from transformers import AutoTokenizer

    for directory in directories:
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            continue  # transformers would build an empty tokenizer from the config alone
        try:
            return AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as exc:
            logger.warning("could not load the tokenizer in %s: %s", directory, exc)
    raise ModelLoadError(f"no tokenizer found in {' or '.join(map(str, directories))}; copy the tokenizer files there")


def _check_length(model: Any, seq_len: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise EvalDataError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}")


def _summary(args: argparse.Namespace, result: EvalResult, sequences: int, seconds: float) -> dict[str, Any]:
    return {
        "base": str(args.base),
        "quant": str(args.quant),
        "text": str(args.text) if args.text else "bundled:eval_en.txt",
        "sequences": sequences,
        "seq_len": args.seq_len,
        "simulate_activations": not args.weights_only,
        **result.to_dict(),
        "ppl_ratio": result.ppl_quant / result.ppl_base,
        "seconds": round(seconds, 2),
    }


def _format(summary: dict[str, Any]) -> str:
    change = 100.0 * (summary["ppl_ratio"] - 1.0)
    mode = "simulated activations" if summary["simulate_activations"] else "weights only"
    return "\n".join(
        [
            f"quantport eval: {summary['quant']} against {summary['base']} ({mode})",
            f"  text         : {summary['text']}, {summary['sequences']} x {summary['seq_len']} tokens"
            f" ({summary['tokens']} scored)",
            f"  ppl base     : {summary['ppl_base']:.4f}",
            f"  ppl quant    : {summary['ppl_quant']:.4f} ({change:+.2f}%)",
            f"  KL(base||q)  : {summary['kl_mean']:.6f} nats/token",
            f"  time         : {summary['seconds']:.1f} s",
        ]
    )


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from .loader import load, validate_files
    from .loading import load_model, resolve_device, resolve_model_dir

    start = time.perf_counter()
    device = resolve_device(args.device)
    quant_dir = resolve_model_dir(args.quant)
    validate_files(quant_dir)  # a corrupt checkpoint fails before the base model is loaded
    base_model, base_dir = load_model(args.base, device=str(device))
    _check_length(base_model, args.seq_len)
    batches = eval_batches(
        _tokenizer(base_dir, quant_dir),
        text_path=args.text,
        samples=args.samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    quant_model = load(quant_dir, simulate_activations=not args.weights_only, device=device)
    result = evaluate(base_model, quant_model, batches, progress=not args.quiet)
    return _summary(args, result, sum(b.shape[0] for b in batches), time.perf_counter() - start)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``quantport eval``; returns the process exit code (0, or 2 on a user-facing error: a missing
    or corrupt checkpoint, a bad config, unreadable files; one ``error:`` line on stderr)."""
    try:
        summary = _run(args)
    except NotImplementedError as exc:
        print(f"error: {exc} (with quantport eval: --weights-only)", file=sys.stderr)  # noqa: T201
        return 2
    except (QuantportError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # noqa: T201
        return 2
    except OSError as exc:  # a file vanished or could not be read: name it, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(json.dumps(summary, indent=2) if args.json else _format(summary))  # noqa: T201
    return 0

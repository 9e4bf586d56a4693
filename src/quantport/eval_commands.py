"""``quantport eval BASE QUANT``: perplexity of both models and KL(base || quant) on held-out text, or
with ``--tasks``, their accuracy on lm-evaluation-harness tasks.

``BASE`` is the unquantized model (a directory, hub id or ``bundled:`` name, loaded with transformers);
``QUANT`` a quantized checkpoint, read with :func:`quantport.loader.load` with activations simulated as
the engine computes them (``--weights-only``: dequantized weights, full-precision activations).

``--tasks hellaswag,arc_easy`` (or paths of local task YAML files or directories) runs lm_eval on both
models, one after the other, and prints each metric for both and the recovery (quantized / base).
Needs ``pip install "quantport[lm-eval]"``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError, ModelLoadError, QuantportError
from .evaluate import EvalDataError, EvalResult, check_same_model, eval_batches, evaluate
from .export import TOKENIZER_FILES
from .quantize_args import non_negative_int, positive_int

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
    parser.add_argument("--batch-size", type=int, default=4, help="sequences or task requests per forward (default 4)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="dequantized weights only: do not simulate activation or KV-cache quantization",
    )
    tasks = parser.add_argument_group("accuracy on lm-evaluation-harness tasks (needs quantport[lm-eval])")
    tasks.add_argument(
        "--tasks",
        metavar="TASKS",
        help="comma-separated lm_eval task names or paths of task YAML files / directories; "
        "replaces the perplexity evaluation",
    )
    tasks.add_argument("--limit", type=positive_int, metavar="N", help="score the first N documents of each task")
    tasks.add_argument(
        "--num-fewshot", type=non_negative_int, metavar="K", help="few-shot examples per prompt (default: the task's)"
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


def _check_pair(args: argparse.Namespace) -> tuple[Path, Path]:
    """(base directory, quantized directory), checked to be one model before any weights are loaded."""
    from .loader import validate_files
    from .loading import read_model_config, resolve_model_dir

    quant_dir = resolve_model_dir(args.quant)
    validate_files(quant_dir)  # a corrupt checkpoint fails before the base model is loaded
    base_dir = resolve_model_dir(args.base)
    check_same_model(read_model_config(base_dir), read_model_config(quant_dir))
    return base_dir, quant_dir


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from .loader import load
    from .loading import load_model, resolve_device

    if args.limit is not None or args.num_fewshot is not None:
        raise InvalidArgumentError("--limit and --num-fewshot apply to --tasks only")
    start = time.perf_counter()
    device = resolve_device(args.device)
    base_dir, quant_dir = _check_pair(args)
    base_model, base_dir = load_model(base_dir, device=str(device))
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


def _run_tasks(args: argparse.Namespace) -> dict[str, Any]:
    """``--tasks``: the tasks on the base model, then on the quantized one (one model in memory at a time)."""
    from .eval_tasks import TaskOptions, compare_results, parse_tasks, require_lm_eval, resolve_tasks, score_tasks
    from .loader import load
    from .loading import load_model, resolve_device

    start = time.perf_counter()
    require_lm_eval()
    device = resolve_device(args.device)
    base_dir, quant_dir = _check_pair(args)
    tasks = resolve_tasks(parse_tasks(args.tasks))  # an unknown task fails before any model is loaded
    options = TaskOptions(limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size)
    tokenizer = _tokenizer(base_dir, quant_dir)
    base_model, _ = load_model(base_dir, device=str(device), progress=not args.quiet)
    base = score_tasks(base_model, tokenizer, tasks, options)
    del base_model
    gc.collect()
    quant_model = load(quant_dir, simulate_activations=not args.weights_only, device=device)
    quantized = score_tasks(quant_model, tokenizer, tasks, options)
    return {
        "base": str(args.base),
        "quant": str(args.quant),
        "tasks": list(tasks.specs),
        "limit": args.limit,
        "num_fewshot": args.num_fewshot,
        "simulate_activations": not args.weights_only,
        "scores": [score.to_dict() for score in compare_results(base, quantized)],
        "samples": {task: counts.get("effective") for task, counts in base.get("n-samples", {}).items()},
        "seconds": round(time.perf_counter() - start, 2),
    }


def _format_tasks(summary: dict[str, Any]) -> str:
    from .eval_tasks import TaskScore, format_scores

    mode = "simulated activations" if summary["simulate_activations"] else "weights only"
    scores = [TaskScore.from_dict(score) for score in summary["scores"]]
    return "\n".join(
        [
            f"quantport eval: {summary['quant']} against {summary['base']} ({mode})",
            format_scores(scores),
            f"time: {summary['seconds']:.1f} s",
        ]
    )


def run_eval(args: argparse.Namespace) -> int:
    """Run ``quantport eval``; returns the process exit code (0, or 2 on a user-facing error: a missing
    or corrupt checkpoint, a bad config, unreadable files; one ``error:`` line on stderr)."""
    try:
        summary = _run_tasks(args) if args.tasks else _run(args)
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
    text = _format_tasks(summary) if args.tasks else _format(summary)
    print(json.dumps(summary, indent=2) if args.json else text)  # noqa: T201
    return 0

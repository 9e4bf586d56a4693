"""The arguments of ``quantport quantize``, checked before torch or transformers is imported.

The checks read the command line, the file system and the model's ``config.json`` only, so a wrong
argument is one ``error:`` line in well under a second, before any weight is loaded or anything is written.
Argument types (:func:`positive_int`, :func:`shard_size`, :func:`device_name`) run inside ``argparse``;
:func:`check_quantize_args` runs the checks that need several arguments or the model's config.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .algorithm_options import (
    COMBINATIONS,
    Algorithm,
    AlgorithmOptions,
    AwqOptions,
    ExpertGptqPolicy,
    GptqOptions,
    MseOptions,
    SmoothQuantOptions,
    algorithm_options,
)
from .calibration_sources import CalibrationData, CalibrationSource, locate, require_datasets
from .dialects import ExportFormat
from .errors import AlreadyQuantizedError, CalibrationDataError, InvalidArgumentError
from .loading import is_dequantizing_source, read_model_config, resolve_model_dir
from .recipes import QuantRecipe, get_recipe
from .sizes import parse_size

__all__ = [
    "add_algorithm_arguments",
    "algorithm_from_args",
    "EXPORT_FORMATS",
    "MOE_CONFIG_KEYS",
    "QuantizeInputs",
    "add_dataset_arguments",
    "calibration_data",
    "check_calib_datasets",
    "check_calib_text",
    "check_quantize_args",
    "device_name",
    "is_moe_config",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "shard_size",
]

EXPORT_FORMATS = tuple(fmt.value for fmt in ExportFormat)
"""The values of :class:`quantport.export.ExportFormat` (read from :mod:`quantport.dialects`, without torch)."""

MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""``config.json`` keys that give the number of routed experts in the MoE families quantport reads
(Qwen2/3-MoE and OLMoE, Mixtral / Llama 4 / GPT-OSS, DeepSeek-V3, and others)."""

_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)")
_SNIFF_BYTES = 64 << 10


def positive_int(value: str) -> int:
    """``argparse`` type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def non_negative_int(value: str) -> int:
    """``argparse`` type: an integer >= 0."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def positive_float(value: str) -> float:
    """``argparse`` type: a finite number > 0."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not (0 < number < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def shard_size(value: str) -> int:
    """``argparse`` type for ``--max-shard-size``: :func:`parse_size`."""
    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def device_name(value: str) -> str:
    """``argparse`` type for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (availability is checked
    when torch is imported)."""
    if _DEVICE.fullmatch(value) is None:
        raise argparse.ArgumentTypeError(f"unknown device {value!r}; use cpu, cuda, cuda:N or auto")
    return value


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else {}


def is_moe_config(config: dict[str, Any]) -> bool:
    """Whether ``config.json`` (or its ``text_config``) describes routed experts."""
    return any(
        isinstance(part.get(key), int) and not isinstance(part.get(key), bool) and part[key] > 1
        for part in (config, _text_config(config))
        for key in MOE_CONFIG_KEYS
    )


def _max_positions(config: dict[str, Any]) -> int | None:
    for part in (config, _text_config(config)):
        value = part.get("max_position_embeddings")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_calib_text(path: Path, option: str = "--calib-text") -> None:
    """A readable regular file whose start decodes as UTF-8 text (its start only: the rest is read lazily)."""
    if not path.exists():
        raise CalibrationDataError(f"{option} {path} does not exist; give a UTF-8 text file")
    if path.is_dir():
        raise CalibrationDataError(f"{option} {path} is a directory; give a UTF-8 text file inside it")
    if not path.is_file():
        raise CalibrationDataError(f"{option} {path} is not a regular file; give a UTF-8 text file")
    try:
        with path.open("rb") as handle:
            start = handle.read(_SNIFF_BYTES)
    except OSError as exc:
        raise CalibrationDataError(f"{option} {path} cannot be read ({exc.strerror}); fix its permissions") from exc
    try:
        codecs.getincrementaldecoder("utf-8")().decode(start, final=False)
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(
            f"{option} {path} is not UTF-8 text (invalid byte at offset {exc.start}); convert it to UTF-8 "
            "or give another file"
        ) from None
    if b"\x00" in start:
        raise CalibrationDataError(f"{option} {path} is a binary file (it holds NUL bytes); give a UTF-8 text file")


_DATASET_OPTIONS = {
    "calib_weight": "--calib-weight",
    "calib_split": "--calib-split",
    "calib_text_field": "--calib-text-field",
    "calib_messages_field": "--calib-messages-field",
    "calib_seed": "--calib-seed",
}


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``quantport quantize`` that calibrate on data sets (see :mod:`quantport.calibration_sources`)."""
    parser.add_argument(
        "--calib-dataset",
        action="append",
        metavar="SOURCE",
        help="calibrate on a data set instead of the bundled text: a local .jsonl/.json/.parquet/.csv/.txt file, "
        "a directory of such files, or a Hugging Face Hub id (streamed; needs quantport[datasets]). Repeat to mix "
        "several. Rows are text (--calib-text-field) or chats, a 'messages' list of {role, content} rendered "
        "with the model's chat template and tokenized as the model sees them when served; rows are packed into "
        "--calib-seq-len sequences and read only as far as --calib-samples needs",
    )
    parser.add_argument(
        "--calib-weight",
        action="append",
        type=positive_float,
        metavar="W",
        help="share of the calibration sequences for each --calib-dataset, in the same order: none (equal "
        "shares) or one per data set, e.g. --calib-dataset a.jsonl --calib-weight 0.7 --calib-dataset "
        "b.parquet --calib-weight 0.3 (weights are relative: 7 and 3 mean the same). A weight is its own "
        "option, not a suffix of SOURCE, so paths and ids may hold ':' (C:\\data\\a.jsonl)",
    )
    parser.add_argument("--calib-split", metavar="SPLIT", help="split of the data sets to read (default train)")
    parser.add_argument("--calib-text-field", metavar="FIELD", help="field holding plain text (default text)")
    parser.add_argument(
        "--calib-messages-field",
        metavar="FIELD",
        help="field holding a chat (default: messages, when the rows have it)",
    )
    parser.add_argument(
        "--calib-seed",
        type=non_negative_int,
        metavar="SEED",
        help="seed of the shuffles of the data sets' files, rows and sequences (default 0: the same data every run)",
    )


def check_calib_datasets(args: argparse.Namespace) -> None:
    """The data set options agree with each other, local sources exist, and ``datasets`` is installed."""
    datasets = args.calib_dataset or []
    if not datasets:
        given = [flag for key, flag in _DATASET_OPTIONS.items() if getattr(args, key) is not None]
        if given:
            raise InvalidArgumentError(f"{given[0]} applies to --calib-dataset only; add --calib-dataset SOURCE")
        return
    if args.calib_text is not None:
        raise InvalidArgumentError("--calib-text and --calib-dataset exclude each other; give one of them")
    weights = args.calib_weight or []
    if weights and len(weights) != len(datasets):
        raise InvalidArgumentError(
            f"{len(weights)} --calib-weight for {len(datasets)} --calib-dataset; give one weight per data set, "
            "in the same order, or none for equal shares"
        )
    data = calibration_data(args)
    for source in data.sources if data is not None else ():
        locate(source)
    require_datasets()


def calibration_data(args: argparse.Namespace) -> CalibrationData | None:
    """The :class:`CalibrationData` that the command line asks for, or None (the bundled or --calib-text text)."""
    if not args.calib_dataset:
        return None
    weights = args.calib_weight or [1.0] * len(args.calib_dataset)
    sources = tuple(
        CalibrationSource(
            name,
            weight=weight,
            split=args.calib_split or "train",
            text_field=args.calib_text_field,
            messages_field=args.calib_messages_field,
        )
        for name, weight in zip(args.calib_dataset, weights, strict=True)
    )
    return CalibrationData(sources, seed=args.calib_seed or 0)


def _check_coverage_png(path: Path, config: dict[str, Any], model: str) -> None:
    if not is_moe_config(config):
        raise InvalidArgumentError(
            f"--coverage-png {path}: {model} is not a Mixture-of-Experts model (its config.json has none of "
            f"{', '.join(MOE_CONFIG_KEYS)}), so there is no expert coverage to draw; drop --coverage-png"
        )
    if path.is_dir():
        raise InvalidArgumentError(
            f"--coverage-png {path} is a directory; give a file name such as {path / 'coverage.png'}"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidArgumentError(f"--coverage-png {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"--coverage-png {path}: directory {parent} is not writable; choose another path")


def _check_statistics_path(path: Path, algorithm: str) -> None:
    if algorithm != "max":
        raise InvalidArgumentError(
            f"--save-statistics keeps amax values only; --algorithm {algorithm} also changes weights: drop one of them"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InvalidArgumentError(f"--save-statistics {path} is a directory; give a file path")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"--save-statistics {path}: directory {parent} does not exist or is not writable")


def _check_not_quantized(config: dict[str, Any], directory: Path, sequential: bool | None) -> None:
    if is_dequantizing_source(config):  # FP8 blocks / MXFP4: dequantized a layer at a time
        if sequential is False:
            method = config["quantization_config"]["quant_method"]
            raise InvalidArgumentError(
                f"{directory} is {method}-quantized: quantport reads it only layer by layer; drop --no-sequential"
            )
        return
    for part in (config, _text_config(config)):
        qconfig = part.get("quantization_config")
        if qconfig is not None:
            method = qconfig.get("quant_method", "unknown") if isinstance(qconfig, dict) else "unknown"
            raise AlreadyQuantizedError(
                f"{directory} is already quantized (config.json quantization_config, quant_method {method!r}); "
                "quantport quantizes full-precision (bf16/fp16/fp32) checkpoints, and FP8 128x128-block and "
                "MXFP4 ones layer by layer: give the original unquantized model"
            )


@dataclass(frozen=True)
class QuantizeInputs:
    """What the checks found out, for the command to use.

    Attributes:
        recipe: the preset named by ``--recipe`` (before ``--format`` picks its variant).
        directory: the model's local directory.
        config: its ``config.json``.
    """

    recipe: QuantRecipe
    directory: Path
    config: dict[str, Any]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a checkpoint is computed and how it is written: shared by ``quantize`` and ``export``."""
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read, calibrate and write one decoder layer at a time, so any model runs on one device (default: "
        "when the weights do not fit the device's free memory, or the checkpoint is FP8-block or MXFP4)",
    )
    parser.add_argument(
        "--max-shard-size", type=shard_size, default="5GB", help="largest safetensors shard (default 5GB)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    parser.add_argument(
        "--allow-check-errors",
        action="store_true",
        help="write the checkpoint even when it is a form known not to load in its engine or quantport "
        "check finds errors in it (they are logged as warnings)",
    )


def add_algorithm_arguments(parser: argparse.ArgumentParser) -> None:
    """``--algorithm`` and the typed options of each algorithm (``--gptq-*``, ``--mse-*``)."""
    parser.add_argument(
        "--algorithm",
        choices=[*(a.value for a in Algorithm), *COMBINATIONS],
        default=Algorithm.MAX.value,
        help="how weights and scales are chosen: max (round to nearest, default), mse (scale search), gptq, awq, "
        "smoothquant (per-input-channel scales folded into the preceding norm or Linear), awq+gptq, smoothquant+gptq",
    )
    gptq, mse, awq, smooth = GptqOptions(), MseOptions(), AwqOptions(), SmoothQuantOptions()
    parser.add_argument(
        "--gptq-damp", type=float, metavar="F", help=f"GPTQ dampening, fraction of the mean diagonal ({gptq.damp})"
    )
    parser.add_argument("--gptq-act-order", action="store_true", help="GPTQ columns by decreasing input energy")
    parser.add_argument(
        "--gptq-block-size", type=positive_int, metavar="N", help=f"GPTQ lazy-update columns ({gptq.block_size})"
    )
    parser.add_argument(
        "--gptq-static-groups", action="store_true", help="GPTQ group scales from the weights before any update"
    )
    parser.add_argument(
        "--gptq-no-experts", action="store_true", help="GPTQ dense layers only; MoE experts keep round-to-nearest"
    )
    parser.add_argument(
        "--gptq-expert-policy",
        choices=[p.value for p in ExpertGptqPolicy],
        help=f"GPTQ for experts with few routed tokens: dampen, all-experts or rtn ({gptq.expert_policy.value})",
    )
    parser.add_argument(
        "--gptq-expert-min-tokens",
        type=positive_int,
        metavar="N",
        help="routed tokens an expert needs for its own Hessian (default: the expert's input size)",
    )
    parser.add_argument(
        "--gptq-expert-chunk",
        type=positive_int,
        metavar="N",
        help="experts per MoE layer whose Hessians are held at once; each chunk costs a forward (default: fit 4 GiB)",
    )
    parser.add_argument(
        "--mse-min-ratio", type=float, metavar="F", help=f"smallest clipping ratio MSE tries ({mse.min_ratio})"
    )
    parser.add_argument("--mse-steps", type=positive_int, metavar="N", help=f"MSE ratios tried below 1 ({mse.steps})")
    parser.add_argument(
        "--awq-grid", type=positive_int, metavar="N", help=f"AWQ strengths tried in [0, 1] ({awq.grid})"
    )
    parser.add_argument(
        "--awq-clip",
        action=argparse.BooleanOptionalAction,
        help=f"AWQ also searches weight clipping on the outputs ({'on' if awq.clip else 'off'})",
    )
    parser.add_argument(
        "--smoothquant-alpha", type=float, metavar="F", help=f"SmoothQuant migration strength ({smooth.alpha})"
    )


def _flag(option: str) -> str:
    return "no-experts" if option == "experts" else option.replace("_", "-")


def algorithm_from_args(args: argparse.Namespace) -> AlgorithmOptions:
    """The typed options ``--algorithm`` and its option flags describe; flags of another algorithm are refused."""
    chosen = algorithm_options(args.algorithm)
    given = {
        Algorithm.GPTQ: {
            "damp": args.gptq_damp,
            "act_order": args.gptq_act_order or None,
            "block_size": args.gptq_block_size,
            "static_groups": args.gptq_static_groups or None,
            "experts": False if getattr(args, "gptq_no_experts", False) else None,
            "expert_policy": getattr(args, "gptq_expert_policy", None),
            "expert_min_tokens": getattr(args, "gptq_expert_min_tokens", None),
            "expert_chunk": getattr(args, "gptq_expert_chunk", None),
        },
        Algorithm.MSE: {"min_ratio": args.mse_min_ratio, "steps": args.mse_steps},
        Algorithm.AWQ: {"grid": args.awq_grid, "clip": args.awq_clip},
        Algorithm.SMOOTHQUANT: {"alpha": args.smoothquant_alpha},
    }
    inner = getattr(chosen, "then", None)
    applies = {chosen.algorithm} | ({inner.algorithm} if inner is not None else set())
    for algorithm, values in given.items():
        flags = [f"--{algorithm.value}-{_flag(k)}" for k, v in values.items() if v is not None]
        if flags and algorithm not in applies:
            raise InvalidArgumentError(
                f"{' '.join(flags)} apply to --algorithm {algorithm.value}, not {args.algorithm}"
            )
    values = {k: v for k, v in given.get(chosen.algorithm, {}).items() if v is not None}
    if inner is not None:
        inner_values = {k: v for k, v in given[inner.algorithm].items() if v is not None}
        values["then"] = type(inner)(**inner_values)
    return type(chosen)(**values) if values else chosen


def check_quantize_args(args: argparse.Namespace) -> QuantizeInputs:
    """Every check of ``quantport quantize``'s arguments that needs no torch; raises a ``QuantportError``.

    Local paths are checked before MODEL is resolved (a hub id is downloaded), the model's config after.
    """
    recipe = get_recipe(args.recipe)
    algorithm_from_args(args)
    if args.calib_text is not None:
        check_calib_text(args.calib_text)
    check_calib_datasets(args)
    directory = resolve_model_dir(args.model)
    config = read_model_config(directory)
    _check_not_quantized(config, directory, args.sequential)
    limit = _max_positions(config)
    if limit is not None and args.calib_seq_len > limit:
        raise InvalidArgumentError(
            f"--calib-seq-len {args.calib_seq_len} exceeds the model's max_position_embeddings {limit}; "
            f"use --calib-seq-len {min(limit, 512)} or less"
        )
    if args.coverage_png is not None:
        _check_coverage_png(args.coverage_png, config, args.model)
    if args.save_statistics is not None:
        _check_statistics_path(args.save_statistics, args.algorithm)
    if args.propagate != "unquantized" and args.sequential is False:
        raise InvalidArgumentError("--propagate quantized runs layer by layer: drop --no-sequential")
    if args.resume and args.sequential is False:
        raise InvalidArgumentError("--resume saves progress layer by layer: drop --no-sequential")
    return QuantizeInputs(recipe=recipe, directory=directory, config=config)

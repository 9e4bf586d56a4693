"""export(): write a quantized model as a checkpoint that serving engines load as it is."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from ..distributed import (
    commit_when_all_agree,
    committed_by_rank_zero,
    failures_shared,
    progress_here,
    writes_checkpoint,
    written_by_rank_zero,
)
from ..distributed.shard_writers import shards_written, staging_shared, writes_in_shares
from ..memory.gc_pause import paused_gc
from ..memory.mapped_weights import MappedWeights
from ..state import QuantizationState, state_of
from ..version import __version__
from .content import CheckpointContent
from .durable import os_error
from .output_dir import OutputTarget, claim_output
from .self_check import check_written, refuse_known_failure
from .shards import ShardSelection, write_json, write_sharded_safetensors
from .targets import TARGETS, ExportFormat, check_exportable, default_format, parse_format, recipe_for_format
from .unquantized import excluded_modules
from .value_witness import ValueWitness

__all__ = ["ExportFormat", "OutputTarget", "claim_output", "export", "recipe_for_format"]

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
REPORT_FILE = "quantport_report.json"


FORMAT_CONTENT: dict[ExportFormat, Callable[[nn.Module, QuantizationState], CheckpointContent]] = {
    target.format: target.content for target in TARGETS
}
"""Per format: what the checkpoint holds (tensor plan, ``quantization_config``, side files); it may refuse the
model with a clear error before anything is written."""


def _config_dict(model: nn.Module, quantization_config: dict[str, Any]) -> dict[str, Any]:
    config = model.config.to_diff_dict()  # what save_pretrained writes
    config["quantization_config"] = quantization_config
    return config


def _source_directory(model: nn.Module) -> Path | None:
    """The local directory the model was loaded from, if it was."""
    source = Path(getattr(model, "name_or_path", "") or "")
    return source if str(source) not in ("", ".") and source.is_dir() else None


def _copy_tokenizer(model: nn.Module, staging: Path, tokenizer: Any) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
        return
    source = _source_directory(model)
    if source is None:
        logger.warning("tokenizer not copied: the model was not loaded from a local directory; pass tokenizer=")
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / name)


def _layer_stream(model: nn.Module):
    """For a model opened layer by layer, what reads each layer's weights while its tensors are written."""
    from ..sequential.attached import layer_store_of

    store = layer_store_of(model)
    if store is None:
        return None
    from ..sequential.streaming import LayerStream

    return LayerStream(store)


def _write_tensors(
    model: nn.Module,
    content: CheckpointContent,
    staging: Path,
    selection: ShardSelection,
    *,
    max_shard_size: int | str,
    progress: bool,
    release: Callable[[], None] | None = None,
) -> ValueWitness:
    """The planned tensors' shard files of ``selection`` (all of them in one process) and the index; returns
    the value tests run on their bytes. A model opened layer by layer reads each layer while its tensors are
    written, one layer at a time."""
    stream = _layer_stream(model)
    witness = ValueWitness()  # the self-check's value tests, run on the bytes as they are written
    try:
        write_sharded_safetensors(
            content.plan,
            staging,
            max_shard_size=max_shard_size,
            progress=progress,
            release=release,
            shard_workers=None if stream is None else 1,  # one layer read at a time
            witness=witness,
            selection=selection,
            wrap=None if stream is None else stream.wrap,
        )
    finally:
        if stream is not None:
            stream.close()
    return witness


@contextmanager
def _writing_shards(out: Path, *, shared: bool) -> Iterator[None]:
    """Around this rank's writes: an ``OSError`` becomes the :class:`~quantport.errors.OutputWriteError` that
    :meth:`OutputTarget.writing` makes of it; ``shared`` (every rank writes shards into rank 0's staging
    directory): a failure is voted here, so the other ranks have stopped writing before it is removed."""
    with failures_shared("export") if shared else nullcontext():
        try:
            yield
        except OSError as error:
            raise os_error(f"cannot write the checkpoint to {out}", error) from error


def _write_share(
    model: nn.Module, state: QuantizationState, fmt: ExportFormat, out_dir: Any, max_shard_size: int | str
) -> Path:
    """A rank other than 0 of a model opened layer by layer: its share of the shard files, into the staging
    directory rank 0 created (:mod:`quantport.distributed.shard_writers`); returns OUT's path."""
    share = staging_shared(None)
    with paused_gc():
        content = FORMAT_CONTENT[fmt](model, state)
    out = Path(getattr(out_dir, "path", out_dir))
    witness = None
    if share.writer < share.writers:
        selection = ShardSelection(share.writer, share.writers)
        with _writing_shards(out, shared=False):  # a failure: voted by the caller (written_by_rank_zero)
            witness = _write_tensors(
                model, content, share.staging, selection, max_shard_size=max_shard_size, progress=False
            ).result()
    shards_written(witness)
    return committed_by_rank_zero(out_dir)


def _report(state: QuantizationState, fmt: ExportFormat, exclude: list[str]) -> dict[str, Any]:
    return {
        "quantport_version": __version__,
        "format": fmt.value,
        "recipe": state.recipe.name,
        "scheme": state.recipe.scheme.value,
        "kv_cache": state.recipe.kv_cache.value,
        "quantized_layers": len(state.quantized),
        "excluded_layers": dict(sorted(state.excluded.items())),
        "exclude_modules": exclude,
        "shared_input_groups": [g.fused_name for g in state.groups],
        "calibration_tokens": state.calibration_tokens,
        "experts_modules": list(state.experts),
        "coverage": state.coverage.to_json() if state.coverage is not None else None,
        "algorithm": state.algorithm,
        "left_at_round_to_nearest": dict(sorted(state.left_at_rtn.items())),
        "run": {"path": state.path, "memory": state.memory},
        "algorithm_notes": dict(sorted(state.algorithm_notes.items())),
        "smoothing": state.smoothing,  # AWQ / SmoothQuant: places folded, skipped and why, routing flips
    }


@written_by_rank_zero  # under torchrun: rank 0 writes (layer by layer: each rank its share of the shards)
def export(
    model: nn.Module,
    out_dir: str | Path | OutputTarget,
    format: ExportFormat | str | None = None,  # noqa: A002  (public API name)
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    tokenizer: Any = None,
    progress: bool = True,
    allow_check_errors: bool = False,
) -> Path:
    """Write the quantized ``model`` to ``out_dir`` and return the directory.

    The model is only read. Files are written to a staging directory beside ``out_dir`` and renamed
    at the end, so an interrupted export leaves nothing that looks like a checkpoint. The same model
    and recipe give the same bytes. ``format`` None is the first format that stores the recipe's
    scheme exactly (ModelOpt when it can); a format that cannot is refused before anything is written.
    A form known not to load in its engine is refused too, and what was written is checked by quantport's
    own checker before it becomes ``out_dir`` (:mod:`quantport.export.self_check`); ``allow_check_errors``
    writes it anyway, logging the problems as warnings.

    ``out_dir`` is a path, or OUT already claimed with :func:`claim_output` (what the CLI does before it
    loads the model; ``overwrite`` is then the claim's). OUT is never the model's directory or one of its
    parents, and it is replaced only if it is still the directory found at the claim
    (:mod:`quantport.export.output_dir`). Files are fsynced before the rename; an ``OSError`` is raised as
    :class:`~quantport.errors.OutputWriteError`.
    """
    fmt = None if format is None else parse_format(format)
    state = state_of(model)
    fmt = fmt or default_format(state.recipe.scheme)
    check_exportable(state.recipe, fmt)
    # self-check (1/2): a form known not to load is refused before anything is written
    refuse_known_failure(
        model, state.recipe, fmt, experts_quantized=bool(state.experts), allow_check_errors=allow_check_errors
    )
    in_shares = writes_in_shares(model)  # under torchrun, a model opened layer by layer
    if not writes_checkpoint():  # under torchrun, a model opened layer by layer: this rank's share of the shards
        return _write_share(model, state, fmt, out_dir, max_shard_size)
    source = _source_directory(model)
    target = out_dir if isinstance(out_dir, OutputTarget) else claim_output(out_dir, overwrite=overwrite, source=source)
    with target.writing() as staging, ThreadPoolExecutor(1) as scan:
        target.check_source(source)  # OUT is never the model directory or one of its parents
        # finding the memory-mapped weights reads /proc/self/smaps (~15 ms): done beside the first writes
        mapped = scan.submit(MappedWeights)
        with paused_gc():
            content = FORMAT_CONTENT[fmt](model, state)
        share = staging_shared(staging) if in_shares else None  # torchrun: which shards this rank writes
        selection = ShardSelection(share.writer, share.writers) if share is not None else ShardSelection()
        with _writing_shards(target.path, shared=in_shares):
            witness = _write_tensors(
                model,
                content,
                staging,
                selection,
                max_shard_size=max_shard_size,
                progress=progress_here(progress),
                release=lambda: mapped.result().release_all(),  # drops the weights quantized so far
            )
            for name, data in content.side_files.items():
                write_json(staging / name, data)
            write_json(staging / "config.json", _config_dict(model, content.quantization_config))
            write_json(staging / REPORT_FILE, _report(state, fmt, excluded_modules(model)))
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None:
                generation_config.save_pretrained(staging)
            _copy_tokenizer(model, staging, tokenizer)
        witnessed = shards_written(witness.result()) if share is not None else witness.result()
        target.drop_progress()  # a resumable run's saved calibration progress is not part of the checkpoint
        # self-check (2/2): quantport's checker on the staged files; an error leaves nothing at out_dir
        check_written(staging, state.recipe.scheme, allow_check_errors=allow_check_errors, witnessed=witnessed)
    return commit_when_all_agree(target)  # fsync, then rename to out_dir as claimed (torchrun: once all ranks agree)

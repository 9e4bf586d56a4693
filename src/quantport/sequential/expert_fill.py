"""Fused expert parameters filled piece by piece from the weight source, never gathered whole.

transformers loads a per-expert checkpoint (``experts.{e}.gate_proj.weight`` ...) into the fused
``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` parameters by stacking every expert's tensors and
concatenating gate and up (``MergeModulelist`` then ``Concatenate``): all per-expert tensors and their fused copy
exist together, twice the layer. Here each fused parameter is allocated once, in its final dtype and on its
device, and each expert's tensor is read from the source (dequantized there), copied into its slice (the
:class:`~quantport.arch.experts.ExpertLayout`'s gate/up/down view of the expert) and dropped. A fused tensor
stored whole (GPT-OSS, Llama 4) is read a few experts at a time when the source is a
:class:`~quantport.sources.base.RowSource`. A layer then needs its parameters plus one piece's temporaries.

Only what is provably the same as transformers' result is taken here: a gather whose operations are exactly
the stack (dim 0) and the gate/up concatenation (dim 1), into a layout that is not transposed and has gate
and up in halves (what those operations build), or a plain renaming onto a 3-D experts parameter. Every other
key (renamings, other conversions, other families) is left to transformers' own loading.
"""

from __future__ import annotations

import enum
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch.experts import ExpertLayout, GateUpSplit, find_moe_blocks
from ..errors import MissingWeightsError, UnsupportedExpertsError
from ..sources.base import RowSource, WeightSource

__all__ = ["ExpertPiece", "ExpertReads", "Part", "expert_layouts", "fill_experts", "plan_expert_reads"]

logger = logging.getLogger(__name__)

ROW_CHUNK_BYTES = 256 << 20
"""Logical bytes read at once from a fused experts tensor stored whole (at least one expert)."""


class Part(enum.Enum):
    """Which projection of an expert a checkpoint tensor holds."""

    GATE = "gate"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class ExpertPiece:
    """One checkpoint tensor and where it goes in a fused parameter.

    Attributes:
        key: the checkpoint (source) name.
        expert: the expert it holds; None: the whole fused tensor, read by rows.
        part: its projection (None with ``expert`` None).
    """

    key: str
    expert: int | None = None
    part: Part | None = None


@dataclass
class ExpertReads:
    """A layer's keys split into fused-expert pieces (by model parameter name) and the rest."""

    pieces: dict[str, list[ExpertPiece]] = field(default_factory=lambda: defaultdict(list))
    layouts: dict[str, ExpertLayout] = field(default_factory=dict)
    rest: list[str] = field(default_factory=list)


def _is_gather(converter, fused: bool) -> bool:
    """transformers' per-expert gather: ``MergeModulelist(dim=0)``, then ``Concatenate(dim=1)`` when gate and up
    are fused into one parameter."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    expected: list[tuple[type, int]] = [(MergeModulelist, 0)] + ([(Concatenate, 1)] if fused else [])
    return len(ops) == len(expected) and all(
        type(op) is kind and getattr(op, "dim", None) == dim for op, (kind, dim) in zip(ops, expected, strict=True)
    )


def _expert_number(key: str, leaf: str) -> int | None:
    """The expert number of ``...experts.{e}.{leaf}.weight`` (None when the key is not so named)."""
    parts = key.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i] == leaf and parts[i - 1].isdigit() and parts[i + 1] == "weight" and i + 2 == len(parts):
            return int(parts[i - 1])
    return None


def _piece(key: str, parameter: str, source_pattern: str, converter, layout: ExpertLayout) -> ExpertPiece | None:
    """The piece of a key that a converter gathers into ``parameter`` (None: not a gather this module can do)."""
    if layout.transposed or layout.split is not GateUpSplit.HALVES:
        return None  # the stack and concatenation build [E, 2I, H] with gate and up in halves, nothing else
    leaf = parameter.rpartition(".")[2]
    patterns = list(converter.source_patterns)
    if leaf == "gate_up_proj" and len(patterns) == 2 and _is_gather(converter, fused=True):
        part = (Part.GATE, Part.UP)[patterns.index(source_pattern)]
        name = layout.leaf_names[0 if part is Part.GATE else 1]
    elif leaf == "down_proj" and len(patterns) == 1 and _is_gather(converter, fused=False):
        part, name = Part.DOWN, layout.leaf_names[2]
    else:
        return None
    if f".{name}." not in f".{source_pattern}":  # the layout and transformers' mapping disagree: leave it to them
        return None
    expert = _expert_number(key, name)
    return None if expert is None else ExpertPiece(key, expert, part)


def expert_layouts(model: nn.Module) -> dict[str, ExpertLayout]:
    """Experts module name -> layout; empty when some experts module has no layout (then transformers loads
    every key, as it can; quantizing such a model is refused later, with its own message)."""
    try:
        return {block.experts_name: block.layout for block in find_moe_blocks(model)}
    except UnsupportedExpertsError as exc:
        logger.debug("experts loaded by transformers' conversion: %s", exc)
        return {}


def plan_expert_reads(
    keys: Iterable[str], model: nn.Module, weight_mapping: list, layouts: dict[str, ExpertLayout], *, rows: bool
) -> ExpertReads:
    """Which of ``keys`` (checkpoint names) fill fused expert parameters piece by piece; ``layouts`` from
    :func:`expert_layouts`; ``rows``: the source reads rows of a tensor (fused tensors stored whole are then
    read a few experts at a time)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [m for m in weight_mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in weight_mapping if isinstance(m, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    parameters = dict(model.named_parameters())
    reads = ExpertReads()
    declined: set[str] = set()  # parameters with a key this module cannot place: transformers loads all of them
    targets: list[tuple[str, str]] = []
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, parameters)
        targets.append((key, renamed))
        layout = layouts.get(renamed.rpartition(".")[0])
        meta = parameters.get(renamed)
        piece = None
        if layout is not None and meta is not None:
            if pattern is not None:
                piece = _piece(key, renamed, pattern, by_pattern[pattern], layout)
            elif rows and meta.dim() >= 3:
                piece = ExpertPiece(key)
        if piece is None:
            declined.add(renamed)
            continue
        reads.pieces[renamed].append(piece)
        reads.layouts[renamed] = layout
    for parameter in declined & set(reads.pieces):
        del reads.pieces[parameter], reads.layouts[parameter]
    reads.rest = [key for key, renamed in targets if renamed not in reads.pieces]
    return reads


def _slot(out: torch.Tensor, piece: ExpertPiece, layout: ExpertLayout) -> torch.Tensor:
    """The view of ``out`` (a fused parameter) that ``piece`` fills, ``[out, in]`` like an ``nn.Linear`` weight."""
    expert = out[piece.expert]
    if piece.part is Part.GATE:
        return layout.gate(expert)
    if piece.part is Part.UP:
        return layout.up(expert)
    return layout.down(expert)


def _fill_pieces(
    out: torch.Tensor, parameter: str, pieces: list[ExpertPiece], layout: ExpertLayout, source: WeightSource
) -> None:
    experts = out.shape[0]
    parts = {Part.GATE, Part.UP} if parameter.endswith("gate_up_proj") else {Part.DOWN}
    wanted = {(e, p) for e in range(experts) for p in parts}
    given = {(piece.expert, piece.part) for piece in pieces}
    if given != wanted:
        absent = sorted(f"expert {e} {p.value}" for e, p in wanted - given)
        extra = sorted(f"expert {e} {p.value}" for e, p in given - wanted)
        raise MissingWeightsError(
            f"the checkpoint does not give {parameter} ({experts} experts) exactly its experts: "
            f"missing {', '.join(absent[:5]) or 'none'}; unexpected {', '.join(extra[:5]) or 'none'}; "
            "it does not belong to this config"
        )
    device = out.device
    for piece in pieces:
        tensor = source.read([piece.key], device)[piece.key]
        slot = _slot(out, piece, layout)
        if tuple(tensor.shape) != tuple(slot.shape):
            raise MissingWeightsError(
                f"the checkpoint's {piece.key} has shape {list(tensor.shape)}, {parameter} needs "
                f"{list(slot.shape)} per expert; it does not belong to this config"
            )
        slot.copy_(tensor)
        del tensor


def _fill_rows(out: torch.Tensor, parameter: str, key: str, source: RowSource, chunk_bytes: int) -> None:
    rows = out.shape[0]
    row_bytes = max(1, out[0].numel() * out.element_size()) if rows else 1
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = source.read_rows(key, start, stop, out.device)
        if tuple(chunk.shape) != tuple(out[start:stop].shape):
            raise MissingWeightsError(
                f"the checkpoint's {key} rows {start}:{stop} have shape {list(chunk.shape)}, {parameter} needs "
                f"{list(out[start:stop].shape)}; it does not belong to this config"
            )
        out[start:stop].copy_(chunk)
        del chunk


@torch.no_grad()
def fill_experts(
    reads: ExpertReads,
    model: nn.Module,
    source: WeightSource,
    device: torch.device,
    dtype_of: Callable[[str], torch.dtype],
    *,
    chunk_bytes: int | None = None,
) -> set[str]:
    """Allocate each fused parameter of ``reads`` on ``device`` in ``dtype_of(name)``, fill it from ``source``
    and set it on its module (as transformers' loading does); the names of the parameters set.
    ``chunk_bytes``: logical bytes per row read (default :data:`ROW_CHUNK_BYTES`)."""
    chunk_bytes = chunk_bytes or ROW_CHUNK_BYTES
    filled: set[str] = set()
    for parameter, pieces in reads.pieces.items():
        owner, _, leaf = parameter.rpartition(".")
        module = model.get_submodule(owner)
        meta = module._parameters[leaf]
        out = torch.empty(meta.shape, dtype=dtype_of(parameter), device=device)
        whole = [p for p in pieces if p.expert is None]
        if whole:
            if len(pieces) != 1 or not isinstance(source, RowSource):
                keys = ", ".join(p.key for p in pieces[:3])
                raise MissingWeightsError(f"the checkpoint gives {parameter} more than once ({keys})")
            _fill_rows(out, parameter, whole[0].key, source, chunk_bytes)
        else:
            _fill_pieces(out, parameter, pieces, reads.layouts[parameter], source)
        value = nn.Parameter(out, requires_grad=out.is_floating_point())
        value._is_hf_initialized = True  # as transformers marks what it loaded
        module._parameters[leaf] = value
        filled.add(parameter)
    return filled

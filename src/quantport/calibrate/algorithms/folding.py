"""Folding per-input-channel scales into the op before a group of Linears (AWQ, SmoothQuant).

A :class:`FoldTarget` is one place where a scale ``s`` over a shared input's channels can be folded (see
:mod:`quantport.arch.smoothing_names`): the *source* (a norm's weight, or a Linear's rows) is divided by
``s`` and every *reader* of its output has its input columns multiplied by ``s``, so the model computes the
same function. Readers are quantized Linears, MoE experts (gate and up of every expert) and compensated
modules (the router, a shared-expert gate) that stay in full precision. Weights are replaced by new
tensors (never written in place: memory-mapped checkpoint weights stay clean) and rounded to their dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from torch import Tensor, nn

from ...arch.experts import MoEBlock, find_moe_blocks
from ...arch.smoothing_names import SMOOTHING_NAMES, SmoothingNames

__all__ = [
    "FoldTarget",
    "SourceKind",
    "expand_heads",
    "find_fold_targets",
    "fold_expert_down",
    "fold_scale",
    "reduce_heads",
]

logger = logging.getLogger(__name__)


class SourceKind(Enum):
    """What divides by the scale."""

    NORM = "norm"
    """A norm's weight (and bias): its output channels."""
    LINEAR = "linear"
    """A Linear's rows (and bias): up_proj before down_proj."""
    VALUE_HEADS = "value-heads"
    """v_proj's rows, one scale per (kv head, head dim); o_proj's columns repeat it for each query head."""


@dataclass
class FoldTarget:
    """One folding place.

    Attributes:
        name: what reports call it, e.g. ``model.layers.0.input_layernorm``.
        kind: what divides by the scale.
        source: module name of the norm or Linear that divides.
        linears: names of the Linear readers (columns multiplied).
        experts: the MoE block whose experts read the input (gate and up columns multiplied), if any.
        compensated: names of modules with a ``weight [out, in]`` that read the input unquantized.
        observed: the module whose output (``NORM``) or input (otherwise) is the shared input.
        query_groups: query heads per kv head (``VALUE_HEADS``); the scale has ``kv heads * head dim`` entries.
        head_dim: channels per head (``VALUE_HEADS``).
        top_k: experts per token of the MoE block (to count routing decisions that flip).
        skipped: why this place is not folded (None: it is).
    """

    name: str
    kind: SourceKind
    source: str
    linears: tuple[str, ...]
    observed: str
    experts: MoEBlock | None = None
    compensated: tuple[str, ...] = ()
    query_groups: int = 1
    head_dim: int = 0
    top_k: int = 0
    skipped: str | None = field(default=None)

    @property
    def observes_output(self) -> bool:
        return self.kind is SourceKind.NORM


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear_children(module: nn.Module, names: tuple[str, ...]) -> bool:
    children = dict(module.named_children())
    return all(isinstance(children.get(n), nn.Linear) for n in names)


def _first_child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    children = dict(module.named_children())
    for n in names:
        if n in children:
            return n, children[n]
    return None


def _gated_names(module: nn.Module, names: SmoothingNames) -> tuple[str, str, str] | None:
    for triple in names.gated_mlp:
        if _linear_children(module, triple):
            return triple
    return None


def _attention_targets(model: nn.Module, layer: str, module: nn.Module, names: SmoothingNames) -> Iterator[FoldTarget]:
    found = _first_child(module, names.attention)
    if found is None:
        return
    attn_name, attention = found
    prefix = _join(layer, attn_name)
    inputs = next((s for s in names.attention_inputs if _linear_children(attention, s)), None)
    norm = _join(layer, names.attention_norm)
    if inputs is not None:
        linears = tuple(_join(prefix, n) for n in inputs)
        yield FoldTarget(norm, SourceKind.NORM, norm, linears, observed=norm)
    if not _linear_children(attention, (names.value, names.output)):
        return
    value, output = getattr(attention, names.value), getattr(attention, names.output)
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    target = FoldTarget(
        _join(prefix, names.output),
        SourceKind.VALUE_HEADS,
        _join(prefix, names.value),
        (_join(prefix, names.output),),
        observed=_join(prefix, names.output),
    )
    if not heads or output.in_features % heads or value.out_features * heads != output.in_features * kv_heads:
        target.skipped = (
            f"o_proj's input ({output.in_features}) is not v_proj's output ({value.out_features}) repeated per "
            f"query head ({heads} heads, {kv_heads} kv heads): the head layout does not allow folding"
        )
    else:
        target.query_groups = heads // kv_heads
        target.head_dim = output.in_features // heads
    yield target


def _mlp_targets(
    layer: str, module: nn.Module, blocks: dict[str, MoEBlock], names: SmoothingNames, top_k: int
) -> Iterator[FoldTarget]:
    found = _first_child(module, names.mlp)
    if found is None:
        return
    mlp_name, mlp = found
    prefix = _join(layer, mlp_name)
    norm = _join(layer, names.mlp_norm)
    block = blocks.get(prefix)
    gated = _gated_names(mlp, names)
    if block is None and gated is not None:
        gate, up, down = gated
        yield FoldTarget(norm, SourceKind.NORM, norm, (_join(prefix, gate), _join(prefix, up)), observed=norm)
        yield FoldTarget(
            _join(prefix, down), SourceKind.LINEAR, _join(prefix, up), (_join(prefix, down),), _join(prefix, down)
        )
        return
    if block is None:
        return
    linears: list[str] = []
    down_targets = []
    for shared_name in names.shared_experts:
        shared = getattr(mlp, shared_name, None)
        triple = _gated_names(shared, names) if isinstance(shared, nn.Module) else None
        if triple is None:
            continue
        shared_prefix = _join(prefix, shared_name)
        gate, up, down = (_join(shared_prefix, n) for n in triple)
        linears += [gate, up]
        down_targets.append(FoldTarget(down, SourceKind.LINEAR, up, (down,), observed=down))
    router = getattr(mlp, block.layout.router, None)
    compensated = [_join(prefix, block.layout.router)] if isinstance(getattr(router, "weight", None), Tensor) else []
    compensated += [_join(prefix, g) for g in names.input_gates if isinstance(getattr(mlp, g, None), nn.Linear)]
    target = FoldTarget(norm, SourceKind.NORM, norm, tuple(linears), observed=norm, experts=block, top_k=top_k)
    target.compensated = tuple(compensated)
    if router is not None and not compensated:
        target.skipped = f"the router {block.layout.router} has no weight [experts, hidden] to compensate"
    yield target
    yield from down_targets


def find_fold_targets(model: nn.Module, names: SmoothingNames = SMOOTHING_NAMES) -> list[FoldTarget]:
    """Every folding place of ``model``'s decoder layers (modules with both norms as children).

    Targets that cannot be folded carry the reason in :attr:`FoldTarget.skipped`.
    """
    blocks = {b.name: b for b in find_moe_blocks(model)}
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    plus_one = getattr(config, "model_type", "") in names.norm_plus_one
    targets = []
    for layer, module in model.named_modules():
        children = dict(module.named_children())
        if names.attention_norm not in children or names.mlp_norm not in children:
            continue
        for target in [
            *_attention_targets(model, layer, module, names),
            *_mlp_targets(layer, module, blocks, names, top_k),
        ]:
            if plus_one and target.kind is SourceKind.NORM:
                target.skipped = "the family's norms multiply by 1 + weight; a scale cannot be folded into them"
            targets.append(target)
    return targets


def expand_heads(scale: Tensor, target: FoldTarget) -> Tensor:
    """A v_proj-row scale ``[kv heads * head dim]`` as o_proj's column scale ``[heads * head dim]``: query
    head ``h`` reads kv head ``h // query_groups`` (transformers' ``repeat_kv``)."""
    kv_heads = scale.numel() // target.head_dim
    return scale.reshape(kv_heads, 1, target.head_dim).expand(kv_heads, target.query_groups, -1).reshape(-1)


def reduce_heads(per_column: Tensor, target: FoldTarget, reduce: str) -> Tensor:
    """o_proj's per-column statistic ``[heads * head dim]`` -> one per v_proj row (``mean`` or ``amax`` over the
    query heads of each kv head)."""
    grouped = per_column.reshape(-1, target.query_groups, target.head_dim)
    return (grouped.mean(dim=1) if reduce == "mean" else grouped.amax(dim=1)).reshape(-1)


def _scaled(tensor: Tensor, factor: Tensor) -> nn.Parameter:
    """A new parameter: ``tensor * factor`` computed in fp32, rounded to the tensor's dtype."""
    value = (tensor.detach().float() * factor.to(tensor.device)).to(tensor.dtype)
    return nn.Parameter(value, requires_grad=False)


def _set(module: nn.Module, attribute: str, factor: Tensor) -> None:
    setattr(module, attribute, _scaled(getattr(module, attribute), factor))


def fold_scale(model: nn.Module, target: FoldTarget, scale: Tensor) -> None:
    """Fold ``scale`` (fp32, one entry per channel of the shared input, or per v_proj row for ``VALUE_HEADS``)."""
    modules = dict(model.named_modules())
    scale = scale.float()
    source = modules[target.source]
    _set(source, "weight", (1 / scale)[:, None] if target.kind is not SourceKind.NORM else 1 / scale)
    if getattr(source, "bias", None) is not None:
        _set(source, "bias", 1 / scale)
    column = expand_heads(scale, target) if target.kind is SourceKind.VALUE_HEADS else scale
    for name in (*target.linears, *target.compensated):
        _set(modules[name], "weight", column[None, :])
    if target.experts is not None:
        experts, layout = modules[target.experts.experts_name], target.experts.layout
        gate_up = experts.gate_up_proj.detach()
        fused = layout.fuse(layout.gate(gate_up).float() * scale, layout.up(gate_up).float() * scale)
        experts.gate_up_proj = nn.Parameter(fused.to(gate_up.dtype), requires_grad=False)


def fold_expert_down(block: MoEBlock, scales: Tensor) -> None:
    """Fold one scale per expert over its intermediate channels (fp32 ``[E, I]``): each expert's up rows
    divide by it and its down columns multiply by it (``act(gate x) * up x`` is linear in up's rows)."""
    experts, layout = block.experts, block.layout
    scales = scales.float().to(experts.gate_up_proj.device)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    fused = layout.fuse(layout.gate(gate_up).float(), layout.up(gate_up).float() / scales[:, :, None])
    experts.gate_up_proj = nn.Parameter(fused.to(gate_up.dtype), requires_grad=False)
    scaled_down = layout.unorient_down(layout.down(down).float() * scales[:, None, :])
    experts.down_proj = nn.Parameter(scaled_down.to(down.dtype), requires_grad=False)

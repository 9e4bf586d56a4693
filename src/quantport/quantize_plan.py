"""What quantize() will quantize: the Linear layers and experts modules a recipe covers in a model, and why
each other one stays unquantized (the user's patterns, the family's rules, shapes the format cannot take)."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

from torch import nn

from .arch.experts import MoEBlock, find_moe_blocks
from .arch.family import MTP_PREFIXES, is_vision_module
from .arch.fused_groups import find_shared_input_groups
from .errors import InvalidArgumentError
from .formats.descriptors import ScaleGranularity
from .input_checks import check_exclude_patterns
from .recipes import KVCacheFormat, QuantRecipe
from .schemes import SchemeCodec
from .state import QuantizationState

__all__ = ["check_plan", "plan_experts", "plan_layers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _FamilyRules:
    """What the model's family rows say about its Linear layers."""

    routers: frozenset[str]
    no_block_scales: tuple[str, ...]

    @classmethod
    def of(cls, model: nn.Module) -> _FamilyRules:
        blocks = list(find_moe_blocks(model))
        routers = frozenset(f"{b.name}.{b.layout.router}" if b.name else b.layout.router for b in blocks)
        return cls(routers, tuple(p for b in blocks for p in b.layout.no_block_scales))

    def refuses_block_scales(self, name: str) -> bool:
        """Whether the family's engines cannot take 2-D block scales on Linear ``name``."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.no_block_scales)


def _exclusion_reason(
    name: str, module: nn.Linear, recipe: QuantRecipe, codec: SchemeCodec, family: _FamilyRules
) -> str | None:
    if recipe.is_excluded(name):
        return "matches an exclusion pattern"
    if not recipe.linears:
        return f"recipe {recipe.name} quantizes MoE experts only"
    if name in family.routers:
        return "the MoE router, which engines run in full precision (model family rule)"
    if is_vision_module(name) or name.startswith(MTP_PREFIXES):
        return "a vision tower or multi-token-prediction module, which engines load unquantized (model family rule)"
    if codec.format.granularity is ScaleGranularity.BLOCK_2D and family.refuses_block_scales(name):
        return "the engine permutes this layer's scales for rotary; 2-D block scales would break (model family rule)"
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} is not a plain nn.Linear"
    if module.in_features % codec.input_multiple:
        return (
            f"in_features {module.in_features} is not a multiple of {codec.input_multiple} "
            f"required by {codec.scheme.value}"
        )
    return None


def plan_layers(model: nn.Module, recipe: QuantRecipe, codec: SchemeCodec, state: QuantizationState) -> list[str]:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    family = _FamilyRules.of(model)
    for name, module in linears.items():
        reason = _exclusion_reason(name, module, recipe, codec, family)
        if reason is not None:
            state.excluded[name] = reason
    for group in find_shared_input_groups(model):
        excluded = [m for m in group.members if m in state.excluded]
        if excluded and len(excluded) < len(group.members):
            for member in group.members:
                state.excluded.setdefault(member, f"fused with {excluded[0]}, which is excluded")
            logger.warning("excluding all of %s because %s is excluded", group.fused_name, excluded[0])
    for name, reason in state.excluded.items():
        if not recipe.is_excluded(name) and recipe.linears:
            logger.warning("leaving %s unquantized: %s", name, reason)
    return [n for n in linears if n not in state.excluded]


def plan_experts(model: nn.Module, recipe: QuantRecipe, codec: SchemeCodec, state: QuantizationState) -> list[MoEBlock]:
    selected = []
    for block in find_moe_blocks(model):
        hidden, inter = block.layout.down(block.experts.down_proj[0]).shape
        if recipe.is_excluded(block.experts_name):
            state.excluded[block.experts_name] = "matches an exclusion pattern"
        elif hidden % codec.input_multiple or inter % codec.input_multiple:
            reason = (
                f"expert dims {hidden}/{inter} are not multiples of {codec.input_multiple} "
                f"required by {codec.scheme.value}"
            )
            state.excluded[block.experts_name] = reason
            logger.warning("leaving %s unquantized: %s", block.experts_name, reason)
        else:
            selected.append(block)
    return selected


def check_plan(
    model: nn.Module, names: list[str], blocks: list[MoEBlock], state: QuantizationState, patterns: tuple[str, ...]
) -> None:
    """The user's exclusion patterns each match a layer, and leave something to quantize."""
    candidates = [*names, *(b.experts_name for b in blocks), *state.excluded]
    check_exclude_patterns(model, patterns, candidates)
    if names or blocks or state.recipe.kv_cache is KVCacheFormat.FP8:
        return
    by_user = [n for n in state.excluded if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if by_user:
        raise InvalidArgumentError(
            f"--exclude {' '.join(patterns)} leaves nothing to quantize ({len(by_user)} layer(s) excluded by it, "
            "the rest by the recipe's defaults); exclude fewer layers"
        )
    reasons = sorted({reason for reason in state.excluded.values()})
    raise InvalidArgumentError(
        f"recipe {state.recipe.name} has nothing to quantize in this model ({'; '.join(reasons[:3]) or 'no layer'}); "
        "choose another recipe"
    )

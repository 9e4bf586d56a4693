"""Checkpoint names of a model's tensors: in-memory names and the names transformers saves.

transformers 5 renames and fuses some tensors when it loads a checkpoint (Mixtral's
``block_sparse_moe`` becomes ``mlp``; per-expert ``experts.{e}.gate_proj.weight`` tensors become one
3-D ``experts.gate_up_proj``) and reverts that on save. An exported checkpoint may use either
spelling, so every tensor is looked up under both. The saved spelling is asked of transformers
itself (``revert_weight_conversion`` on meta tensors), never re-encoded here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CheckpointNames", "ExpertNames"]

logger = logging.getLogger(__name__)

_PER_EXPERT = re.compile(r"^(?P<prefix>.+)\.(?P<expert>\d+)\.(?P<leaf>[^.]+)\.weight$")


@dataclass(frozen=True, slots=True)
class ExpertNames:
    """Where the experts of one MoE block may be stored.

    Attributes:
        prefixes: candidate checkpoint names of the experts module (saved spelling first), e.g.
            ``model.layers.0.block_sparse_moe.experts`` then ``model.layers.0.mlp.experts``.
        saved_leaves: the per-expert leaf names transformers saves (e.g. ``("w1", "w3")`` for the
            gate/up halves), empty when transformers saves the experts fused.
    """

    prefixes: tuple[str, ...]
    saved_leaves: tuple[str, ...]


class CheckpointNames:
    """Maps a model's state-dict keys and module names to the names they may have on disk."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._params = dict(model.state_dict(keep_vars=True))
        self._cache: dict[str, tuple[str, ...]] = {}

    def saved_names(self, key: str) -> tuple[str, ...]:
        """Names ``save_pretrained`` writes for the state-dict entry ``key`` (``(key,)`` when unchanged)."""
        if key not in self._cache:
            self._cache[key] = self._revert(key)
        return self._cache[key]

    def _revert(self, key: str) -> tuple[str, ...]:
        from transformers.core_model_loading import revert_weight_conversion

        tensor = self._params.get(key)
        if tensor is None:
            return (key,)
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        try:
            reverted = revert_weight_conversion(self._model, {key: meta})
        except Exception as exc:  # noqa: BLE001  (a conversion that needs sibling keys; fall back to key)
            logger.debug("no saved name for %s (%s); using the in-memory name", key, exc)
            return (key,)
        return tuple(reverted) or (key,)

    def tensor_candidates(self, key: str) -> tuple[str, ...]:
        """Names to try for an unquantized tensor: the saved name (when it is one tensor), then ``key``."""
        saved = self.saved_names(key)
        return _unique(saved + (key,)) if len(saved) == 1 else (key,)

    def module_candidates(self, module: str, leaf: str = "weight") -> tuple[str, ...]:
        """Checkpoint prefixes of ``module`` (whose tensors are ``<prefix>.weight``, ``<prefix>.weight_scale``...)."""
        key = f"{module}.{leaf}" if module else leaf
        saved = self.saved_names(key)
        prefixes = [s[: -len(leaf) - 1] for s in saved if len(saved) == 1 and s.endswith(f".{leaf}")]
        return _unique((*prefixes, module))

    def expert_names(self, experts: str, param: str = "gate_up_proj") -> ExpertNames:
        """Candidate prefixes of the experts module ``experts`` and the leaves transformers saves."""
        saved = self.saved_names(f"{experts}.{param}")
        matches = [m for m in (_PER_EXPERT.match(s) for s in saved) if m is not None]
        if matches and len(matches) == len(saved):
            prefixes = {m["prefix"] for m in matches}
            leaves = tuple(sorted({m["leaf"] for m in matches}))
            return ExpertNames(_unique((*sorted(prefixes), experts)), leaves)
        fused = [s.rsplit(".", 1)[0] for s in saved if s.endswith(f".{param}")]
        return ExpertNames(_unique((*fused, experts)), ())


def _unique(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))

"""Structure recovered from tensor names: modules, fused groups, MoE blocks, and the check context.

The checker has no model object, only names, so it rebuilds what it needs from them:

* a *module* is a tensor name without its last component (``...q_proj.weight`` -> ``...q_proj``);
* a *fused group* is a set of sibling modules an engine runs as one GEMM, from the table the quantizer
  reads too (:data:`quantport.arch.family.FUSED_SIBLINGS`: q/k/v -> ``qkv_proj``, gate/up ->
  ``gate_up_proj``, w1/w3 -> ``w13``, DeepSeek's q_a/kv_a -> ``fused_qkv_a_proj``), and each expert's
  gate/up;
* an *experts layer* (:class:`StoredExperts`) holds the experts of one layer, per expert
  (``experts.{e}.gate_proj``) or fused (``experts.gate_up_proj``); its expert naming comes from
  :data:`quantport.arch.experts.LAYOUTS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from quantport.arch.experts import ExpertLayout, described_layout
from quantport.arch.family import FUSED_SIBLINGS, is_vision_module
from quantport.read.dialect import FUSED_EXPERT_PARAMS, LINEAR_QUANT_LEAVES, split_fused_expert_leaf

from .checkpoint import Checkpoint, TensorInfo
from .findings import Engine
from .qconfig import ModelFacts, QuantConfig
from .scalars import read_scalars

__all__ = [
    "ENGINE_FUSED",
    "QPARAMS",
    "Context",
    "FusedGroup",
    "StoredExperts",
    "fused_expert_param",
    "is_quantized",
    "layout_of",
]

ENGINE_FUSED: dict[str, tuple[str, ...]] = {group.fused: group.members for group in FUSED_SIBLINGS}
"""Engine (vLLM) name of a fused Linear -> the checkpoint modules it is loaded from."""

QPARAMS: frozenset[str] = LINEAR_QUANT_LEAVES
"""Parameters that only a quantized Linear carries (ModelOpt and compressed-tensors names; the reader's list)."""

_TABLE_MEMBERS = frozenset(group.members for group in FUSED_SIBLINGS)
FUSED_EXPERT_PROJ = FUSED_EXPERT_PARAMS
_FUSED_QSUFFIX = ("_weight_scale", "_weight_scale_2", "_input_scale", "_blocks", "_scales")
_PER_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<leaf>[^.]+)$")


fused_expert_param = split_fused_expert_leaf
"""``gate_up_proj_weight_scale`` -> (``gate_up_proj``, ``weight_scale``); ``down_proj`` -> (``down_proj``, "")."""


def is_quantized(params: dict[str, TensorInfo]) -> bool:
    """Whether a module carries any quantization tensor (a scale, packed weight, ...)."""
    if QPARAMS & params.keys():
        return True
    return any(p.endswith(_FUSED_QSUFFIX) and fused_expert_param(p) for p in params)


def layout_of(facts: ModelFacts) -> ExpertLayout | None:
    """The expert layout of this model family, from ``model_type`` (text model type first)."""
    for model_type in (facts.text_model_type, facts.model_type):
        layout = described_layout(model_type) if model_type else None
        if layout is not None:
            return layout
    return None


@dataclass(frozen=True)
class FusedGroup:
    """Sibling modules that an engine fuses.

    Attributes:
        engine_name: the engine's module name (``...qkv_proj``, or ``...experts`` for an expert's gate/up).
        members: checkpoint module names, in fusion order.
    """

    engine_name: str
    members: tuple[str, ...]


@dataclass
class StoredExperts:
    """The experts of one MoE layer, as the checkpoint stores them.

    Attributes:
        prefix: the experts module, e.g. ``model.layers.1.mlp.experts``.
        fused: True for fused 3-D tensors (``experts.gate_up_proj``), False for per-expert modules.
        experts: expert index -> leaf name -> module name (per-expert naming only).
        leaves: the leaf names (gate, up, down) expected for every expert.
    """

    prefix: str
    fused: bool
    experts: dict[int, dict[str, str]] = field(default_factory=dict)
    leaves: tuple[str, ...] = ()
    also_fused: bool = False
    """Per-expert modules *and* fused 3-D tensors under the same prefix."""

    def modules(self) -> list[str]:
        return [m for leaves in self.experts.values() for m in leaves.values()]


@dataclass
class Context:
    """Everything a rule needs: the files, the engine, the config, and the recovered structure."""

    ckpt: Checkpoint
    engine: Engine
    qcfg: QuantConfig
    facts: ModelFacts
    memo: dict[object, object] = field(default_factory=dict, repr=False)
    """Values computed once and shared between rules."""
    _scalars: dict[str, float | None] = field(default_factory=dict, repr=False)
    _scalars_read: bool = field(default=False, repr=False)

    @cached_property
    def modules(self) -> dict[str, dict[str, TensorInfo]]:
        """module name -> parameter name -> tensor."""
        out: dict[str, dict[str, TensorInfo]] = {}
        for name, info in self.ckpt.tensors.items():
            module, _, param = name.rpartition(".")
            out.setdefault(module, {})[param] = info
        return out

    @cached_property
    def sorted_tensors(self) -> list[TensorInfo]:
        """Every tensor of ``ckpt.tensors``, sorted by name (the order rules report in)."""
        tensors = self.ckpt.tensors
        return [tensors[name] for name in sorted(tensors)]

    @cached_property
    def layout(self) -> ExpertLayout | None:
        return layout_of(self.facts)

    def is_vision(self, module: str) -> bool:
        return is_vision_module(module)

    @cached_property
    def weight_modules(self) -> dict[str, dict[str, TensorInfo]]:
        """Modules with a matrix (``weight`` 2-D or ``weight_packed``) or fused experts: what can be
        quantized or excluded. Vision modules are left out (vLLM never quantizes them)."""
        out = {}
        for module, params in self.modules.items():
            if self.is_vision(module):
                continue
            weight = params.get("weight")
            matrix = weight is not None and weight.ndim == 2
            if matrix or "weight_packed" in params or any(p in params for p in FUSED_EXPERT_PROJ):
                out[module] = params
        return out

    @cached_property
    def moe_blocks(self) -> dict[str, StoredExperts]:
        """experts prefix -> block, for per-expert and fused layouts."""
        blocks: dict[str, StoredExperts] = {}
        fused: list[str] = []
        for module, params in self.modules.items():
            match = _PER_EXPERT.match(module)
            if match:
                prefix = f"{match['block']}.experts"
                block = blocks.setdefault(prefix, StoredExperts(prefix, fused=False))
                block.experts.setdefault(int(match["e"]), {})[match["leaf"]] = module
            elif module.endswith("experts") and any(fused_expert_param(p) for p in params):
                fused.append(module)
        for module in fused:
            if module in blocks:
                blocks[module].also_fused = True
            else:
                blocks[module] = StoredExperts(module, fused=True)
        for block in blocks.values():
            if not block.fused:
                block.leaves = self._leaves(block)
        return blocks

    def _leaves(self, block: StoredExperts) -> tuple[str, ...]:
        seen = {leaf for leaves in block.experts.values() for leaf in leaves}
        if self.layout is not None and set(self.layout.leaf_names) >= seen:
            return tuple(self.layout.leaf_names)
        for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
            if set(names) >= seen:
                return names
        return tuple(sorted(seen))

    @cached_property
    def expert_of(self) -> dict[str, str]:
        """per-expert module name -> its experts prefix."""
        return {m: prefix for prefix, block in self.moe_blocks.items() for m in block.modules()}

    @cached_property
    def fused_groups(self) -> list[FusedGroup]:
        """Every fused group whose members all exist (attention, MLP, and each expert's gate/up)."""
        groups = []
        names = set(self.modules)
        parents = {m.rpartition(".")[0] for m in names}
        for parent in sorted(parents):
            for fused, leaves in ENGINE_FUSED.items():
                members = tuple(f"{parent}.{leaf}" for leaf in leaves)
                if all(m in names for m in members):
                    engine_name = self.expert_of.get(members[0], f"{parent}.{fused}")
                    groups.append(FusedGroup(engine_name, members))
        for block in self.moe_blocks.values():
            if block.fused or len(block.leaves) != 3 or tuple(block.leaves[:2]) in _TABLE_MEMBERS:
                continue  # experts with table names (gate_proj/up_proj, w1/w3) were found above
            for leaves in block.experts.values():
                members = tuple(leaves.get(leaf, "") for leaf in block.leaves[:2])
                if all(members):
                    groups.append(FusedGroup(block.prefix, members))
        return groups

    @cached_property
    def engine_layer(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """checkpoint module -> (engine layer name, checkpoint modules loaded into that layer)."""
        out: dict[str, tuple[str, tuple[str, ...]]] = {}
        for prefix, block in self.moe_blocks.items():
            members = tuple(block.modules()) if not block.fused else (prefix,)
            for m in members:
                out[m] = (prefix, members)
        for group in self.fused_groups:
            for m in group.members:
                out.setdefault(m, (group.engine_name, group.members))
        for module in self.weight_modules:
            out.setdefault(module, (module, (module,)))
        return out

    def modelopt_algo(self, module: str) -> str | None:
        """ModelOpt ``quant_algo`` of a checkpoint module; under MIXED_PRECISION its own entry, else the
        entry of its engine layer (``...qkv_proj``, ``...experts``)."""
        algo = self.qcfg.modelopt_algo_for(module)
        if algo is None and module in self.engine_layer:
            algo = self.qcfg.modelopt_algo_for(self.engine_layer[module][0])
        return algo

    def load_scalar(self, name: str) -> float | None:
        """The value of a one-element tensor (None when absent or larger), read once.

        The first call reads every one-element tensor of the checkpoint in one batch
        (:func:`~quantport.check.scalars.read_scalars`); a tensor that batch could not read is read alone.
        """
        if not self._scalars_read:
            self._scalars.update(read_scalars(self.ckpt))
            self._scalars_read = True
        if name not in self._scalars:
            tensor = self.ckpt.load_float(name)
            self._scalars[name] = None if tensor is None or tensor.numel() != 1 else float(tensor.reshape(()))
        return self._scalars[name]

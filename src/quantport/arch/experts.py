"""Mixture-of-Experts layouts, as data: one :class:`ExpertLayout` per expert family.

Every stage that touches experts (calibration, the uncalibrated-expert policy, weight
transposition, export, the checker and the dequantizing loader) reads the layout, and nothing else
knows about a family. Adding a family is adding one entry to :data:`LAYOUTS` (and one test).

Orientation: a *transposed* family stores ``gate_up_proj`` as ``[E, in, out] = [E, H, 2I]`` and
``down_proj`` as ``[E, I, H]`` (Llama 4, GPT-OSS); the transformers-5 fused families store
``[E, 2I, H]`` and ``[E, H, I]``, i.e. ``[E, out, in]`` like ``nn.Linear``. :meth:`ExpertLayout.gate`,
:meth:`~ExpertLayout.up` and :meth:`~ExpertLayout.down` always return ``[..., out, in]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import nn

from ..errors import UnsupportedExpertsError

__all__ = [
    "LAYOUTS",
    "ExpertLayout",
    "ExpertIgnore",
    "ExpertNaming",
    "ExpertScales",
    "ForwardContract",
    "GateUpSplit",
    "MoEBlock",
    "UnsupportedExpertsError",
    "described_layout",
    "find_moe_blocks",
    "layout_for",
]


class GateUpSplit(str, Enum):
    """How gate and up share the fused ``gate_up_proj`` output dimension."""

    HALVES = "halves"
    """First half of the output features is gate, second half is up."""
    INTERLEAVED = "interleaved"
    """Even output features are gate, odd ones are up (GPT-OSS)."""


class ForwardContract(str, Enum):
    """How the MoE block calls its experts module."""

    TOP_K = "top_k"
    """``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``
    (transformers-5 ``@use_experts_implementation`` classes)."""
    DENSE_ROUTED = "dense_routed"
    """``experts(hidden [E*T, H]) -> [E*T, H]``: every expert gets every token, pre-multiplied by
    its router score (0 for experts the token is not routed to); batched with ``bmm`` (Llama 4)."""


class ExpertScales(str, Enum):
    """How the serving engine reads the experts' scales: a numeric fact, whatever the names on disk."""

    PER_EXPERT = "per_expert"
    """A weight scale (and an input scale) per expert; each expert is quantized from the model's dtype,
    like a Linear."""
    ONE_PER_PROJECTION = "one_per_projection"
    """One weight scale and one input scale per projection (gate_up, down) for all experts of a layer, as
    ModelOpt's single quantizer of a 3-D experts tensor: the per-expert weight amax are unified to their
    max and the weights are quantized from fp32 (one rounding of ``w / scale``). The user's input-scale
    policy must then be ``shared``; ``per-expert`` is refused, never replaced."""


class ExpertNaming(str, Enum):
    """How experts are named in an exported ModelOpt checkpoint (names only: numerics follow :class:`ExpertScales`)."""

    PER_EXPERT = "per_expert"
    """2-D tensors per expert: ``<block>.experts.{e}.<gate|up|down leaf>.{weight, weight_scale, ...}``."""
    FUSED = "fused"
    """ModelOpt's fused 3-D names: ``<block>.experts.gate_up_proj``, ``..._weight_scale`` and so on,
    in the model's own orientation, one scale per projection shared by all experts."""


class ExpertIgnore(str, Enum):
    """How a compressed-tensors ``ignore`` list names an experts module left in bf16, so that vLLM sees it."""

    PER_EXPERT = "per_expert"
    """The module's name and every expert's projections (``<experts>.{e}.<gate|up|down leaf>``): vLLM 0.32's
    ``CompressedTensorsMoEMethod`` looks up ``<experts>.0.<leaf>`` for each leaf in the ignore list."""
    PATTERN = "pattern"
    """The module's name and one ``re:<experts>\\..*`` entry, no per-expert names: the model's
    ``hf_to_vllm_mapper`` rewrites names ending in ``.down_proj`` to its fused ``.w2_weight`` (GPT-OSS,
    ``vllm/model_executor/models/gpt_oss.py``), so per-expert entries would ignore gate and up but not down,
    and vLLM refuses the layer ("All MoE projections need to have same quantization scheme")."""


@dataclass(frozen=True, slots=True)
class ExpertLayout:
    """Facts about one expert family.

    Attributes:
        family: short name used in reports and errors.
        model_types: ``config.model_type`` values this layout describes.
        contract: how the block calls the experts module.
        transposed: parameters are ``[E, in, out]`` (else ``[E, out, in]``).
        split: gate/up arrangement in ``gate_up_proj``.
        has_bias: ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]`` exist.
        router: attribute of the MoE block holding the router (left in full precision).
        leaf_names: per-expert checkpoint names of the gate, up and down projections.
        naming: how the exporter names the experts on disk.
        scales: how the engine reads the experts' scales (the numerics; independent of ``naming``).
        no_block_scales: Linear-name patterns that must not get 2-D block scales in this family
            (vLLM permutes Llama 4's q/k weights and scales for rotary, which block scales break).
        native_mxfp4: the family has a native MXFP4 checkpoint format (``quant_method: mxfp4``,
            ``*_blocks`` / ``*_scales``) that vLLM and SGLang load (GPT-OSS).
        ct_ignore: how a compressed-tensors ``ignore`` list names unquantized experts of this family.
    """

    family: str
    model_types: tuple[str, ...]
    contract: ForwardContract = ForwardContract.TOP_K
    transposed: bool = False
    split: GateUpSplit = GateUpSplit.HALVES
    has_bias: bool = False
    router: str = "gate"
    leaf_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    naming: ExpertNaming = ExpertNaming.PER_EXPERT
    scales: ExpertScales = ExpertScales.PER_EXPERT
    no_block_scales: tuple[str, ...] = ()
    native_mxfp4: bool = False
    ct_ignore: ExpertIgnore = ExpertIgnore.PER_EXPERT

    def _oriented(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.transpose(-1, -2) if self.transposed else weight

    def _gate_up_out(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self._oriented(gate_up)  # [..., 2I, H]
        if self.split is GateUpSplit.INTERLEAVED:
            return w[..., 0::2, :], w[..., 1::2, :]
        half = w.shape[-2] // 2
        return w[..., :half, :], w[..., half:, :]

    def gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Gate weights ``[..., I, H]`` (a view) from ``gate_up_proj``."""
        return self._gate_up_out(gate_up)[0]

    def up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Up weights ``[..., I, H]`` (a view) from ``gate_up_proj``."""
        return self._gate_up_out(gate_up)[1]

    def down(self, down_proj: torch.Tensor) -> torch.Tensor:
        """Down weights ``[..., H, I]`` (a view) from ``down_proj``."""
        return self._oriented(down_proj)

    def fuse_rows(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Gate and up rows ``[..., I, in]`` -> ``[..., 2I, in]`` in the family's gate/up order."""
        if self.split is GateUpSplit.INTERLEAVED:
            return torch.stack((gate, up), dim=-2).flatten(-3, -2)
        return torch.cat((gate, up), dim=-2)

    def fuse(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`gate`/:meth:`up`: ``gate_up_proj`` in the model's own layout."""
        return self._oriented(self.fuse_rows(gate, up))

    def unorient_down(self, down: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`down`: ``down_proj`` in the model's own layout."""
        return self._oriented(down)


_FUSED_V5 = ExpertLayout(family="qwen3_moe", model_types=("qwen3_moe",))

LAYOUTS: tuple[ExpertLayout, ...] = (
    _FUSED_V5,
    replace(_FUSED_V5, family="qwen2_moe", model_types=("qwen2_moe",)),
    replace(_FUSED_V5, family="mixtral", model_types=("mixtral",), leaf_names=("w1", "w3", "w2")),
    replace(_FUSED_V5, family="deepseek_v3", model_types=("deepseek_v3",)),
    replace(_FUSED_V5, family="olmoe", model_types=("olmoe",)),
    ExpertLayout(
        family="llama4_text",
        model_types=("llama4_text",),
        contract=ForwardContract.DENSE_ROUTED,
        transposed=True,
        router="router",
        no_block_scales=("*.q_proj", "*.k_proj"),
    ),
    ExpertLayout(
        family="llama4",
        model_types=("llama4",),
        contract=ForwardContract.DENSE_ROUTED,
        transposed=True,
        router="router",
        naming=ExpertNaming.FUSED,
        scales=ExpertScales.ONE_PER_PROJECTION,
        no_block_scales=("*.q_proj", "*.k_proj"),
    ),
    ExpertLayout(
        family="gpt_oss",
        model_types=("gpt_oss",),
        transposed=True,
        split=GateUpSplit.INTERLEAVED,
        has_bias=True,
        router="router",
        naming=ExpertNaming.FUSED,
        scales=ExpertScales.ONE_PER_PROJECTION,
        native_mxfp4=True,
        ct_ignore=ExpertIgnore.PATTERN,
    ),
)
"""The known expert families."""


def _is_experts_module(module: nn.Module) -> bool:
    """The transformers-5 experts contract: a 3-D ``down_proj`` parameter ``[E, ...]``."""
    down = dict(module.named_parameters(recurse=False)).get("down_proj")
    return down is not None and down.dim() == 3


def _structural_layout(module: nn.Module, model_type: str) -> ExpertLayout:
    """A layout for a transformers-5 ``@use_experts_implementation`` class nobody described yet."""
    flags = ("is_transposed", "is_concatenated", "has_bias", "has_gate")
    params = dict(module.named_parameters(recurse=False))
    gated = getattr(module, "has_gate", False) and {"gate_up_proj", "down_proj"} <= set(params)
    if not all(hasattr(module, f) for f in flags) or not gated or getattr(module, "has_post_expert_norm", False):
        raise UnsupportedExpertsError(
            f"cannot quantize experts of class {type(module).__name__} (model_type {model_type!r}): it is not "
            "described by an ExpertLayout and is not a gated transformers-5 @use_experts_implementation module. "
            "Add an ExpertLayout entry to quantport.arch.experts.LAYOUTS (see README, 'Adding a model family'), "
            "or exclude these modules with --exclude."
        )
    return ExpertLayout(
        family=f"{model_type} (structural)",
        model_types=(model_type,),
        transposed=bool(module.is_transposed),
        split=GateUpSplit.HALVES if module.is_concatenated else GateUpSplit.INTERLEAVED,
        has_bias=bool(module.has_bias),
    )


def described_layout(model_type: str) -> ExpertLayout | None:
    """The :data:`LAYOUTS` row of ``model_type`` (None when no row describes it)."""
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    return None


def layout_for(model_type: str, experts: nn.Module) -> ExpertLayout:
    """The layout of ``experts`` in a model of ``model_type`` (table first, then structure)."""
    layout = described_layout(model_type)
    return layout if layout is not None else _structural_layout(experts, model_type)


@dataclass(frozen=True)
class MoEBlock:
    """One MoE layer: the block module name, its experts module and its layout."""

    name: str
    experts_name: str
    experts: nn.Module
    layout: ExpertLayout

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def find_moe_blocks(model: nn.Module) -> Iterator[MoEBlock]:
    """Every experts module (a module with a 3-D ``down_proj`` parameter) with its layout.

    Raises :class:`UnsupportedExpertsError` for experts nobody can classify, never skips them.
    """
    model_type = _model_type(model)
    for name, module in model.named_modules():
        if name and _is_experts_module(module):
            block = name.rsplit(".", 1)[0] if "." in name else ""
            yield MoEBlock(block, name, module, layout_for(model_type, module))

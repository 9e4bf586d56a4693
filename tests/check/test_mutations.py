"""Mutation suite: corrupt a copy of a valid checkpoint one way, expect the rule that owns that corruption.

Every mutation names its base checkpoint (a writer, family and recipe), the corruption, and the rule
id that must report it. The base checkpoints pass cleanly (test_valid.py), so whatever fires here
comes from the corruption.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from quantport.check import RULES, Severity, check_checkpoint, render_report

L0 = "model.layers.0"
L1 = "model.layers.1"
F32_ONE = torch.tensor(1.0)


@dataclass(frozen=True)
class Mutation:
    id: str
    base: tuple  # ("quantport", family, recipe, kv, shards) | ("modelopt", family, recipe) | ("ct", preset) | ...
    apply: Callable
    rule: str
    engine: str = "vllm"


def qp(family: str, recipe: str, kv: bool = False, shards: bool = False) -> tuple:
    return ("quantport", family, recipe, kv, shards)


def mo(family: str, recipe: str) -> tuple:
    return ("modelopt", family, recipe)


def _both_lists(e, fn: Callable[[list], None]) -> None:
    e.quant_config(lambda q: fn(q["ignore"]))
    e.hf_quant(lambda q: fn(q["exclude_modules"]))


def _truncate(e, nbytes: int = 64) -> None:
    file = e.shards()[0]
    file.write_bytes(file.read_bytes()[:-nbytes])


def _corrupt_header(e) -> None:
    file = e.shards()[0]
    data = bytearray(file.read_bytes())
    data[8:24] = b"#" * 16
    file.write_bytes(bytes(data))


def _index_wrong_shard(e) -> None:
    index = e.index
    name = f"{L0}.self_attn.q_proj.weight"
    other = next(f for f in sorted(set(index.values())) if f != index[name])
    e.edit_json("model.safetensors.index.json", lambda d: d["weight_map"].__setitem__(name, other))


def _duplicate(e) -> None:
    name = f"{L0}.self_attn.q_proj.weight_scale"
    tensor = e.get(name)
    target = next(f for f in e.shards() if f.name != e.index[name])
    tensors = e._read(target)
    tensors[name] = tensor
    from safetensors.torch import save_file

    save_file(tensors, target, metadata={"format": "pt"})


def _nvfp4_indivisible(e) -> None:
    e.set(f"{L0}.mlp.down_proj.weight", torch.zeros(128, 124, dtype=torch.uint8))
    e.set(f"{L0}.mlp.down_proj.weight_scale", torch.ones(128, 15).to(torch.float8_e4m3fn))


def _unquantize(e, module: str) -> None:
    e.set(f"{module}.weight", torch.zeros(64, 128, dtype=torch.bfloat16))
    for param in ("weight_scale", "input_scale"):
        e.set(f"{module}.{param}", None)


def _drop_quant_config(e) -> None:
    e.edit_json("config.json", lambda c: c.pop("quantization_config"))


def _copy_expert(e, block: str, src: int, dst: int) -> None:
    for name in [n for n in e.names() if n.startswith(f"{block}.experts.{src}.")]:
        e.set(name.replace(f".experts.{src}.", f".experts.{dst}."), e.get(name))


def _fix_llama4_arch(e) -> None:
    e.edit_json("config.json", lambda c: c.__setitem__("architectures", ["Llama4ForConditionalGeneration"]))


def _llama4_drop_scale(e) -> None:
    _fix_llama4_arch(e)
    e.set(f"{L1}.feed_forward.experts.gate_up_proj_input_scale", None)


def _llama4_bad_shape(e) -> None:
    _fix_llama4_arch(e)
    e.update(f"{L1}.feed_forward.experts.down_proj_weight_scale", lambda t: t[:, :1].contiguous())


def _ct_weight_shape(e) -> None:
    e.set(f"{L0}.self_attn.o_proj.weight_shape", torch.tensor([128, 256], dtype=torch.int64))


MUTATIONS: list[Mutation] = [
    # -- scale values
    Mutation(
        "nan-input-scale",
        qp("llama", "fp8"),
        lambda e: e.set(f"{L0}.self_attn.o_proj.input_scale", torch.tensor(float("nan"))),
        "scale.not-finite",
    ),
    Mutation(
        "inf-weight-scale-2",
        qp("qwen3", "nvfp4"),
        lambda e: e.set(f"{L1}.self_attn.o_proj.weight_scale_2", torch.tensor(float("inf"))),
        "scale.not-finite",
    ),
    Mutation(
        "zero-input-scale",
        qp("llama", "nvfp4"),
        lambda e: e.set(f"{L0}.mlp.down_proj.input_scale", torch.tensor(0.0)),
        "scale.not-positive",
    ),
    Mutation(
        "negative-kv-scale",
        qp("llama", "fp8", kv=True),
        lambda e: e.set(f"{L1}.self_attn.k_proj.k_scale", torch.tensor(-1.0)),
        "scale.not-positive",
    ),
    # -- dtype, shape, divisibility, missing / unexpected tensors
    Mutation(
        "weight-scale-bf16",
        qp("llama", "fp8"),
        lambda e: e.update(f"{L0}.self_attn.q_proj.weight_scale", lambda t: t.to(torch.bfloat16)),
        "tensor.dtype",
    ),
    Mutation(
        "weight-not-fp8",
        qp("qwen3", "mxfp8"),
        lambda e: e.update(f"{L1}.mlp.up_proj.weight", lambda t: t.to(torch.bfloat16)),
        "tensor.dtype",
    ),
    Mutation(
        "nvfp4-block-scale-shape",
        qp("llama", "nvfp4"),
        lambda e: e.update(f"{L0}.mlp.down_proj.weight_scale", lambda t: t[:, :-1].contiguous()),
        "tensor.shape",
    ),
    Mutation(
        "fp8-block-scale-3d",
        qp("llama", "fp8-block"),
        lambda e: e.update(f"{L1}.mlp.gate_proj.weight_scale", lambda t: t.reshape(2, 1, 1)),
        "tensor.shape",
    ),
    Mutation("nvfp4-indivisible", qp("llama", "nvfp4"), _nvfp4_indivisible, "tensor.divisibility"),
    Mutation(
        "missing-input-scale",
        qp("llama", "fp8"),
        lambda e: e.set(f"{L1}.self_attn.o_proj.input_scale", None),
        "tensor.missing",
    ),
    Mutation(
        "input-scale-on-dynamic",
        qp("llama", "fp8-dynamic"),
        lambda e: e.set(f"{L0}.self_attn.o_proj.input_scale", F32_ONE),
        "tensor.unexpected",
    ),
    # -- fused groups
    Mutation(
        "gate-up-global-scale-mismatch",
        qp("llama", "nvfp4"),
        lambda e: e.update(f"{L0}.mlp.up_proj.weight_scale_2", lambda t: t * 2),
        "group.global-scale-mismatch",
    ),
    Mutation(
        "qkv-input-scale-mismatch",
        qp("qwen3", "fp8"),
        lambda e: e.update(f"{L1}.self_attn.k_proj.input_scale", lambda t: t * 1.5),
        "group.input-scale-mismatch",
    ),
    # -- exclusions
    Mutation(
        "excluded-layer-has-scales",
        qp("llama", "fp8"),
        lambda e: (e.set("lm_head.weight_scale", F32_ONE), e.set("lm_head.input_scale", F32_ONE)),
        "exclusion.excluded-has-scales",
    ),
    Mutation(
        "quantized-layer-excluded",
        qp("llama", "nvfp4"),
        lambda e: _both_lists(e, lambda lst: lst.append(f"{L1}.self_attn.o_proj")),
        "exclusion.quantized-excluded",
    ),
    Mutation(
        "quantized-layer-excluded-sglang",
        qp("qwen3", "fp8"),
        lambda e: _both_lists(e, lambda lst: lst.append("*o_proj")),
        "exclusion.quantized-excluded",
        "sglang",
    ),
    Mutation(
        "unquantized-layer-unlisted",
        qp("llama", "fp8"),
        lambda e: _both_lists(e, lambda lst: lst.remove("lm_head")),
        "exclusion.unlisted",
    ),
    Mutation(
        "one-of-qkv-excluded",
        qp("llama", "fp8"),
        lambda e: _both_lists(e, lambda lst: lst.append(f"{L0}.self_attn.k_proj")),
        "exclusion.partial-shards",
    ),
    Mutation(
        "one-of-qkv-unquantized",
        qp("llama", "fp8"),
        lambda e: _unquantize(e, f"{L0}.self_attn.v_proj"),
        "exclusion.fused-mixed",
    ),
    # -- shards
    Mutation(
        "missing-shard",
        qp("llama", "nvfp4", kv=True, shards=True),
        lambda e: e.shards()[1].unlink(),
        "shards.missing-file",
    ),
    Mutation(
        "index-wrong-shard", qp("llama", "nvfp4", kv=True, shards=True), _index_wrong_shard, "shards.index-wrong-shard"
    ),
    Mutation("duplicate-tensor", qp("llama", "nvfp4", kv=True, shards=True), _duplicate, "shards.duplicate"),
    Mutation("truncated-safetensors", qp("llama", "fp8"), _truncate, "shards.truncated"),
    Mutation("corrupt-header", qp("qwen3", "fp8"), _corrupt_header, "shards.unreadable"),
    # -- config files
    Mutation(
        "quant-algo-disagrees",
        qp("llama", "nvfp4"),
        lambda e: e.hf_quant(lambda q: q.__setitem__("quant_algo", "FP8")),
        "hfq.mismatch",
    ),
    Mutation(
        "nvfp4-hfq-no-group-size",
        qp("llama", "nvfp4"),
        lambda e: e.hf_quant(lambda q: q.pop("group_size")),
        "hfq.group-size",
    ),
    Mutation(
        "hfq-no-kv-key",
        qp("qwen3", "fp8"),
        lambda e: e.hf_quant(lambda q: q.pop("kv_cache_quant_algo")),
        "hfq.missing-key",
    ),
    Mutation(
        "hfq-wrong-producer",
        qp("qwen3", "fp8"),
        lambda e: e.edit_json("hf_quant_config.json", lambda c: c["producer"].__setitem__("name", "quantport")),
        "hfq.producer",
    ),
    Mutation(
        "unknown-quant-algo",
        qp("llama", "fp8"),
        lambda e: e.quant_config(lambda q: q.__setitem__("quant_algo", "INT4_AWQ")),
        "config.quant-algo",
    ),
    Mutation(
        "no-quant-method",
        qp("llama", "fp8"),
        lambda e: e.quant_config(lambda q: q.pop("quant_method")),
        "config.quant-method",
    ),
    Mutation(
        "nvfp4-group-size-32",
        qp("llama", "nvfp4"),
        lambda e: e.quant_config(lambda q: q.__setitem__("group_size", 32)),
        "config.group-size",
    ),
    Mutation(
        "no-quantization-config",
        qp("llama", "fp8"),
        lambda e: (_drop_quant_config(e), (e.path / "hf_quant_config.json").unlink()),
        "config.no-quantization",
    ),
    Mutation("w4a16-only-in-legacy-file", qp("llama", "w4a16-nvfp4"), _drop_quant_config, "config.legacy-only"),
    # -- stray tensors
    Mutation(
        "stray-amax",
        qp("llama", "fp8"),
        lambda e: e.set(f"{L0}.self_attn.q_proj.input_quantizer._amax", F32_ONE),
        "stray.amax",
    ),
    Mutation(
        "stray-pre-quant-scale",
        qp("llama", "nvfp4"),
        lambda e: e.set(f"{L0}.self_attn.o_proj.pre_quant_scale", torch.ones(128, dtype=torch.bfloat16)),
        "stray.pre-quant-scale",
    ),
    Mutation(
        "stray-weight-shape",
        qp("qwen3", "nvfp4"),
        lambda e: e.set(f"{L0}.self_attn.o_proj.weight_shape", torch.tensor([128, 128])),
        "stray.weight-shape",
    ),
    # -- KV cache
    Mutation(
        "kv-scale-missing-in-one-layer",
        qp("llama", "fp8", kv=True),
        lambda e: e.set(f"{L1}.self_attn.v_proj.v_scale", None),
        "kv.partial",
    ),
    Mutation(
        "kv-scale-wrong-name",
        qp("qwen3", "nvfp4", kv=True),
        lambda e: (
            e.set(f"{L0}.self_attn.k_proj.v_scale", e.get(f"{L0}.self_attn.k_proj.k_scale")),
            e.set(f"{L0}.self_attn.k_proj.k_scale", None),
        ),
        "kv.name",
    ),
    Mutation(
        "kv-scale-bf16",
        qp("llama", "fp8", kv=True),
        lambda e: e.update(f"{L0}.self_attn.k_proj.k_scale", lambda t: t.to(torch.bfloat16)),
        "kv.dtype",
    ),
    # -- MoE (nvidia-modelopt exports)
    Mutation(
        "drop-one-expert-input-scale",
        mo("qwen3_moe", "nvfp4"),
        lambda e: e.set(f"{L1}.mlp.experts.2.up_proj.input_scale", None),
        "moe.expert-incomplete",
    ),
    Mutation(
        "drop-whole-expert",
        mo("mixtral", "fp8"),
        lambda e: e.delete_matching(lambda n: n.startswith(f"{L0}.block_sparse_moe.experts.3.")),
        "moe.expert-missing",
    ),
    Mutation(
        "expert-beyond-count",
        mo("deepseek_v3", "nvfp4"),
        lambda e: _copy_expert(e, f"{L1}.mlp", 0, 4),
        "moe.expert-unexpected",
    ),
    Mutation(
        "config-expects-more-experts",
        mo("qwen3_moe", "nvfp4"),
        lambda e: e.edit_json("config.json", lambda c: c.__setitem__("num_experts", 8)),
        "moe.expert-missing",
    ),
    Mutation(
        "expert-nan-input-scale",
        mo("qwen2_moe", "fp8"),
        lambda e: e.set(f"{L1}.mlp.experts.1.down_proj.input_scale", torch.tensor(float("nan"))),
        "scale.not-finite",
    ),
    Mutation(
        "expert-input-scale-outlier",
        mo("qwen3_moe", "nvfp4"),
        lambda e: [
            e.update(f"{L0}.mlp.experts.0.{p}.input_scale", lambda t: t * 100) for p in ("gate_proj", "up_proj")
        ],
        "moe.input-scale-outlier",
    ),
    Mutation(
        "expert-w1-w3-mismatch",
        mo("mixtral", "fp8"),
        lambda e: e.update(f"{L1}.block_sparse_moe.experts.1.w3.input_scale", lambda t: t * 2),
        "group.input-scale-mismatch",
    ),
    Mutation("llama4-fused-scale-missing", mo("llama4_text", "nvfp4"), _llama4_drop_scale, "moe.expert-incomplete"),
    Mutation("llama4-fused-scale-shape", mo("llama4_text", "nvfp4"), _llama4_bad_shape, "moe.fused-shape"),
    Mutation(
        "llama4-qk-block-scale",
        mo("llama4_text", "nvfp4"),
        lambda e: (_fix_llama4_arch(e), e.set(f"{L0}.self_attn.q_proj.weight_scale", torch.ones(1, 1, 1, 1))),
        "llama4.qk-block-scale",
    ),
    # -- GPT-OSS native mxfp4
    Mutation(
        "gpt-oss-mxfp4-missing-scales",
        ("gpt_oss_mxfp4",),
        lambda e: e.set(f"{L0}.mlp.experts.down_proj_scales", None),
        "gptoss.mxfp4-layout",
    ),
    Mutation(
        "gpt-oss-mxfp4-nan-scale",
        ("gpt_oss_mxfp4",),
        lambda e: e.update(f"{L1}.mlp.experts.gate_up_proj_scales", lambda t: t.index_fill(0, torch.tensor([1]), 255)),
        "scale.not-finite",
    ),
    # -- compressed-tensors
    Mutation(
        "ct-nvfp4-global-scale-mismatch",
        ("ct", "NVFP4"),
        lambda e: e.update(f"{L0}.self_attn.k_proj.weight_global_scale", lambda t: t * 2),
        "group.global-scale-mismatch",
    ),
    Mutation(
        "ct-nvfp4-input-global-scale-mismatch",
        ("ct", "NVFP4"),
        lambda e: e.update(f"{L1}.mlp.gate_proj.input_global_scale", lambda t: t / 2),
        "group.input-scale-mismatch",
    ),
    Mutation("ct-pack-weight-shape", ("ct", "W4A16"), _ct_weight_shape, "tensor.shape"),
    Mutation(
        "ct-ignore-one-of-gate-up",
        ("ct", "FP8"),
        lambda e: e.quant_config(lambda q: q["ignore"].append(f"{L0}.mlp.gate_proj")),
        "exclusion.partial-shards",
    ),
    Mutation(
        "ct-ignore-regex-hits-quantized",
        ("ct", "FP8_DYNAMIC"),
        lambda e: e.quant_config(lambda q: q["ignore"].append("re:.*o_proj$")),
        "exclusion.quantized-excluded",
    ),
    Mutation(
        "ct-unknown-format",
        ("ct", "W8A8"),
        lambda e: e.quant_config(lambda q: q.__setitem__("format", "int-magic")),
        "config.ct-format",
    ),
    Mutation(
        "ct-not-compressed",
        ("ct", "MXFP8"),
        lambda e: e.quant_config(lambda q: q.__setitem__("quantization_status", "frozen")),
        "config.ct-status",
    ),
    Mutation(
        "ct-moe-drop-expert-global-scale",
        ("ct_moe",),
        lambda e: e.set(f"{L1}.mlp.experts.1.down_proj.input_global_scale", None),
        "moe.expert-incomplete",
    ),
]


def _add_index_entry(e, name: str) -> None:
    index = e.index
    e.edit_json(
        "model.safetensors.index.json",
        lambda d: d["weight_map"].__setitem__(name, index[f"{L0}.self_attn.q_proj.weight"]),
    )


def _drop_index_entry(e, name: str) -> None:
    e.edit_json("model.safetensors.index.json", lambda d: d["weight_map"].pop(name))


def _fused_alongside(e) -> None:
    e.set(f"{L1}.mlp.experts.gate_up_proj", torch.zeros(4, 64, 64, dtype=torch.bfloat16))


def _algo_both(e, algo: str) -> None:
    e.quant_config(lambda q: q.__setitem__("quant_algo", algo))
    e.hf_quant(lambda q: q.__setitem__("quant_algo", algo))


MUTATIONS += [
    # -- more config, shard, exclusion and MoE cases
    Mutation(
        "ignore-not-a-list",
        qp("llama", "fp8"),
        lambda e: e.quant_config(lambda q: q.__setitem__("ignore", "lm_head")),
        "config.ignore-type",
    ),
    Mutation(
        "kv-algo-unknown",
        qp("llama", "fp8", kv=True),
        lambda e: e.hf_quant(lambda q: q.__setitem__("kv_cache_quant_algo", "INT4")),
        "config.kv-cache",
    ),
    Mutation(
        "mixed-without-layers", qp("llama", "fp8"), lambda e: _algo_both(e, "MIXED_PRECISION"), "config.mixed-precision"
    ),
    Mutation(
        "ct-group-without-group-size",
        ("ct", "W4A16"),
        lambda e: e.quant_config(lambda q: q["config_groups"]["group_0"]["weights"].pop("group_size")),
        "config.ct-group",
    ),
    Mutation(
        "index-names-absent-tensor",
        qp("llama", "nvfp4", kv=True, shards=True),
        lambda e: _add_index_entry(e, f"{L0}.self_attn.q_proj.bias"),
        "shards.index-missing-key",
    ),
    Mutation(
        "index-lacks-tensor",
        qp("llama", "nvfp4", kv=True, shards=True),
        lambda e: _drop_index_entry(e, f"{L0}.input_layernorm.weight"),
        "shards.unindexed",
    ),
    Mutation(
        "index-deleted",
        qp("llama", "nvfp4", kv=True, shards=True),
        lambda e: (e.path / "model.safetensors.index.json").unlink(),
        "shards.no-index",
    ),
    Mutation(
        "index-not-json",
        qp("llama", "nvfp4", kv=True, shards=True),
        lambda e: (e.path / "model.safetensors.index.json").write_text("{}"),
        "shards.index-unreadable",
    ),
    Mutation("no-safetensors", qp("llama", "fp8"), lambda e: [f.unlink() for f in e.shards()], "shards.no-weights"),
    Mutation(
        "stray-quantizer-state",
        qp("qwen3", "fp8"),
        lambda e: e.set(f"{L0}.mlp.up_proj.weight_quantizer._scale", F32_ONE),
        "stray.quantizer-state",
    ),
    Mutation(
        "kv-config-without-scales",
        qp("llama", "fp8", kv=True),
        lambda e: e.delete_matching(lambda n: n.endswith(("k_scale", "v_scale"))),
        "kv.missing",
    ),
    Mutation(
        "pattern-hits-member-only",
        qp("llama", "fp8"),
        lambda e: _both_lists(e, lambda lst: lst.append("*.layers.0.self_attn.k_proj")),
        "exclusion.member-disagree",
    ),
    Mutation(
        "ct-class-name-ignore",
        ("ct", "FP8"),
        lambda e: e.quant_config(lambda q: q["ignore"].append("LlamaAttention")),
        "exclusion.class-name",
    ),
    Mutation(
        "ct-targets-miss-mlp",
        ("ct", "FP8"),
        lambda e: e.quant_config(
            lambda q: q["config_groups"]["group_0"].__setitem__("targets", [r"re:.*self_attn\..*"])
        ),
        "exclusion.untargeted",
    ),
    Mutation(
        "fp8-per-channel-experts",
        mo("qwen2_moe", "fp8"),
        lambda e: _algo_both(e, "FP8_PER_CHANNEL_PER_TOKEN"),
        "moe.scheme-unsupported",
    ),
    Mutation("fused-and-per-expert", mo("qwen3_moe", "nvfp4"), _fused_alongside, "moe.fused-naming"),
    Mutation("config-json-missing", qp("llama", "fp8"), lambda e: (e.path / "config.json").unlink(), "config.missing"),
    Mutation(
        "no-expert-count",
        mo("mixtral", "fp8"),
        lambda e: e.edit_json("config.json", lambda c: c.pop("num_local_experts")),
        "moe.expert-count-unknown",
    ),
]


def _per_expert_ignore(e) -> None:
    """The ignore list quantport wrote before issue 19: experts.{e}.<leaf> names instead of one re: pattern."""

    def rewrite(q):
        experts = [p for p in q["ignore"] if p.startswith("re:")]
        q["ignore"] = [p for p in q["ignore"] if not p.startswith("re:")] + [
            f"{L}.mlp.experts.{x}.{leaf}"
            for L in (L0, L1)
            for x in range(4)
            for leaf in ("gate_proj", "up_proj", "down_proj")
        ]
        assert experts, "the base checkpoint ignores its experts with re: patterns"

    e.quant_config(rewrite)


def _tie_and_drop_lm_head(e) -> None:
    e.edit_json("config.json", lambda c: c.__setitem__("tie_word_embeddings", True))
    e.set("lm_head.weight", None)


MUTATIONS += [
    # -- engine facts about a whole family (issue 19)
    Mutation(
        "gpt-oss-ct-per-expert-ignore", ("gpt_oss_ct_bf16_experts",), _per_expert_ignore, "engine.expert-ignore-names"
    ),
    Mutation("gpt-oss-tied-without-lm-head", ("gpt_oss_mxfp4",), _tie_and_drop_lm_head, "engine.lm-head-untied"),
]


@pytest.fixture(scope="session")
def gpt_oss_ct_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """quantport's GPT-OSS compressed-tensors int8 export with the experts left in bf16."""
    import quantport
    from moe_models import tiny_moe
    from quantport.export import recipe_for_format
    from tiny_models import make_calibration_batches

    model = tiny_moe("gpt_oss")
    quantport.quantize(
        model,
        recipe_for_format("int8", "compressed-tensors"),
        make_calibration_batches(vocab_size=256, n=1, seq=16),
        exclude=["*.mlp.experts"],
        progress=False,
    )
    return quantport.export(model, tmp_path_factory.mktemp("gpt-oss-ct") / "out", "compressed-tensors", progress=False)


def test_gpt_oss_ct_bf16_experts_pass(gpt_oss_ct_ckpt):
    report = check_checkpoint(gpt_oss_ct_ckpt)
    assert report.findings == [], render_report(report)


def _header(e, fn: Callable[[dict], None]) -> None:
    """Edit the JSON header of the first shard in place (the data section is kept)."""
    import json

    file = e.shards()[0]
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    fn(header)
    blob = json.dumps(header).encode()
    file.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _alias(header: dict) -> None:
    scales = [k for k in _by_offset(header) if k.endswith("input_scale")]
    header[scales[1]]["data_offsets"] = list(header[scales[0]]["data_offsets"])


def _overlap(header: dict) -> None:
    name = _by_offset(header)[3]
    header[name]["data_offsets"] = [o - 1 for o in header[name]["data_offsets"]]


def _set_config(key: str, value) -> Callable:
    return lambda e: e.edit_json("config.json", lambda c: c.__setitem__(key, value))


def _poison(name: str, value: float) -> Callable:
    def apply(e) -> None:
        tensor = e.get(name).clone()
        tensor.view(-1)[0] = value
        e.set(name, tensor)

    return apply


def _index_outside(e) -> None:
    def move(d: dict) -> None:
        first = sorted(set(d["weight_map"].values()))[0]
        d["weight_map"] = {k: "../" + v if v == first else v for k, v in d["weight_map"].items()}

    e.edit_json("model.safetensors.index.json", move)


MUTATIONS += [
    # -- hostile headers, files and configs (issue 11)
    Mutation("header-offsets-aliased", qp("llama", "fp8"), lambda e: _header(e, _alias), "shards.unreadable"),
    Mutation("header-offsets-overlap", qp("llama", "fp8"), lambda e: _header(e, _overlap), "shards.unreadable"),
    Mutation(
        "header-offsets-strings",
        qp("llama", "fp8"),
        lambda e: _header(
            e,
            lambda h: h[_by_offset(h)[0]].__setitem__(
                "data_offsets", [str(o) for o in h[_by_offset(h)[0]]["data_offsets"]]
            ),
        ),
        "shards.unreadable",
    ),
    Mutation(
        "header-metadata-list",
        qp("llama", "fp8"),
        lambda e: _header(e, lambda h: h.__setitem__("__metadata__", ["pt"])),
        "shards.unreadable",
    ),
    Mutation(
        "shard-is-a-fifo",
        qp("llama", "fp8"),
        lambda e: (e.shards()[0].unlink(), os.mkfifo(e.path / "model.safetensors")),
        "shards.unreadable",
    ),
    Mutation(
        "quantization-config-string",
        qp("llama", "fp8"),
        _set_config("quantization_config", "modelopt"),
        "config.quant-config-type",
    ),
    Mutation(
        "quantization-config-list",
        qp("llama", "nvfp4"),
        _set_config("quantization_config", [{}]),
        "config.quant-config-type",
    ),
    Mutation(
        "num-hidden-layers-string", qp("llama", "fp8"), _set_config("num_hidden_layers", "abc"), "config.model-field"
    ),
    Mutation("hidden-size-negative", qp("qwen3", "fp8"), _set_config("hidden_size", -1), "config.model-field"),
    Mutation("num-experts-string", mo("qwen3_moe", "nvfp4"), _set_config("num_experts", "4"), "config.model-field"),
    Mutation("nan-lm-head", qp("llama", "fp8"), _poison("lm_head.weight", float("nan")), "weight.not-finite"),
    Mutation(
        "inf-input-layernorm",
        qp("qwen3", "nvfp4"),
        _poison(f"{L1}.input_layernorm.weight", float("inf")),
        "weight.not-finite",
    ),
    Mutation(
        "nan-tied-embedding",
        qp("qwen3", "fp8"),
        _poison("model.embed_tokens.weight", float("nan")),
        "weight.not-finite",
    ),
    Mutation("index-points-outside", qp("llama", "nvfp4", kv=True, shards=True), _index_outside, "shards.index-path"),
    Mutation(
        "index-total-size-wrong",
        qp("llama", "nvfp4", kv=True, shards=True),
        lambda e: e.edit_json("model.safetensors.index.json", lambda d: d["metadata"].__setitem__("total_size", 1)),
        "shards.index-total-size",
    ),
]

NEEDS_MODELOPT = {"modelopt", "ct_moe"}


def _param(m: Mutation):
    marks = [pytest.mark.reference] if m.base[0] in NEEDS_MODELOPT else []
    return pytest.param(m, id=m.id, marks=marks)


@pytest.fixture
def base_checkpoint(request, quantport_ckpt, ct_ckpt, gpt_oss_mxfp4_ckpt):
    def resolve(base: tuple):
        kind, *args = base
        if kind == "quantport":
            return quantport_ckpt(*args)
        if kind == "ct":
            return ct_ckpt(*args)
        if kind == "gpt_oss_mxfp4":
            return gpt_oss_mxfp4_ckpt
        if kind == "gpt_oss_ct_bf16_experts":
            return request.getfixturevalue("gpt_oss_ct_ckpt")
        if kind == "modelopt":
            return request.getfixturevalue("modelopt_ckpt")(*args)
        return request.getfixturevalue("ct_moe_ckpt")

    return resolve


@pytest.mark.parametrize("mutation", [_param(m) for m in MUTATIONS])
def test_mutation_is_reported_with_its_rule(mutation: Mutation, base_checkpoint, edit):
    copy = edit(base_checkpoint(mutation.base))
    mutation.apply(copy)
    report = check_checkpoint(copy.path, mutation.engine)
    assert mutation.rule in report.rules(), render_report(report)
    assert "check.internal-error" not in report.rules(), render_report(report)
    hits = [f for f in report.findings if f.rule == mutation.rule]
    assert all(f.message and f.fix for f in hits)
    if RULES[mutation.rule].severity is Severity.ERROR:
        assert not report.ok


def test_suite_covers_at_least_fifteen_rules():
    assert len({m.rule for m in MUTATIONS}) >= 15
    assert len({m.id for m in MUTATIONS}) == len(MUTATIONS)
    assert all(m.rule in RULES for m in MUTATIONS)


def test_rule_ids_are_stable_dotted_names():
    for rule_id, rule in RULES.items():
        assert re.fullmatch(r"[a-z0-9]+\.[a-z0-9-]+", rule_id), rule_id
        assert rule.summary and rule.fix


def test_engines_match_exclusions_differently(quantport_ckpt, edit):
    """vLLM's legacy substring rule excludes everything under model.layers.0.mlp; SGLang's regex does not."""
    copy = edit(quantport_ckpt("llama", "fp8"))
    _both_lists(copy, lambda lst: lst.append(f"{L0}.mlp"))
    assert "exclusion.quantized-excluded" in check_checkpoint(copy.path, "vllm").rules()
    assert check_checkpoint(copy.path, "sglang").findings == []


def test_unreadable_hf_quant_config(quantport_ckpt, edit):
    copy = edit(quantport_ckpt("llama", "fp8"))
    (copy.path / "hf_quant_config.json").write_text("{not json")
    assert check_checkpoint(copy.path).rules() == {"hfq.unreadable"}

"""HubNames resolves many modules in one transformers call with the same answer as one call each."""

from __future__ import annotations

import re

import pytest
import torch
from transformers.core_model_loading import revert_weight_conversion

from moe_models import tiny_moe
from quantport.arch.hub_names import HubNames


def _one_call(model: torch.nn.Module, module_name: str) -> str:
    """Independent: transformers' revert on a single probe, as quantport did before it batched."""
    (renamed,) = revert_weight_conversion(model, {f"{module_name}.probe": torch.empty((), device="meta")})
    return renamed.rsplit(".", 1)[0]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text", "llama4"])
def test_prefetched_names_equal_one_call_each(family: str) -> None:
    model = tiny_moe(family)
    experts = [name for name, module in model.named_modules() if name.endswith(".experts")]
    wanted = [name for name, _ in model.named_modules() if name] + [
        f"{name}.{e}.{leaf}" for name in experts for e in range(3) for leaf in ("gate_proj", "w1", "down_proj")
    ]
    names = HubNames(model)
    names.prefetch(wanted)
    compared = 0
    for module_name in wanted:
        assert names.module(module_name) == _one_call(model, module_name), module_name
        compared += 1
    assert compared == len(wanted) > 10
    if family == "mixtral":  # the family whose hub names differ from its module names
        assert names.module(f"{experts[0]}.1.w1") == _one_call(model, f"{experts[0]}.1.w1")
        assert "block_sparse_moe" in names.module(f"{experts[0]}.1.w1")


def test_module_without_prefetch_resolves_the_whole_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_moe("mixtral")
    names = HubNames(model)
    calls = []
    original = names._revert
    monkeypatch.setattr(names, "_revert", lambda tensors: calls.append(len(tensors)) or original(tensors))
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    resolved = [names.module(name) for name in linears]
    assert len(calls) == 1 and calls[0] > len(linears)
    assert resolved == [_one_call(model, name) for name in linears]


def test_names_of_one_shape_are_resolved_from_two(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_moe("mixtral")
    names = HubNames(model)
    probes: list[int] = []
    original = names._revert
    monkeypatch.setattr(names, "_revert", lambda tensors: probes.append(len(tensors)) or original(tensors))
    wanted = [f"model.layers.{i}.mlp.experts.{e}.w1" for i in range(2) for e in range(50)]
    names.prefetch(wanted)
    assert probes == [2]  # one shape: two names asked, 98 filled in
    assert names.module("model.layers.1.mlp.experts.47.w1") == "model.layers.1.block_sparse_moe.experts.47.w1"
    assert names.module("model.layers.1.mlp.experts.47.w1") == _one_call(model, "model.layers.1.mlp.experts.47.w1")


def test_a_shape_whose_numbers_change_is_resolved_name_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    names = HubNames(tiny_moe("qwen3_moe"))
    asked: list[list[str]] = []

    def shifted(tensors):  # a conversion that renumbers experts: no shared text can be learned
        asked.append(list(tensors))
        return {re.sub(r"experts\.(\d+)", lambda m: f"experts.{int(m[1]) + 1}", k): t for k, t in tensors.items()}

    monkeypatch.setattr(names, "_revert", shifted)
    names.prefetch([f"m.experts.{e}.up" for e in range(5)])
    assert [len(a) for a in asked] == [2, 3]  # the first two, then the three others through the conversion
    assert [names.module(f"m.experts.{e}.up") for e in range(5)] == [f"m.experts.{e + 1}.up" for e in range(5)]

"""Test helpers for reading exported checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``directory``."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def is_activation_scale(name: str) -> bool:
    """Scales derived from calibrated activations (compared within 1e-6, not bitwise)."""
    return name.endswith(("input_scale", "k_scale", "v_scale"))


def assert_same_tensor(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical for weights and weight scales, 1e-6 relative for activation scales."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if is_activation_scale(name):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0, msg=name)
    else:
        assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


def assert_matches_reference(ours: Path, reference: Path) -> None:
    """Same tensor names, each tensor as :func:`assert_same_tensor` says, and the same nested
    ``hf_quant_config.json`` settings (quant_algo, KV algo, group size, excluded modules)."""
    mine, ref = load_tensors(ours), load_tensors(reference)
    assert sorted(mine) == sorted(ref)
    for name, expected in ref.items():
        assert_same_tensor(name, mine[name], expected)
    ref_nested = json.loads((Path(reference) / "hf_quant_config.json").read_text())["quantization"]
    our_nested = json.loads((Path(ours) / "hf_quant_config.json").read_text())["quantization"]
    for key in ("quant_algo", "kv_cache_quant_algo", "group_size"):
        assert our_nested.get(key) == ref_nested.get(key), key
    assert set(our_nested["exclude_modules"]) == set(ref_nested["exclude_modules"])

"""Loading a MoE layer holds its parameters plus one piece, never every expert twice (issue 12).

transformers' own loading stacks every per-expert tensor into the fused parameter while the per-expert
tensors are alive (twice the layer, plus the FP8 codes). The layer store fills each fused parameter expert
by expert (or a few experts at a time), so the peak of live tensors allocated while a layer loads stays
below the layer's bytes plus one piece's temporaries. Measured on the CPU with :class:`live_memory.LiveBytes`
(every allocation counted until freed); the GPU test measures ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from live_memory import LiveBytes, storage_bytes
from quantport.sequential import expert_fill, open_layer_by_layer
from sources.published_layouts import (
    FP8_CONFIG,
    MXFP4_CONFIG,
    bf16_model,
    deepseek_config,
    fp8_block_quantize,
    gpt_oss_config,
    hub_state_dict,
    is_deepseek_fp8,
    mxfp4_quantize,
    write_checkpoint,
)

EXPERTS = 32
MOE_LAYER = 1
PIECE_BYTES_PER_ELEMENT = 8
"""Temporaries of reading one piece, per logical element: FP8 codes (1) + float32 product (4) + result (2),
or MXFP4 packed codes, their indices and the result; 8 bounds every source."""


def _deepseek(directory: Path, *, fp8: bool) -> Path:
    """DeepSeek-V3 (layer 1 MoE) with 32 per-expert checkpoint tensors per projection, FP8 blocks or bf16."""
    config = deepseek_config(divisible=False)
    config.n_routed_experts = EXPERTS
    stored = {}
    for name, tensor in hub_state_dict(bf16_model(config)).items():
        if fp8 and is_deepseek_fp8(name, tensor):
            stored[name], stored[name + "_scale_inv"] = fp8_block_quantize(tensor)
        else:
            stored[name] = tensor
    return write_checkpoint(directory, config, stored, FP8_CONFIG if fp8 else None)


def _gpt_oss(directory: Path, *, mxfp4: bool) -> Path:
    """GPT-OSS with 32 experts, its fused experts tensors stored whole (MXFP4 blocks or bf16)."""
    config = gpt_oss_config()
    config.num_local_experts = EXPERTS
    stored = {}
    for name, tensor in hub_state_dict(bf16_model(config)).items():
        if mxfp4 and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[name + "_blocks"], stored[name + "_scales"] = mxfp4_quantize(tensor)
        else:
            stored[name] = tensor
    return write_checkpoint(directory, config, stored, MXFP4_CONFIG if mxfp4 else None)


CHECKPOINTS = {
    "deepseek-fp8-block": lambda d: _deepseek(d, fp8=True),
    "deepseek-plain": lambda d: _deepseek(d, fp8=False),
    "gpt-oss-mxfp4": lambda d: _gpt_oss(d, mxfp4=True),
    "gpt-oss-plain": lambda d: _gpt_oss(d, mxfp4=False),
}


def _piece_bytes(store, layer: int) -> int:
    """The bound on one piece's temporaries: the layer's largest tensor read at once (a fused ``[E, ...]``
    experts tensor is read one expert at a time here), times :data:`PIECE_BYTES_PER_ELEMENT`."""
    infos = store.source.tensors()
    largest = 0
    for name in store.checkpoint_names(layer):
        shape = infos[name].shape
        numel = torch.Size(shape).numel()
        largest = max(largest, numel // shape[0] if len(shape) >= 3 else numel)
    return largest * PIECE_BYTES_PER_ELEMENT


def _layer_bytes(layer: torch.nn.Module) -> int:
    return storage_bytes([*layer.parameters(), *layer.buffers()])


def _expert_bytes(layer: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in layer.named_parameters() if ".experts." in f".{n}")


def _open(directory: Path, monkeypatch: pytest.MonkeyPatch, device: str = "cpu"):
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # transformers' loading in this thread (modes are per thread)
    monkeypatch.setattr(expert_fill, "ROW_CHUNK_BYTES", 1)  # fused tensors stored whole: one expert per read
    model = open_layer_by_layer(directory, device=device)
    return model.__dict__["_quantport_layer_store"]


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_moe_layer_load_peak_is_the_layer_plus_one_piece(tmp_path: Path, monkeypatch, kind: str) -> None:
    store = _open(CHECKPOINTS[kind](tmp_path / kind), monkeypatch)
    with LiveBytes() as live:
        layer = store.load(MOE_LAYER)
    layer_bytes, piece = _layer_bytes(layer), _piece_bytes(store, MOE_LAYER)
    experts = _expert_bytes(layer)
    assert experts > 8 * piece  # the bound below is far from "every expert twice"
    assert live.now >= layer_bytes  # the layer's tensors were counted
    assert live.peak <= layer_bytes + piece, (live.peak, layer_bytes, piece, experts)


def test_fused_experts_equal_the_whole_model(tmp_path: Path, monkeypatch) -> None:
    """The pieces land where transformers' stack and concatenation put them."""
    from quantport.loading import load_model

    directory = _deepseek(tmp_path / "plain", fp8=False)
    whole, _ = load_model(directory, device="cpu", progress=False)
    layer = _open(directory, monkeypatch).load(MOE_LAYER)
    expected = whole.model.layers[MOE_LAYER].state_dict()
    got = layer.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["deepseek-fp8-block", "gpt-oss-mxfp4"])
def test_gpu_moe_layer_load_peak_is_the_layer_plus_one_piece(tmp_path: Path, monkeypatch, kind: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    store = _open(CHECKPOINTS[kind](tmp_path / kind), monkeypatch, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    layer = store.load(MOE_LAYER)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    layer_bytes, piece = _layer_bytes(layer), _piece_bytes(store, MOE_LAYER)
    # the caching allocator rounds each block up to 512 bytes: one rounding per tensor of the layer
    rounding = 512 * (len(list(layer.parameters())) + len(list(layer.buffers())) + 16)
    assert peak <= layer_bytes + piece + rounding, (peak, layer_bytes, piece)

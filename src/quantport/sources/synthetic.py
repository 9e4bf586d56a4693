"""A weight source that generates every tensor on the device: a 671B-shaped model without a disk.

:class:`SyntheticSource` draws each tensor from a generator seeded by ``(name, seed)`` on the device it
is read onto: weights ``normal * 0.02``, norm weights ones. With ``fp8_block`` the quantized Linears are
generated as an FP8-block checkpoint holds them (float8_e4m3fn codes scaled so each 128x128 block's
largest magnitude is 448, plus fp32 ``weight_scale_inv = amax / 448``) and returned through the same
:func:`~quantport.sources.dequant.dequantize_fp8_block` as a real checkpoint.

Determinism: the same name, seed, shape and device type give the same bytes on every call. CPU and CUDA
use different generators (mt19937 vs Philox), so a tensor read onto the CPU differs from the same tensor
read onto a GPU; and because PyTorch's CUDA sampling layout follows the GPU's multiprocessor count, two
GPU models may differ too. Compare runs on one kind of device.

:func:`model_tensor_infos` gives the infos of a transformers config (built on the meta device) under the
checkpoint (hub) names that ``save_pretrained`` writes, so a synthetic source and a real checkpoint of the
model answer to the same names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from .base import SourceFormat, TensorInfo, unknown_names_error
from .dequant import dequantize_fp8_block

__all__ = ["WEIGHT_STD", "SyntheticSource", "is_fp8_linear_weight", "model_tensor_infos"]

WEIGHT_STD = 0.02
"""Standard deviation of generated weights (transformers' usual ``initializer_range``)."""
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
_UNQUANTIZED_MODULES = frozenset({"embed_tokens", "lm_head", "gate", "router", "wte", "embed", "score"})


def is_fp8_linear_weight(name: str, info: TensorInfo) -> bool:
    """Whether an FP8-block checkpoint (DeepSeek-V3 style) stores this tensor as FP8: the 2-D ``.weight`` of a
    Linear, except embeddings, ``lm_head``, norms and routers (``mlp.gate``, ``router``)."""
    if len(info.shape) != 2 or not name.endswith(".weight") or not info.dtype.is_floating_point:
        return False
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return module not in _UNQUANTIZED_MODULES and "norm" not in module


def _tensor_seed(name: str, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SyntheticSource:
    """Deterministic generated tensors with the given names, shapes and dtypes.

    Args:
        infos: logical names -> info (e.g. :func:`model_tensor_infos`).
        seed: the run's seed; each tensor's generator is seeded from it and the tensor's name.
        fp8_block: generate quantized Linears as FP8 codes + block scales and dequantize them.
        block_size: the FP8 block (rows, columns).
        quantized: which tensors are FP8 when ``fp8_block`` (default :func:`is_fp8_linear_weight`).
        std: standard deviation of generated weights.
    """

    def __init__(
        self,
        infos: Mapping[str, TensorInfo],
        seed: int = 0,
        fp8_block: bool = False,
        *,
        block_size: tuple[int, int] = (128, 128),
        quantized: Callable[[str, TensorInfo], bool] = is_fp8_linear_weight,
        std: float = WEIGHT_STD,
    ) -> None:
        self._infos = dict(infos)
        self.seed = seed
        self.fp8_block = fp8_block
        self.block_size = block_size
        self.std = std
        self.format = SourceFormat.FP8_BLOCK if fp8_block else SourceFormat.PLAIN
        self._fp8 = {n for n, info in self._infos.items() if fp8_block and quantized(n, info)}

    def tensors(self) -> Mapping[str, TensorInfo]:
        return dict(self._infos)

    def is_fp8(self, name: str) -> bool:
        """Whether ``name`` is generated as FP8 codes and block scales."""
        return name in self._fp8

    def _generator(self, device: torch.device, name: str) -> torch.Generator:
        # a fresh generator per tensor (a few microseconds): reads from several threads stay deterministic
        generator = torch.Generator(device=device)
        generator.manual_seed(_tensor_seed(name, self.seed))
        return generator

    def read(self, names: Iterable[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self._infos]
        if missing:
            raise unknown_names_error(missing, self._infos, "the synthetic source")
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        return {name: self._make(name, target) for name in wanted}

    def fp8_parts(self, name: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The float8_e4m3fn codes and fp32 ``weight_scale_inv`` that an FP8-block checkpoint would hold for
        ``name`` (which must be an FP8 tensor of this source)."""
        info = self._infos[name]
        generator = self._generator(torch.device(device), name)
        normal = torch.randn(info.shape, generator=generator, device=device, dtype=torch.float32)
        return self._quantize(normal)

    def _quantize(self, normal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale each block of ``normal`` (in place) so its largest magnitude is the FP8 maximum; the codes and
        the ``weight_scale_inv`` that brings them back to ``normal * std``."""
        rows, cols = normal.shape
        block_rows, block_cols = self.block_size
        grid_rows, grid_cols = -(-rows // block_rows), -(-cols // block_cols)
        whole = rows % block_rows == 0 and cols % block_cols == 0
        padding = (0, grid_cols * block_cols - cols, 0, grid_rows * block_rows - rows)
        padded = normal if whole else F.pad(normal, padding)
        # two reductions, the contiguous one first: one amax over dims (1, 3) is ~100x slower on the CPU
        amax = padded.abs().view(grid_rows, block_rows, grid_cols, block_cols).amax(dim=3).amax(dim=1)
        del padded
        factor = FP8_MAX / amax.clamp_(min=torch.finfo(torch.float32).tiny)
        if whole:
            normal.view(grid_rows, block_rows, grid_cols, block_cols).mul_(factor[:, None, :, None])
        else:
            per_row = factor.repeat_interleave(block_rows, dim=0)[:rows]
            full = cols // block_cols
            normal[:, : full * block_cols].view(rows, full, block_cols).mul_(per_row[:, :full, None])
            if cols % block_cols:
                normal[:, full * block_cols :].mul_(per_row[:, full:])
        codes = normal.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return codes, amax.mul_(self.std / FP8_MAX)

    def _make(self, name: str, device: torch.device) -> torch.Tensor:
        info = self._infos[name]
        if not info.dtype.is_floating_point:
            return torch.zeros(info.shape, dtype=info.dtype, device=device)
        if len(info.shape) == 1 and "norm" in name:
            return torch.ones(info.shape, dtype=info.dtype, device=device)
        if name in self._fp8:
            codes, scale_inv = self.fp8_parts(name, device)
            return dequantize_fp8_block(codes, scale_inv, info.dtype, self.block_size)
        generator = self._generator(device, name)
        values = torch.randn(info.shape, generator=generator, device=device, dtype=torch.float32)
        return values.mul_(self.std).to(info.dtype)

    def close(self) -> None:
        """Nothing to release (kept for the :class:`WeightSource` protocol)."""

    def __enter__(self) -> SyntheticSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_tensor_infos(config, *, dtype: torch.dtype | None = None) -> dict[str, TensorInfo]:
    """Checkpoint (hub) names -> info of every tensor a transformers ``config``'s causal LM saves.

    The model is built on the meta device (no memory); its state dict goes through transformers'
    ``revert_weight_conversion``, so fused MoE experts appear as ``save_pretrained`` writes them (per expert
    ``mlp.experts.N.gate_proj.weight`` for DeepSeek-V3/Qwen3-MoE/Mixtral-style models, fused
    ``mlp.experts.gate_up_proj`` for GPT-OSS and Llama 4). Tied weights appear once. Floating tensors get
    ``dtype`` (default the config's dtype, else bf16), except what transformers keeps in another dtype (its
    ``_keep_in_fp32_modules``: DeepSeek-V3's router ``mlp.gate`` is fp32 here, bf16 in the published checkpoint).
    """
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    chosen = dtype or _dtype_of(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=chosen)
    seen: set[int] = set()
    unique: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor.detach()
    reverted = revert_weight_conversion(model, unique)
    return {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in reverted.items()}


def _dtype_of(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.bfloat16

"""A local Hugging Face checkpoint directory as a :class:`~quantport.sources.base.WeightSource`.

``config.json``'s ``quantization_config`` picks the format:

* none: :attr:`SourceFormat.PLAIN`, every tensor as stored;
* ``quant_method: fp8`` (DeepSeek-V3/R1, Kimi-K2, Qwen3 ``-FP8``): :attr:`SourceFormat.FP8_BLOCK`. A
  ``X.weight`` with a sibling ``X.weight_scale_inv`` is one logical bf16 (the config's dtype) ``X.weight``;
  ``X.activation_scale`` (static activation scales, recalibrated anyway) is hidden too; everything else
  (norms, embeddings, routers, ``modules_to_not_convert``) is as stored;
* ``quant_method: mxfp4`` (GPT-OSS): :attr:`SourceFormat.MXFP4`. ``X_blocks`` + ``X_scales`` is one
  logical ``X`` of the bf16 checkpoint's name, shape and layout; the rest is as stored;
* anything else (ModelOpt, compressed-tensors, GPTQ, ...): :class:`SourceError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..read import read_json_object
from ..read.quant_config import CONFIG_FILE, HF_QUANT_CONFIG_FILE, config_quant_block
from .base import SourceError, SourceFormat, TensorInfo, unknown_names_error
from .dequant import dequantize_fp8_block, dequantize_mxfp4, fp8_scale_grid, mxfp4_shape
from .shards import Shards, StoredTensor, torch_dtype_of

__all__ = ["SafetensorsSource", "open_source"]

logger = logging.getLogger(__name__)

FP8_SCALE_SUFFIX = "_scale_inv"
FP8_ACTIVATION_SCALE = ".activation_scale"
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
_SUPPORTED = "none (plain weights), 'fp8' (128x128 FP8 blocks with weight_scale_inv) and 'mxfp4' (GPT-OSS)"


def _config_dtype(config: dict[str, Any]) -> torch.dtype:
    for holder in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            value = holder.get(key) if isinstance(holder, dict) else None
            dtype = getattr(torch, value, None) if isinstance(value, str) else None
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                return dtype
    return torch.bfloat16


def _format_of(directory: Path, config: dict[str, Any]) -> tuple[SourceFormat, dict[str, Any]]:
    block = config_quant_block(config)
    if block is None:
        if (directory / HF_QUANT_CONFIG_FILE).exists():
            raise SourceError(
                f"{directory} has {HF_QUANT_CONFIG_FILE}: it is a ModelOpt checkpoint, already quantized. "
                f"Weight sources read {_SUPPORTED}; start from the original model."
            )
        return SourceFormat.PLAIN, {}
    method = str(block.get("quant_method", "")).lower()
    if method == "fp8":
        return SourceFormat.FP8_BLOCK, block
    if method == "mxfp4":
        return SourceFormat.MXFP4, block
    raise SourceError(
        f"{directory}/{CONFIG_FILE}: quantization_config has quant_method {method or '(missing)'!r}, which a weight "
        f"source cannot dequantize. Supported: {_SUPPORTED}. Start from the original (unquantized) model."
    )


def _block_size(block: Mapping[str, Any], directory: Path) -> tuple[int, int] | None:
    size = block.get("weight_block_size")
    if size is None:
        return None
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise SourceError(f"{directory}/{CONFIG_FILE}: weight_block_size must be two positive integers, got {size!r}")
    return int(size[0]), int(size[1])


class SafetensorsSource:
    """Logical tensors of a safetensors checkpoint; see the module docstring for the formats.

    Attributes:
        format: the storage format.
        directory: the checkpoint directory.
        dtype: the logical dtype of dequantized tensors (tensors stored plainly keep their own).
        block_size: FP8 ``weight_block_size`` (None: per-tensor scales, or not FP8).
    """

    def __init__(
        self, directory: str | Path, format: SourceFormat, *, dtype: torch.dtype, block_size: tuple[int, int] | None
    ) -> None:
        self.directory = Path(directory)
        self.format = format
        self.dtype = dtype
        self.block_size = block_size
        self._shards = Shards(self.directory)
        self._parts: dict[str, tuple[str, ...]] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._index()

    def _add(self, name: str, info: TensorInfo, parts: tuple[str, ...]) -> None:
        self._infos[name] = info
        self._parts[name] = parts

    def _index(self) -> None:
        stored = self._shards.stored
        hidden: set[str] = set()
        if self.format is SourceFormat.FP8_BLOCK:
            hidden = self._index_fp8(stored)
        elif self.format is SourceFormat.MXFP4:
            hidden = self._index_mxfp4(stored)
        for name, info in stored.items():
            if name not in hidden and name not in self._infos:
                self._add(name, TensorInfo(info.shape, torch_dtype_of(info)), (name,))

    def _index_fp8(self, stored: Mapping[str, StoredTensor]) -> set[str]:
        hidden: set[str] = set()
        for scale_name, scale in stored.items():
            if not scale_name.endswith(FP8_SCALE_SUFFIX):
                continue
            name = scale_name.removesuffix(FP8_SCALE_SUFFIX)
            weight = stored.get(name)
            where = f"{self.directory / scale.file}"
            if weight is None:
                raise SourceError(f"{where}: {scale_name!r} has no FP8 weight {name!r} beside it")
            if weight.dtype not in ("F8_E4M3", "F8_E5M2"):
                raise SourceError(f"{where}: {name!r} has a weight_scale_inv but dtype {weight.dtype}, not float8")
            expected = fp8_scale_grid(weight.shape, self.block_size)
            if scale.shape != expected and not (self.block_size is None and scale.shape == (1,)):
                raise SourceError(
                    f"{where}: {scale_name!r} has shape {list(scale.shape)}; a {list(weight.shape)} weight in "
                    f"{list(self.block_size or ())} blocks needs {list(expected)} (corrupt or another block size)"
                )
            self._add(name, TensorInfo(weight.shape, self.dtype), (name, scale_name))
            hidden.update((name, scale_name))
            activation = name.removesuffix(".weight") + FP8_ACTIVATION_SCALE
            if activation in stored:
                hidden.add(activation)
        unscaled = [n for n, info in stored.items() if info.dtype.startswith("F8_E") and n not in hidden]
        unscaled = [n for n in unscaled if stored[n].dtype != "F8_E8M0"]
        if unscaled:
            raise SourceError(
                f"{self.directory}: float8 tensor(s) without a weight_scale_inv: {unscaled[:3]}; cannot dequantize"
            )
        return hidden

    def _index_mxfp4(self, stored: Mapping[str, StoredTensor]) -> set[str]:
        hidden: set[str] = set()
        for blocks_name, blocks in stored.items():
            if not blocks_name.endswith(MXFP4_BLOCKS):
                continue
            name = blocks_name.removesuffix(MXFP4_BLOCKS)
            scales_name = name + MXFP4_SCALES
            scales = stored.get(scales_name)
            where = f"{self.directory / blocks.file}"
            if scales is None:
                raise SourceError(f"{where}: {blocks_name!r} has no {scales_name!r} beside it")
            if blocks.dtype != "U8" or scales.dtype != "U8":
                raise SourceError(f"{where}: MXFP4 {blocks_name!r} and {scales_name!r} must be U8")
            if scales.shape != blocks.shape[:-1]:
                raise SourceError(
                    f"{where}: {scales_name!r} has shape {list(scales.shape)}, "
                    f"its blocks need {list(blocks.shape[:-1])}"
                )
            try:
                shape = mxfp4_shape(blocks.shape)
            except SourceError as exc:
                raise SourceError(f"{where}: {blocks_name!r}: {exc}") from None
            self._add(name, TensorInfo(shape, self.dtype), (blocks_name, scales_name))
            hidden.update((blocks_name, scales_name))
        orphans = [n for n in stored if n.endswith(MXFP4_SCALES) and n not in hidden and stored[n].dtype == "U8"]
        if orphans:
            raise SourceError(f"{self.directory}: MXFP4 scales without blocks: {orphans[:3]}")
        return hidden

    def tensors(self) -> Mapping[str, TensorInfo]:
        return dict(self._infos)

    def read(self, names: Iterable[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self._infos]
        if missing:
            raise unknown_names_error(missing, self._infos, str(self.directory))
        target = torch.device(device)
        out: dict[str, torch.Tensor] = {}
        for name in wanted:
            parts = [self._shards.load(part, target) for part in self._parts[name]]
            if len(parts) == 1:
                out[name] = parts[0]
            elif self.format is SourceFormat.FP8_BLOCK:
                out[name] = dequantize_fp8_block(parts[0], parts[1], self.dtype, self.block_size)
            else:
                out[name] = dequantize_mxfp4(parts[0], parts[1], self.dtype)
            del parts
        return out

    def read_rows(self, name: str, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of the logical tensor ``name``, which must have at least 3
        dimensions (experts first): only those rows' bytes are read, and only they are dequantized."""
        info = self._infos.get(name)
        if info is None:
            raise unknown_names_error([name], self._infos, str(self.directory))
        if len(info.shape) < 3:
            raise SourceError(f"{name!r} has shape {list(info.shape)}: rows are read from tensors of 3 or more dims")
        target = torch.device(device)
        parts = [self._shards.load(part, target, rows=(start, stop)) for part in self._parts[name]]
        if len(parts) == 1:
            return parts[0]
        if self.format is SourceFormat.FP8_BLOCK:
            return dequantize_fp8_block(parts[0], parts[1], self.dtype, self.block_size)
        return dequantize_mxfp4(parts[0], parts[1], self.dtype)

    def close(self) -> None:
        self._shards.close()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: str | Path, *, dtype: torch.dtype | None = None) -> SafetensorsSource:
    """The weight source of a local checkpoint directory; ``dtype`` overrides the logical dtype of dequantized
    tensors (default: the config's ``dtype``/``torch_dtype``, else bf16)."""
    directory = Path(path)
    if not directory.is_dir():
        raise SourceError(f"{directory} is not a directory; a weight source reads a local checkpoint directory")
    config_path = directory / CONFIG_FILE
    config = read_json_object(config_path) if config_path.exists() else {}
    format, block = _format_of(directory, config)
    block_size = _block_size(block, directory) if format is SourceFormat.FP8_BLOCK else None
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SourceError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    logical = dtype or _config_dtype(config)
    source = SafetensorsSource(directory, format, dtype=logical, block_size=block_size)
    logger.info("weight source %s: %s, %d logical tensors", directory, format.value, len(source.tensors()))
    return source

"""Valid checkpoints to check, built once per session, and an editor to corrupt copies of them.

Sources of valid checkpoints, all produced by real writers:

* quantport's own dense exports (every recipe, Llama and Qwen3, with and without FP8 KV cache);
* nvidia-modelopt 0.47 (``mtq.quantize`` + ``export_hf_checkpoint``) on dense and MoE models;
* compressed-tensors 0.20's own compressor on a dense Llama (every preset), and its
  ModelOpt-NVFP4 converter on a modelopt Qwen3-MoE export;
* GPT-OSS in OpenAI's native mxfp4 layout, written here with quantport.formats.mx.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quantport
from moe_models import tiny_moe
from tiny_models import TINY_MODELS, make_calibration_batches


class CheckpointEditor:
    """Edits one checkpoint directory in place: tensors (any shard), config files, raw bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # -- files ---------------------------------------------------------------------------------
    def json(self, name: str) -> dict[str, Any]:
        return json.loads((self.path / name).read_text())

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        (self.path / name).write_text(json.dumps(data, indent=2))

    def edit_json(self, name: str, fn: Callable[[dict[str, Any]], None]) -> None:
        data = self.json(name)
        fn(data)
        self.write_json(name, data)

    def quant_config(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.edit_json("config.json", lambda c: fn(c["quantization_config"]))

    def hf_quant(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.edit_json("hf_quant_config.json", lambda c: fn(c["quantization"]))

    @property
    def index(self) -> dict[str, str] | None:
        index = self.path / "model.safetensors.index.json"
        return json.loads(index.read_text())["weight_map"] if index.exists() else None

    def shards(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    # -- tensors -------------------------------------------------------------------------------
    def _file_of(self, name: str) -> Path:
        index = self.index
        if index is not None and name in index:
            return self.path / index[name]
        for file in self.shards():
            with safe_open(file, "pt") as handle:
                names = handle.keys()
            if name in names:
                return file
        return self.shards()[0]

    @staticmethod
    def _read(file: Path) -> dict[str, torch.Tensor]:
        with safe_open(file, "pt") as handle:
            names = handle.keys()
            return {k: handle.get_tensor(k) for k in names}

    def names(self) -> list[str]:
        out: list[str] = []
        for file in self.shards():
            with safe_open(file, "pt") as handle:
                out.extend(handle.keys())
        return sorted(out)

    def get(self, name: str) -> torch.Tensor:
        return self._read(self._file_of(name))[name]

    def set(self, name: str, tensor: torch.Tensor | None) -> None:
        """Replace, add (to the shard of a sibling, or the first) or delete (None) a tensor."""
        file = self._file_of(name)
        tensors = self._read(file)
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor.contiguous()
        save_file(tensors, file, metadata={"format": "pt"})
        index = self.index
        if index is not None:
            if tensor is None:
                index.pop(name, None)
            else:
                index[name] = file.name
            self.edit_json("model.safetensors.index.json", lambda d: d.__setitem__("weight_map", index))

    def update(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.set(name, fn(self.get(name)))

    def delete_matching(self, predicate: Callable[[str], bool]) -> list[str]:
        gone = [n for n in self.names() if predicate(n)]
        for name in gone:
            self.set(name, None)
        return gone


@pytest.fixture
def edit(tmp_path: Path) -> Callable[[Path], CheckpointEditor]:
    """``edit(valid_dir)`` -> an editor on a fresh copy of ``valid_dir``."""
    counter = iter(range(1000))

    def copy(source: Path) -> CheckpointEditor:
        target = tmp_path / f"copy{next(counter)}"
        shutil.copytree(source, target)
        return CheckpointEditor(target)

    return copy


# -- quantport's own exports ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def quantport_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``quantport_ckpt(family, recipe, kv=False, shards=False)`` -> a quantport export (cached)."""
    cache: dict[tuple[str, str, bool, bool], Path] = {}
    root = tmp_path_factory.mktemp("quantport")

    def build(family: str, recipe: str, kv: bool = False, shards: bool = False) -> Path:
        key = (family, recipe, kv, shards)
        if key not in cache:
            model = TINY_MODELS[family](0)
            quantport.quantize(
                model, recipe, make_calibration_batches(), kv_cache="fp8" if kv else None, progress=False
            )
            out = root / f"{family}-{recipe}-{'kv' if kv else 'nokv'}{'-sharded' if shards else ''}"
            quantport.export(model, out, progress=False, max_shard_size="150KB" if shards else "5GB")
            cache[key] = out
        return cache[key]

    return build


# -- nvidia-modelopt exports ----------------------------------------------------------------------
MODELOPT_CFGS = {"fp8": "FP8_DEFAULT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}


@pytest.fixture(scope="session")
def modelopt_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``modelopt_ckpt(family, recipe, kv=True)`` -> what nvidia-modelopt 0.47 exports (cached)."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    export_hf_checkpoint = pytest.importorskip("modelopt.torch.export").export_hf_checkpoint
    cache: dict[tuple[str, str, bool], Path] = {}
    root = tmp_path_factory.mktemp("modelopt")

    def build(family: str, recipe: str, kv: bool = True) -> Path:
        key = (family, recipe, kv)
        if key not in cache:
            dense = family in TINY_MODELS
            model = TINY_MODELS[family](0) if dense else tiny_moe(family)
            batches = make_calibration_batches(vocab_size=model.config.vocab_size, n=1, seq=16)
            config = getattr(mtq, MODELOPT_CFGS[recipe])
            if kv:
                config = mtq.update_quant_cfg_with_kv_cache_quant(config, mtq.FP8_KV_CFG["quant_cfg"])

            def loop(m: torch.nn.Module) -> None:
                for batch in batches:
                    m(batch)

            out = root / f"{family}-{recipe}-{'kv' if kv else 'nokv'}"
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mtq.quantize(model, config, loop)
                export_hf_checkpoint(model, export_dir=out)
            cache[key] = out
        return cache[key]

    return build


# -- compressed-tensors ---------------------------------------------------------------------------
_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def _ct_minmax(w: torch.Tensor, args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if strategy in ("group", "tensor_group"):
        g = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
        return g.amin(-1), g.amax(-1)
    bo, bi = args.block_structure
    o, i = w.shape
    w = torch.nn.functional.pad(w, (0, math.ceil(i / bi) * bi - i, 0, math.ceil(o / bo) * bo - o))
    g = w.reshape(math.ceil(o / bo), bo, math.ceil(i / bi), bi)
    return g.amin(dim=(1, 3)), g.amax(dim=(1, 3))


def _ct_export(model: torch.nn.Module, preset: str, out: Path) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=["lm_head"]
    )
    apply_quantization_config(model, config)
    modules = {n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    # llm-compressor's rule: the members of a fused group share the NVFP4 global scales
    amax = {n: m.weight.float().abs().amax() for n, m in modules.items()}
    for name in modules:
        parent, _, leaf = name.rpartition(".")
        siblings = (
            [
                n
                for n in modules
                if n.rpartition(".")[0] == parent and _FUSED.get(n.rpartition(".")[2]) == _FUSED.get(leaf)
            ]
            if leaf in _FUSED
            else [name]
        )
        amax[name] = max(amax[n] for n in siblings)
    with torch.no_grad():
        for name, module in modules.items():
            scheme, w = module.quantization_scheme, module.weight.float()
            global_scale = None
            if hasattr(module, "weight_global_scale"):
                global_scale = generate_gparam(-amax[name], amax[name])
                module.weight_global_scale.copy_(global_scale)
            scale, zp = calculate_qparams(*_ct_minmax(w, scheme.weights), scheme.weights, global_scale=global_scale)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zp.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape
                )
            if hasattr(module, "input_global_scale"):
                module.input_global_scale.copy_(generate_gparam(torch.tensor(-3.0), torch.tensor(3.0)))
            if hasattr(module, "input_scale"):
                act = scheme.input_activations
                s, _ = calculate_qparams(torch.tensor([-3.0]), torch.tensor([3.0]), act)
                module.input_scale.data = s.to(module.input_scale.dtype).reshape(module.input_scale.shape)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)


@pytest.fixture(scope="session")
def ct_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``ct_ckpt(preset)`` -> a dense Llama written by compressed-tensors' own compressor (cached)."""
    pytest.importorskip("compressed_tensors")
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("ct")

    def build(preset: str) -> Path:
        if preset not in cache:
            out = root / preset
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _ct_export(TINY_MODELS["llama"](0), preset, out)
            cache[preset] = out
        return cache[preset]

    return build


@pytest.fixture(scope="session")
def ct_moe_ckpt(tmp_path_factory: pytest.TempPathFactory, modelopt_ckpt: Callable[..., Path]) -> Path:
    """A compressed-tensors NVFP4 Qwen3-MoE (FP8 KV): compressed-tensors' converter over a modelopt export."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
    from compressed_tensors.quantization import QuantizationArgs

    source = modelopt_ckpt("qwen3_moe", "nvfp4", kv=True)
    ignore = json.loads((source / "config.json").read_text())["quantization_config"]["ignore"]
    out = tmp_path_factory.mktemp("ct-moe") / "qwen3_moe-nvfp4"
    converter = ModelOptNvfp4Converter(
        ignore=ignore, targets=[r"re:.*(proj|\.w[123])$"], kv_cache_scheme=QuantizationArgs(num_bits=8, type="float")
    )
    convert_checkpoint(source, out, converter, max_workers=1, device="cpu")
    (out / "hf_quant_config.json").unlink()  # the converter copies the stale ModelOpt file
    return out


# -- GPT-OSS native mxfp4 -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def gpt_oss_mxfp4_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-OSS with experts in OpenAI's native mxfp4 layout (``*_blocks`` / ``*_scales`` / ``*_bias``)."""
    from quantport.formats.mx import MX_BLOCK, quantize_mxfp4

    model = tiny_moe("gpt_oss")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        prefix, _, param = name.rpartition(".")
        if prefix.endswith("experts") and param in ("gate_up_proj", "down_proj"):
            weight = tensor.transpose(1, 2).float().contiguous()  # [E, in, out] -> [E, out, in]
            packed, scales = quantize_mxfp4(weight)
            e, out_features, half = packed.shape
            blocks = packed.reshape(e, out_features, half * 2 // MX_BLOCK, MX_BLOCK // 2)
            tensors[f"{name}_blocks"] = blocks.contiguous()
            tensors[f"{name}_scales"] = scales.contiguous()
        else:
            tensors[name] = tensor.contiguous()
    out = tmp_path_factory.mktemp("gpt-oss") / "gpt_oss-mxfp4"
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_diff_dict()
    not_converted = ["lm_head", "model.embed_tokens"] + [
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp.router")
    ]
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": not_converted}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out

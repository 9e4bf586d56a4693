"""open_source on tiny checkpoints in the published plain, FP8-block (DeepSeek-V3) and MXFP4 (GPT-OSS) layouts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quantport.errors import QuantportError
from quantport.sources import (
    RowSource,
    SourceError,
    SourceFormat,
    SyntheticSource,
    TensorInfo,
    UnknownTensorError,
    WeightSource,
    open_source,
)
from quantport.sources.shards import Shards
from sources.published_layouts import (
    deepseek_config,
    hub_state_dict,
    write_checkpoint,
    write_fp8_checkpoint,
    write_mxfp4_checkpoint,
)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def fp8_divisible(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8_divisible"), divisible=True)


@pytest.fixture(scope="module")
def fp8_partial(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8_partial"), divisible=False)


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    return write_mxfp4_checkpoint(tmp_path_factory.mktemp("mxfp4"))


def transformers_dequantized(directory: Path) -> dict[str, torch.Tensor]:
    """What transformers 5.24 loads from the checkpoint on a CPU (it dequantizes FP8 and MXFP4 there), under the
    checkpoint names."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    return hub_state_dict(model)


def assert_same_logical_tensors(source: WeightSource, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    infos = source.tensors()
    assert sorted(infos) == sorted(expected)
    read = source.read(list(infos), "cpu")
    assert list(read) == list(infos)
    for name, tensor in read.items():
        assert infos[name] == TensorInfo(tuple(tensor.shape), tensor.dtype), name
        assert tensor.shape == expected[name].shape and tensor.dtype == expected[name].dtype, name
    return read


def test_fp8_block_names_shapes_dtypes_are_the_bf16_checkpoints(fp8_divisible):
    directory, original = fp8_divisible
    with open_source(directory) as source:
        assert source.format is SourceFormat.FP8_BLOCK and isinstance(source, WeightSource)
        assert source.block_size == (128, 128)
        read = assert_same_logical_tensors(source, original)
    assert not any(name.endswith("_scale_inv") for name in read)
    fp8 = [n for n in read if "_proj" in n]
    assert len(fp8) == 5 * 2 + 3 + 3 * 4 + 3  # attention in 2 layers, dense MLP, 4 experts, shared expert
    for name in fp8:  # dequantized FP8 is within the format's error of the bf16 original
        error = (read[name].float() - original[name].float()).norm() / original[name].float().norm()
        assert 0 < error < 0.05, name
    for name in set(read) - set(fp8):  # stored plainly: read as stored
        assert torch.equal(bits(read[name]), bits(original[name])), name


def test_fp8_block_is_bit_equal_to_transformers_loading_it(fp8_divisible):
    directory, _ = fp8_divisible
    expected = transformers_dequantized(directory)
    with open_source(directory) as source:
        read = source.read(source.tensors(), "cpu")
    assert sorted(read) == sorted(expected)
    for name, tensor in read.items():
        # transformers keeps DeepSeek's router in fp32 (the checkpoint's bf16 widened): compare in ours
        assert torch.equal(bits(tensor), bits(expected[name].to(tensor.dtype))), name


def test_fp8_partial_blocks_are_read(fp8_partial):
    """kv_a_proj_with_mqa (96 rows, one partial block) and q_b_proj (192 rows: one whole and one partial block;
    transformers 5.24 would use 96-row blocks here, deriving the block from the grid)."""
    directory, original = fp8_partial
    stored = {}
    for file in directory.glob("*.safetensors"):
        stored.update(load_file(file))
    name = "model.layers.0.self_attn.q_b_proj.weight"
    assert stored[name].shape == (192, 128) and stored[name + "_scale_inv"].shape == (2, 1)
    with open_source(directory) as source:
        read = assert_same_logical_tensors(source, original)
    codes, scale_inv = stored[name].float(), stored[name + "_scale_inv"]
    by_hand = torch.cat([codes[:128] * scale_inv[0, 0], codes[128:] * scale_inv[1, 0]]).to(torch.bfloat16)
    assert torch.equal(bits(read[name]), bits(by_hand))
    kv_a = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert read[kv_a].shape == (96, 256)
    assert (read[kv_a].float() - original[kv_a].float()).norm() / original[kv_a].float().norm() < 0.05


def test_mxfp4_is_bit_equal_to_transformers_and_has_the_module_layout(mxfp4):
    directory, original = mxfp4
    expected = transformers_dequantized(directory)
    with open_source(directory) as source:
        assert source.format is SourceFormat.MXFP4
        read = assert_same_logical_tensors(source, original)
    assert sorted(read) == sorted(expected)
    for name, tensor in read.items():
        assert torch.equal(bits(tensor), bits(expected[name])), name
    gate_up = read["model.layers.1.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (4, 64, 64) and gate_up.dtype == torch.bfloat16  # [E, hidden, 2 * intermediate]
    assert read["model.layers.1.mlp.experts.down_proj"].shape == (4, 32, 64)  # [E, intermediate, hidden]
    error = (gate_up.float() - original["model.layers.1.mlp.experts.gate_up_proj"].float()).norm()
    assert 0 < error / original["model.layers.1.mlp.experts.gate_up_proj"].float().norm() < 0.2


def test_plain_checkpoint_reads_tensors_as_stored(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4, dtype=torch.bfloat16), "b.bias": torch.arange(5, dtype=torch.float32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    with open_source(tmp_path) as source:
        assert source.format is SourceFormat.PLAIN
        assert source.tensors() == {
            "a.weight": TensorInfo((3, 4), torch.bfloat16),
            "b.bias": TensorInfo((5,), torch.float32),
        }
        read = source.read(["b.bias"], torch.device("cpu"))
    assert list(read) == ["b.bias"] and torch.equal(read["b.bias"], tensors["b.bias"])


def test_a_read_loads_only_the_requested_tensors(fp8_divisible, monkeypatch):
    directory, _ = fp8_divisible
    loaded: list[str] = []
    original_load = Shards.load
    monkeypatch.setattr(
        Shards, "load", lambda self, name, device: loaded.append(name) or original_load(self, name, device)
    )
    layer = "model.layers.1.mlp.experts.2."
    with open_source(directory) as source:
        names = [n for n in source.tensors() if n.startswith(layer)]
        read = source.read([*names, names[0]], "cpu")
    assert sorted(read) == sorted(names) and len(names) == 3
    assert sorted(loaded) == sorted([*names, *(n + "_scale_inv" for n in names)])


def test_dtype_option_sets_the_dequantized_dtype(fp8_divisible):
    directory, original = fp8_divisible
    name = "model.layers.0.mlp.up_proj.weight"
    with open_source(directory, dtype=torch.float32) as source:
        assert source.tensors()[name].dtype == torch.float32
        assert source.tensors()["model.norm.weight"].dtype == torch.bfloat16  # stored plainly: as stored
        wide = source.read([name], "cpu")[name]
    with open_source(directory) as source:
        narrow = source.read([name], "cpu")[name]
    assert wide.dtype == torch.float32 and torch.equal(wide.to(torch.bfloat16), narrow)


def test_unknown_names_are_listed(fp8_divisible):
    directory, _ = fp8_divisible
    names = ["model.norm.weight", "nope", "model.layers.0.mlp.up_proj.weight_scale_inv"]
    with (
        open_source(directory) as source,
        pytest.raises(UnknownTensorError, match=r"2 tensor name\(s\).*'nope'") as info,
    ):
        source.read(names, "cpu")
    assert isinstance(info.value, QuantportError)
    assert "weight_scale_inv" in str(info.value) and "e.g." in str(info.value)


@pytest.mark.parametrize(
    ("quant", "match"),
    [({"quant_method": "compressed-tensors", "config_groups": {}}, "'compressed-tensors'.*Supported: none"),
     ({"quant_method": "gptq", "bits": 4}, "'gptq'"), ({"bits": 4}, r"'\(missing\)'")],
)  # fmt: skip
def test_other_quantization_methods_are_refused(tmp_path, quant, match):
    write_checkpoint(tmp_path, deepseek_config(divisible=True), {"x": torch.zeros(2)}, quant)
    with pytest.raises(SourceError, match=match):
        open_source(tmp_path)


def test_a_modelopt_checkpoint_is_refused(tmp_path):
    write_checkpoint(tmp_path, deepseek_config(divisible=True), {"x": torch.zeros(2)}, None)
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    with pytest.raises(SourceError, match="ModelOpt checkpoint"):
        open_source(tmp_path)


def u8(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.uint8)


def fp8_pair(weight_shape, scale_shape) -> dict[str, torch.Tensor]:
    return {
        "l.weight": torch.zeros(weight_shape).to(torch.float8_e4m3fn),
        "l.weight_scale_inv": torch.ones(scale_shape),
    }


@pytest.mark.parametrize(
    ("tensors", "match"),
    [(fp8_pair((256, 256), (2, 1)), r"needs \[2, 2\]"), (fp8_pair((130, 256), (1, 2)), r"needs \[2, 2\]"),
     ({"l.weight_scale_inv": torch.ones(1, 1)}, "no FP8 weight"),
     ({"l.weight": torch.zeros(8, 8), "l.weight_scale_inv": torch.ones(1, 1)}, "not float8"),
     ({"l.weight": torch.zeros(8, 8).to(torch.float8_e4m3fn)}, "without a weight_scale_inv")],
)  # fmt: skip
def test_corrupt_fp8_checkpoints_are_refused(tmp_path, tensors, match):
    from sources.published_layouts import FP8_CONFIG

    write_checkpoint(tmp_path, deepseek_config(divisible=True), tensors, FP8_CONFIG)
    with pytest.raises(SourceError, match=match):
        open_source(tmp_path)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [({"e.gate_up_proj_blocks": u8(2, 4, 2, 16)}, "has no 'e.gate_up_proj_scales'"),
     ({"e.x_blocks": u8(2, 4, 2, 16), "e.x_scales": u8(2, 4, 3)}, r"need \[2, 4, 2\]"),
     ({"e.x_blocks": u8(4, 2, 16), "e.x_scales": u8(4, 2)}, "blocks must have shape"),
     ({"e.x_scales": u8(4, 2)}, "scales without blocks")],
)  # fmt: skip
def test_corrupt_mxfp4_checkpoints_are_refused(tmp_path, tensors, match):
    from sources.published_layouts import MXFP4_CONFIG

    write_checkpoint(tmp_path, deepseek_config(divisible=True), tensors, MXFP4_CONFIG)
    with pytest.raises(SourceError, match=match):
        open_source(tmp_path)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(SourceError, match="not a directory"):
        open_source(tmp_path / "missing")
    with pytest.raises(SourceError, match=r"no \*\.safetensors"):
        open_source(tmp_path)


def test_index_naming_missing_tensors_is_refused(tmp_path):
    write_checkpoint(tmp_path, deepseek_config(divisible=True), {"a": torch.zeros(2), "b": torch.ones(3)}, None)
    index = tmp_path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map["c"] = weight_map["a"]
    weight_map["b"] = weight_map["a"]
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SourceError, match=r"lists 2 tensor\(s\) that are not in the shard it names"):
        open_source(tmp_path)


def test_dtype_must_be_floating(fp8_divisible):
    with pytest.raises(SourceError, match="floating-point torch.dtype"):
        open_source(fp8_divisible[0], dtype=torch.int8)


def test_close_then_read_reopens(mxfp4):
    directory, _ = mxfp4
    source = open_source(directory)
    name = "model.layers.0.mlp.experts.down_proj"
    first = source.read([name], "cpu")[name]
    source.close()
    assert torch.equal(bits(source.read([name], "cpu")[name]), bits(first))
    source.close()


def test_a_truncated_shard_is_refused_before_any_read(tmp_path):
    write_checkpoint(tmp_path, deepseek_config(divisible=True), {"a": torch.zeros(64), "b": torch.ones(64)}, None)
    shard = sorted(tmp_path.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(SourceError, match=rf"{shard.name}: .* only 246 bytes \(an interrupted download"):
        open_source(tmp_path)
    shard.unlink()
    with pytest.raises(SourceError, match=rf"{shard.name}: cannot be read"):
        open_source(tmp_path)


def test_a_shard_truncated_after_opening_fails_the_read(tmp_path):
    write_checkpoint(tmp_path, deepseek_config(divisible=True), {"a": torch.zeros(64), "b": torch.ones(64)}, None)
    with open_source(tmp_path) as source:
        shard = sorted(tmp_path.glob("*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-10])
        with pytest.raises(SourceError, match="ends past the end of the file"):
            source.read(["a"], "cpu")


def test_reads_are_copies_that_do_not_map_the_shards(tmp_path):
    """A read returns tensors the caller owns (no view into a memory-mapped shard) of exactly the stored bytes."""
    tensors = {"a": torch.randn(64, 3, dtype=torch.bfloat16), "b": torch.tensor(2.5), "c": torch.zeros(0, 4)}
    write_checkpoint(tmp_path, deepseek_config(divisible=True), tensors, None)
    with open_source(tmp_path) as source:
        first = source.read(["a"], "cpu")["a"]
        first.zero_()
        again = source.read(tensors, "cpu")
        maps = Path("/proc/self/maps")
        if maps.exists():
            assert str(tmp_path) not in maps.read_text()
    for name, tensor in tensors.items():
        assert again[name].shape == tensor.shape and torch.equal(bits(again[name]), bits(tensor)), name


def test_mxfp4_rows_are_the_same_rows_of_the_whole_tensor(mxfp4, monkeypatch):
    directory, _ = mxfp4
    ranges: list[tuple[str, tuple[int, int] | None]] = []
    original_load = Shards.load

    def load(self, name, device, rows=None):
        ranges.append((name, rows))
        return original_load(self, name, device, rows)

    with open_source(directory) as source:
        assert isinstance(source, RowSource) and not isinstance(SyntheticSource({}), RowSource)
        name = "model.layers.1.mlp.experts.gate_up_proj"
        whole = source.read([name], "cpu")[name]
        monkeypatch.setattr(Shards, "load", load)
        for start, stop in [(0, 1), (1, 3), (3, 4), (2, 2)]:
            rows = source.read_rows(name, start, stop, "cpu")
            assert rows.dtype == whole.dtype and torch.equal(bits(rows), bits(whole[start:stop])), (start, stop)
    assert ranges[:2] == [(name + "_blocks", (0, 1)), (name + "_scales", (0, 1))]  # only those rows' bytes


def test_plain_and_fp8_3d_rows(tmp_path):
    weight = torch.randn(4, 256, 128).to(torch.float8_e4m3fn)
    scale = torch.rand(4, 2, 1) + 0.5
    save_file(
        {"e.weight": weight, "e.weight_scale_inv": scale, "p.w": torch.randn(5, 3, 2, dtype=torch.bfloat16)},
        str(tmp_path / "model.safetensors"),
    )
    config = {"model_type": "llama", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with open_source(tmp_path) as source:
        for name in ("e.weight", "p.w"):
            whole = source.read([name], "cpu")[name]
            assert torch.equal(bits(source.read_rows(name, 1, 3, "cpu")), bits(whole[1:3])), name


def test_rows_outside_the_tensor_or_of_a_2d_tensor_are_refused(mxfp4, fp8_divisible):
    with open_source(mxfp4[0]) as source:
        with pytest.raises(SourceError, match=r"rows 3:5 .* outside its 4 rows"):
            source.read_rows("model.layers.1.mlp.experts.down_proj", 3, 5, "cpu")
        with pytest.raises(UnknownTensorError):
            source.read_rows("model.layers.1.mlp.experts.nothing", 0, 1, "cpu")
    with open_source(fp8_divisible[0]) as source, pytest.raises(SourceError, match="3 or more dims"):
        source.read_rows("model.layers.1.mlp.experts.0.down_proj.weight", 0, 1, "cpu")

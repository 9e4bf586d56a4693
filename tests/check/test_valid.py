"""No false positives: checkpoints written by real writers pass, on every engine that supports them."""

from __future__ import annotations

import pytest

from quantport.check import Severity, check_checkpoint, render_report

QUANTPORT_RECIPES = ("fp8", "nvfp4", "fp8-dynamic", "fp8-block", "w4a16-nvfp4", "mxfp8")
STATIC_RECIPES = ("fp8", "nvfp4")
CT_PRESETS = ("FP8", "FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "W4A16", "W4A16_ASYM", "NVFP4", "NVFP4A16", "MXFP8", "MXFP4")

SGLANG_UNSUPPORTED = {"fp8-dynamic", "fp8-block"}  # SGLang's ModelOpt reader takes FP8 (per tensor) only


def assert_clean(path, engine: str = "vllm", allowed_warnings: frozenset[str] = frozenset()) -> None:
    report = check_checkpoint(path, engine)
    unexpected = [f for f in report.findings if f.severity is Severity.ERROR or f.rule not in allowed_warnings]
    assert not unexpected, render_report(report)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("recipe", QUANTPORT_RECIPES)
def test_quantport_dense_exports_pass(quantport_ckpt, family, recipe):
    for kv in (False, True) if recipe in STATIC_RECIPES else (False,):
        path = quantport_ckpt(family, recipe, kv=kv)
        assert_clean(path, "vllm")
        if recipe not in SGLANG_UNSUPPORTED:
            assert_clean(path, "sglang")


@pytest.mark.parametrize("recipe", ["fp8-dynamic", "fp8-block"])
def test_sglang_refuses_recipes_its_reader_lacks(quantport_ckpt, recipe):
    report = check_checkpoint(quantport_ckpt("llama", recipe), "sglang")
    assert report.rules() == {"config.engine-algo"} and not report.ok


def test_sharded_quantport_export_passes(quantport_ckpt):
    path = quantport_ckpt("llama", "nvfp4", kv=True, shards=True)
    assert len(list(path.glob("*.safetensors"))) > 2
    assert_clean(path)


@pytest.mark.parametrize("preset", CT_PRESETS)
def test_compressed_tensors_exports_pass(ct_ckpt, preset):
    assert_clean(ct_ckpt(preset), "vllm")


MODELOPT_DENSE = [("llama", "nvfp4"), ("qwen3", "fp8")]
MODELOPT_MOE = [("qwen3_moe", "nvfp4"), ("mixtral", "fp8"), ("deepseek_v3", "nvfp4"), ("qwen2_moe", "fp8")]
"""One recipe per family keeps the suite fast; quantport's golden tests cover modelopt's other dense recipes."""


@pytest.mark.reference
@pytest.mark.parametrize(("family", "recipe"), MODELOPT_DENSE)
def test_modelopt_dense_exports_pass(modelopt_ckpt, family, recipe):
    path = modelopt_ckpt(family, recipe)
    assert_clean(path, "vllm")
    assert_clean(path, "sglang")


@pytest.mark.reference
@pytest.mark.parametrize(("family", "recipe"), MODELOPT_MOE)
def test_modelopt_moe_exports_pass(modelopt_ckpt, family, recipe):
    path = modelopt_ckpt(family, recipe)
    assert_clean(path, "vllm")
    assert_clean(path, "sglang")


@pytest.mark.reference
def test_compressed_tensors_moe_passes(ct_moe_ckpt):
    # the converter keeps ModelOpt's k_proj.k_scale names (vLLM remaps them) in bf16
    assert_clean(ct_moe_ckpt, "vllm", allowed_warnings=frozenset({"kv.name", "kv.dtype"}))


def test_gpt_oss_native_mxfp4_passes(gpt_oss_mxfp4_ckpt):
    assert_clean(gpt_oss_mxfp4_ckpt, "vllm")


@pytest.mark.reference
def test_llama4_text_with_modelopt_fused_names_is_flagged_for_vllm(modelopt_ckpt, edit):
    path = modelopt_ckpt("llama4_text", "nvfp4")
    vllm = check_checkpoint(path, "vllm")
    assert vllm.rules() == {"llama4.fused-architecture"} and not vllm.ok, render_report(vllm)
    sglang = check_checkpoint(path, "sglang")
    assert sglang.rules() == {"llama4.fused-architecture"} and sglang.ok
    fixed = edit(path)
    fixed.edit_json("config.json", lambda c: c.__setitem__("architectures", ["Llama4ForConditionalGeneration"]))
    assert check_checkpoint(fixed.path).findings == []


@pytest.mark.reference
@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
def test_gpt_oss_modelopt_is_a_known_failure(modelopt_ckpt, recipe):
    """nvidia-modelopt's own GPT-OSS export does not load in vLLM (expert biases): the known-failure table says
    so, with the form that works; SGLang gets a warning (the facts are vLLM's)."""
    report = check_checkpoint(modelopt_ckpt("gpt_oss", recipe), "vllm")
    assert report.rules() == {"engine.known-failure"} and not report.ok, render_report(report)
    assert all("--recipe mxfp4-experts --format mxfp4" in f.message for f in report.errors)
    assert check_checkpoint(modelopt_ckpt("gpt_oss", recipe), "sglang").ok


def _as_mixed_precision(e) -> None:
    """Rewrite a single-algorithm ModelOpt export as MIXED_PRECISION, as ModelOpt writes it."""
    quantized = sorted({n.rsplit(".", 1)[0] for n in e.names() if n.endswith(".weight_scale")})
    layers = {name: {"quant_algo": "FP8"} for name in quantized}

    def flat(q):
        q.update(quant_algo="MIXED_PRECISION", quantized_layers=layers)
        q.pop("config_groups", None)

    def nested(q):
        q.update(quant_algo="MIXED_PRECISION", quantized_layers=layers)
        q.pop("exclude_modules")

    e.quant_config(flat)
    e.hf_quant(nested)
    return quantized


def test_mixed_precision_modelopt_config(quantport_ckpt, edit):
    e = edit(quantport_ckpt("llama", "fp8"))
    quantized = _as_mixed_precision(e)
    assert_clean(e.path, "vllm")
    # a quantized layer missing from quantized_layers: the engine builds it unquantized
    layer = quantized[0]
    e.quant_config(lambda q: q["quantized_layers"].pop(layer))
    e.hf_quant(lambda q: q["quantized_layers"].pop(layer))
    assert "exclusion.quantized-excluded" in check_checkpoint(e.path).rules()
    # SGLang reads an FP8-only MIXED_PRECISION as w4afp8
    assert "config.engine-algo" in check_checkpoint(e.path, "sglang").rules()


QUANTPORT_MOE = [
    ("qwen3_moe", "nvfp4", "modelopt", "fp8"),
    ("qwen3_moe", "int8", "compressed-tensors", None),
    ("mixtral", "fp8", "modelopt", "fp8"),
    ("deepseek_v3", "nvfp4", "compressed-tensors", None),
    ("llama4_text", "fp8", "modelopt", "fp8"),
    ("mixtral", "mxfp4", "compressed-tensors", None),
]


@pytest.mark.parametrize(("family", "recipe", "fmt", "kv"), QUANTPORT_MOE)
def test_quantport_moe_exports_pass(tmp_path, family, recipe, fmt, kv):
    import quantport
    from moe_models import tiny_moe
    from quantport.export import recipe_for_format
    from tiny_models import make_calibration_batches

    model = tiny_moe(family)
    quantport.quantize(
        model,
        recipe_for_format(recipe, fmt),
        make_calibration_batches(vocab_size=256, n=1, seq=16),
        kv_cache=kv,
        progress=False,
    )
    out = quantport.export(model, tmp_path / "out", fmt, progress=False)
    assert_clean(out, "vllm")


@pytest.mark.parametrize("recipe", ["w4a16", "w8a16"])
def test_quantport_modelopt_integer_exports_have_the_tensors_their_algorithm_names(tmp_path, recipe):
    """The ModelOpt tensors of W4A16_AWQ and W8A16 follow from the dialect's algorithm table and the numeric
    format descriptor; vLLM's ModelOpt reader refuses both algorithms, which is the only finding."""
    import quantport
    from quantport.export import recipe_for_format
    from tiny_models import TINY_MODELS, make_calibration_batches

    model = TINY_MODELS["llama"](0)
    quantport.quantize(model, recipe_for_format(recipe, "modelopt"), make_calibration_batches(), progress=False)
    quantport.export(model, tmp_path / "out", format="modelopt", progress=False)
    report = check_checkpoint(tmp_path / "out", "vllm")
    assert report.rules() == {"config.quant-algo"}, render_report(report)

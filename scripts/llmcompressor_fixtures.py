"""Write tiny llm-compressor checkpoints for quantport's loader tests (run by make-llmcompressor-fixtures.sh).

Each fixture is a randomly initialised model with tiny sizes (so the committed files stay small),
quantized with one of llm-compressor's preset schemes and saved compressed, exactly as a user of
llm-compressor would produce it. Schemes with static activation scales calibrate on a few random
token sequences made here (no download).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3MoeConfig

logger = logging.getLogger("llmcompressor_fixtures")

VOCAB = 256


def tiny_llama() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def tiny_qwen3_moe() -> torch.nn.Module:
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def calibration_data() -> DataLoader:
    generator = torch.Generator().manual_seed(2)
    rows = torch.randint(0, VOCAB, (8, 16), generator=generator)
    samples = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in rows]
    return DataLoader(samples, batch_size=None)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary (llm-compressor wants a processor with a dataset)."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), unk_token="t0")


def saved_and_reloaded(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """llm-compressor reads the model's config back by its path: give the random model one."""
    model.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)


FIXTURES = {
    # name: (model builder, llm-compressor preset scheme, needs calibration data)
    "llama-w8a8-int8": (tiny_llama, "W8A8", False),
    "llama-w4a16": (tiny_llama, "W4A16", False),
    "llama-fp8": (tiny_llama, "FP8", True),
    "llama-fp8-dynamic": (tiny_llama, "FP8_DYNAMIC", False),
    "llama-nvfp4": (tiny_llama, "NVFP4", True),
    "qwen3moe-w4a16": (tiny_qwen3_moe, "W4A16", False),
    "qwen3moe-nvfp4": (tiny_qwen3_moe, "NVFP4", True),
}


def write(name: str, out_root: Path) -> None:
    build, scheme, calibrate = FIXTURES[name]
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head", "re:.*mlp.gate$"])
    kwargs = {"dataset": calibration_data(), "num_calibration_samples": 8, "processor": tiny_tokenizer()}
    kwargs = kwargs if calibrate else {}
    with tempfile.TemporaryDirectory() as tmp:
        model = saved_and_reloaded(build(), Path(tmp))
        oneshot(model=model, recipe=recipe, **kwargs)
        out = out_root / name
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, save_compressed=True)
    for extra in ("recipe.yaml", "generation_config.json"):
        (out / extra).unlink(missing_ok=True)
    logger.info("wrote %s (%d bytes)", out, sum(f.stat().st_size for f in out.iterdir()))


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    out_root = Path(sys.argv[1])
    names = sys.argv[2:] or list(FIXTURES)
    for name in names:
        try:
            write(name, out_root)
        except Exception:
            logger.exception("fixture %s failed; skipped", name)


if __name__ == "__main__":
    main()

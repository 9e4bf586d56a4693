"""Quality of a quantized model against its original: perplexity of both and KL divergence.

On the same token sequences, both models predict every next token. With ``p`` the original (base)
model's distribution and ``q`` the quantized model's, all in fp32 from log-softmax of the logits:

* ``ppl = exp(mean over scored positions of -log p(next token))`` for each model;
* ``kl_mean = mean over scored positions of KL(p || q) = sum_v p_v (log p_v - log q_v)`` in nats.

A sequence of ``T`` tokens scores its ``T - 1`` next-token positions. Sums are kept in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import QuantportError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ARCHITECTURE_KEYS",
    "EvalDataError",
    "EvalResult",
    "ModelMismatchError",
    "bundled_eval_text",
    "check_same_model",
    "eval_batches",
    "evaluate",
]

logger = logging.getLogger(__name__)

EVAL_TEXT = "eval_en.txt"
"""The bundled held-out text (English Wikipedia, CC BY-SA 4.0; see ``data/SOURCES.md``)."""


ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
"""``config.json`` keys a quantized checkpoint shares with the model it was quantized from."""


class EvalDataError(QuantportError, ValueError):
    """The evaluation text or batches cannot be used as given."""


class ModelMismatchError(EvalDataError):
    """The quantized checkpoint was not made from the base model it is compared with."""


def check_same_model(base_config: dict[str, Any], quant_config: dict[str, Any]) -> None:
    """Raise :class:`ModelMismatchError` when two ``config.json`` dicts differ in an :data:`ARCHITECTURE_KEYS`
    key both have."""
    differ = [
        f"{key} {base_config[key]!r} vs {quant_config[key]!r}"
        for key in ARCHITECTURE_KEYS
        if key in base_config and key in quant_config and base_config[key] != quant_config[key]
    ]
    if differ:
        raise ModelMismatchError(
            f"BASE and QUANT are different models ({'; '.join(differ)}); "
            "give the model QUANT was quantized from as BASE"
        )


@dataclass(frozen=True)
class EvalResult:
    """Perplexities and KL divergence of a quantized model against its base model.

    Attributes:
        ppl_base: perplexity of the base model.
        ppl_quant: perplexity of the quantized model.
        kl_mean: mean per-token KL(base || quant), nats.
        tokens: number of scored positions.
    """

    ppl_base: float
    ppl_quant: float
    kl_mean: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bundled_eval_text() -> str:
    """The bundled held-out English text (four Wikipedia articles not used for calibration)."""
    return resources.files("quantport.data").joinpath(EVAL_TEXT).read_text(encoding="utf-8")


def eval_batches(
    tokenizer: PreTrainedTokenizerBase,
    *,
    text: str | None = None,
    text_path: str | Path | None = None,
    samples: int = 32,
    seq_len: int = 512,
    batch_size: int = 4,
) -> list[torch.Tensor]:
    """Tokenize the text (default: the bundled one) into non-overlapping sequences of ``seq_len``.

    Returns:
        int64 tensors ``[B, seq_len]`` with ``B <= batch_size``: the first ``samples`` sequences, or
        as many as the text holds (a warning says so when that is fewer).
    """
    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise EvalDataError("samples and batch size must be positive and the sequence length at least 2")
    if text is None:
        if text_path is not None:
            path = Path(text_path)
            if not path.is_file():
                raise EvalDataError(f"evaluation text file not found: {path}")
            text = path.read_text(encoding="utf-8", errors="replace")
        else:
            text = bundled_eval_text()
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if not ids:
        raise EvalDataError("the tokenizer turned the evaluation text into no tokens; is it the model's tokenizer?")
    available = len(ids) // seq_len
    if available == 0:
        raise EvalDataError(
            f"the evaluation text has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
            "give a longer --text or a smaller --seq-len"
        )
    if available < samples:
        logger.warning("the evaluation text holds %d sequences of %d tokens, not %d", available, seq_len, samples)
    n = min(samples, available)
    tokens = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return list(tokens.split(batch_size))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(_device_of(model)), use_cache=False).logits


def _check_batch(batch: Any) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.shape[1] < 2:
        shape = list(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise EvalDataError(f"evaluation batches must be input_ids tensors [B, T] with T >= 2, got {shape}")
    return batch


def _sequence_sums(base: torch.Tensor, quant: torch.Tensor, ids: torch.Tensor) -> tuple[float, float, float]:
    """(-sum log p, -sum log q, sum KL(p||q)) over the next-token positions of one sequence."""
    log_p = F.log_softmax(base[:-1].float(), dim=-1)
    log_q = F.log_softmax(quant[:-1].to(log_p.device).float(), dim=-1)
    target = ids[1:].to(log_p.device).unsqueeze(-1)
    nll_p = -log_p.gather(-1, target).double().sum()
    nll_q = -log_q.gather(-1, target).double().sum()
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # 0 log 0 = 0 (masked logits)
    kl = terms.sum(dim=-1).double().sum()
    return float(nll_p), float(nll_q), float(kl)


@torch.inference_mode()
def evaluate(
    base_model: nn.Module, quant_model: nn.Module, batches: Iterable[torch.Tensor], *, progress: bool = False
) -> EvalResult:
    """Perplexity of both models and mean per-token KL(base || quant) over ``batches``.

    Args:
        base_model: the reference (unquantized) causal LM.
        quant_model: the quantized model, e.g. from ``quantport.load(dir, simulate_activations=True)``
            or an in-memory model inside ``quantport.simulate``. The two may sit on different devices.
        batches: ``input_ids`` tensors ``[B, T]`` (see :func:`eval_batches`).
        progress: show a progress bar.
    """
    batches = list(batches)
    nll_base = nll_quant = kl = 0.0
    tokens = 0
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
        ids = _check_batch(batch)
        base_logits, quant_logits = _logits(base_model, ids), _logits(quant_model, ids)
        if base_logits.shape[-1] != quant_logits.shape[-1]:
            raise ModelMismatchError(
                f"the models have different vocabularies ({base_logits.shape[-1]} vs {quant_logits.shape[-1]})"
            )
        for row in range(ids.shape[0]):
            sums = _sequence_sums(base_logits[row], quant_logits[row], ids[row])
            nll_base, nll_quant, kl = nll_base + sums[0], nll_quant + sums[1], kl + sums[2]
        tokens += ids.shape[0] * (ids.shape[1] - 1)
    if tokens == 0:
        raise EvalDataError("no evaluation batches")
    return EvalResult(
        ppl_base=math.exp(nll_base / tokens),
        ppl_quant=math.exp(nll_quant / tokens),
        kl_mean=kl / tokens,
        tokens=tokens,
    )

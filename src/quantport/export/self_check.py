"""Every checkpoint quantport writes loads in the engine it targets, or is refused.

Two guards, one before and one after writing:

* :func:`refuse_known_failure`: a (family, format, scheme) that :data:`quantport.arch.engines.KNOWN_FAILURES`
  lists as not loading is refused with the form that works, before calibration (``quantize(..., format=...)``,
  the CLI) and again before anything is written (``export()``).
* :func:`check_written`: at the end of every export, quantport's own checker
  (:func:`quantport.check.runner.check_checkpoint`, vLLM rules) runs on the staging directory, before it is
  renamed to ``OUT``; an error finding fails the export and nothing is left at ``OUT``. Its value tests
  (scales, finite floats, per-tensor values) have by then run on the bytes as each shard's writer wrote them,
  while the other shards were still being written (:mod:`.value_witness`); what they vouched for is not read
  back, and everything else (headers, names, the cross-file rules) is checked at the end.

Both take ``allow_check_errors``: True logs the problems as warnings and writes the checkpoint anyway
(``--allow-check-errors`` on the command line), for checkpoints meant for something else than the engine
(comparisons with a reference exporter, research on the numerics).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..arch.engines import known_failure
from ..check.witnessed import WitnessedValues
from ..errors import ExportError
from ..recipes import LinearScheme, QuantRecipe
from .targets import ExportFormat, UnsupportedFormatError

__all__ = ["SelfCheckError", "check_written", "model_types", "refuse_known_failure"]

logger = logging.getLogger(__name__)

SHOWN_FINDINGS = 10
"""Error findings quoted in the exception; the rest are counted."""

NOT_FOR_VLLM: dict[LinearScheme, frozenset[str]] = {
    LinearScheme.W4A16_MODELOPT: frozenset({"config.quant-algo"}),
    LinearScheme.W8A16_MODELOPT: frozenset({"config.quant-algo"}),
}
"""Schemes whose checkpoint targets TensorRT-LLM, not vLLM or SGLang (ModelOpt ``W4A16_AWQ`` / ``W8A16``, which
vLLM's ModelOpt reader rejects by design), and the checker rules (vLLM's) that such a checkpoint fails by being
what it is: their findings are logged as warnings. The checker does not model TensorRT-LLM's reader."""


class SelfCheckError(ExportError):
    """quantport's checker found errors in the checkpoint this export wrote."""


def model_types(model: nn.Module) -> tuple[str, ...]:
    """``model_type`` of the model and of its text config (Llama 4 multimodal: ``llama4``, ``llama4_text``)."""
    config = getattr(model, "config", None)
    if config is None:
        return ()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = (getattr(config, "model_type", "") or "", getattr(text, "model_type", "") or "")
    return tuple(dict.fromkeys(t for t in types if t))


def refuse_known_failure(
    model: nn.Module,
    recipe: QuantRecipe,
    fmt: ExportFormat | str,
    *,
    experts_quantized: bool,
    allow_check_errors: bool = False,
) -> None:
    """Raise :class:`UnsupportedFormatError` naming the working form when ``recipe`` in ``fmt`` is known not to
    load for this model's family (a warning instead when ``allow_check_errors``)."""
    fmt = ExportFormat(fmt)
    for model_type in model_types(model):
        failure = known_failure(model_type, fmt.value, recipe.scheme.value, experts_quantized)
        if failure is None:
            continue
        message = f"recipe {recipe.name!r} ({recipe.scheme.value}): {failure.message()}"
        if allow_check_errors:
            logger.warning("writing a checkpoint known not to load (allow_check_errors): %s", message)
            return
        raise UnsupportedFormatError(
            message + " (or pass --allow-check-errors / allow_check_errors=True to write it anyway)"
        )


def check_written(
    staging: Path,
    scheme: LinearScheme,
    *,
    allow_check_errors: bool = False,
    witnessed: WitnessedValues | None = None,
) -> None:
    """Run the checker (vLLM's rules) on the files just written to ``staging``; raise :class:`SelfCheckError` on
    an error finding. Warnings are logged; so are errors when ``allow_check_errors``, and the errors that a
    checkpoint of ``scheme`` has by targeting another engine (:data:`NOT_FOR_VLLM`).

    ``witnessed``: the value tests already run on the bytes as the writer wrote them
    (:mod:`.value_witness`); the checker then reads back only what they did not vouch for, with the same
    findings."""
    from ..check.findings import Severity
    from ..check.runner import check_checkpoint

    report = check_checkpoint(staging, witnessed=witnessed)
    expected = NOT_FOR_VLLM.get(scheme, frozenset())
    for finding in report.findings:
        if finding.severity is Severity.WARNING or allow_check_errors or finding.rule in expected:
            logger.warning("quantport check: %s %s: %s", finding.rule, finding.target, finding.message)
    errors = [f for f in report.errors if f.rule not in expected]
    if not errors or allow_check_errors:
        return
    shown = [f"  {f.rule} {f.target}: {f.message} (fix: {f.fix})" for f in errors[:SHOWN_FINDINGS]]
    if len(errors) > SHOWN_FINDINGS:
        shown.append(f"  ... and {len(errors) - SHOWN_FINDINGS} more")
    rules = ", ".join(sorted({f.rule for f in errors}))
    raise SelfCheckError(
        f"the checkpoint fails quantport's own check with {len(errors)} error(s) [{rules}], so it was not written:\n"
        + "\n".join(shown)
        + "\nPass --allow-check-errors (export(..., allow_check_errors=True)) to write it anyway."
    )

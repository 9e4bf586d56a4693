"""The size fields of a model's ``config.json``: integers that transformers and the engines build from.

A string, a float, a boolean, a negative number or (for the required ones) null in ``hidden_size``,
``num_hidden_layers`` and the like makes transformers or an engine crash while building the model, or
allocate something absurd. :func:`model_field_problems` lists them, for the top-level config and for
``text_config`` (vision-language models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["OPTIONAL_FIELDS", "REQUIRED_FIELDS", "ModelFieldProblem", "model_field_problems"]

REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
"""Positive integers when present; null is refused."""
OPTIONAL_FIELDS = (
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "max_position_embeddings",
    "n_shared_experts",
)
"""Non-negative integers or null when present (transformers derives a default from null)."""


@dataclass(frozen=True, slots=True)
class ModelFieldProblem:
    """One invalid size field.

    Attributes:
        key: the field, ``text_config.``-prefixed when it is in the text config.
        value: the value as written.
        expected: what it must be.
    """

    key: str
    value: Any
    expected: str

    def describe(self) -> str:
        return f"{self.key} is {self.value!r:.60}, not {self.expected}"


def _problem(key: str, value: Any, required: bool) -> str | None:
    if value is None:
        return "a positive integer" if required else None
    if not isinstance(value, int) or isinstance(value, bool):
        return "a positive integer" if required else "a non-negative integer or null"
    if required and value <= 0:
        return "a positive integer"
    if value < 0:
        return "a non-negative integer or null"
    return None


def model_field_problems(config: dict[str, Any] | None) -> list[ModelFieldProblem]:
    """Invalid size fields of ``config`` (and of its ``text_config``), in field order."""
    problems: list[ModelFieldProblem] = []
    if not isinstance(config, dict):
        return problems
    holders = [("", config)]
    if isinstance(config.get("text_config"), dict):
        holders.append(("text_config.", config["text_config"]))
    for prefix, holder in holders:
        for fields, required in ((REQUIRED_FIELDS, True), (OPTIONAL_FIELDS, False)):
            for key in fields:
                if key in holder:
                    expected = _problem(key, holder[key], required)
                    if expected is not None:
                        problems.append(ModelFieldProblem(prefix + key, holder[key], expected))
    return problems

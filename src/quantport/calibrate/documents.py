"""One data set row as token ids, the way the model sees it when it is served.

A row is either plain text (a ``text`` field) or a chat (a ``messages`` field: a list of
``{"role", "content"}``).

- A text row is tokenized with the tokenizer's own special tokens, as a served completion prompt is
  (a BOS in front for Llama-style tokenizers), and ends with the EOS token, as documents are packed in
  pretraining, so that packed documents do not run into each other.
- A chat is rendered with the tokenizer's chat template to a string (``tokenize=False``), and that
  string is tokenized *without* special tokens: the template writes the BOS itself where the model
  expects one, so adding special tokens again would put two BOS in front. The ids equal
  ``tokenizer.apply_chat_template(messages, tokenize=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..calibration_sources import CalibrationSource
from ..errors import CalibrationDataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DEFAULT_MESSAGES_FIELD", "DEFAULT_TEXT_FIELD", "RowField", "RowKind", "choose_field", "document_ids"]

DEFAULT_TEXT_FIELD = "text"
DEFAULT_MESSAGES_FIELD = "messages"


class RowKind(str, Enum):
    """What a row's calibration field holds."""

    TEXT = "text"
    """A string, tokenized as a completion prompt."""
    MESSAGES = "messages"
    """A list of ``{"role", "content"}`` rendered with the chat template."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RowField:
    """The field that calibration reads from every row of a source, and what it holds."""

    kind: RowKind
    name: str


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def choose_field(row: Mapping[str, Any], source: CalibrationSource, tokenizer: PreTrainedTokenizerBase) -> RowField:
    """The field to read, from the source's options and its first row: an explicit text or messages field,
    else ``messages`` where the rows have it, else ``text``. Raises :class:`CalibrationDataError` for a
    missing field, or a chat with a tokenizer that has no chat template."""
    if source.messages_field is not None:
        chosen = RowField(RowKind.MESSAGES, source.messages_field)
    elif source.text_field is not None:
        chosen = RowField(RowKind.TEXT, source.text_field)
    elif DEFAULT_MESSAGES_FIELD in row:
        chosen = RowField(RowKind.MESSAGES, DEFAULT_MESSAGES_FIELD)
    else:
        chosen = RowField(RowKind.TEXT, DEFAULT_TEXT_FIELD)
    if chosen.name not in row:
        flag = "--calib-messages-field" if chosen.kind is RowKind.MESSAGES else "--calib-text-field"
        raise CalibrationDataError(
            f"calibration data set {source.name} has no field {chosen.name!r} (its fields: "
            f"{', '.join(map(str, row)) or 'none'}); name the field with {flag}"
        )
    if chosen.kind is RowKind.MESSAGES and not _has_chat_template(tokenizer):
        raise CalibrationDataError(
            f"calibration data set {source.name} holds chats ({chosen.name!r}), but the tokenizer of "
            f"{getattr(tokenizer, 'name_or_path', '') or 'the model'} has no chat template; use a model with one, "
            "or calibrate on a text field (--calib-text-field)"
        )
    return chosen


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return list(ids)


def _conversation_ids(tokenizer: PreTrainedTokenizerBase, messages: Any, where: str) -> list[int]:
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
        raise CalibrationDataError(f"{where} is not a list of {{role, content}} messages")
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # noqa: BLE001  (jinja errors: the template refused these messages)
        raise CalibrationDataError(f"{where}: the chat template failed on it ({type(exc).__name__}: {exc})") from None
    return _ids(tokenizer(rendered, add_special_tokens=False, return_attention_mask=False, verbose=False))


def document_ids(tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], field: RowField, where: str) -> list[int]:
    """The token ids of one row (empty for an empty or null field); ``where`` names the row in errors."""
    value = row.get(field.name)
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value):
        return []
    if field.kind is RowKind.MESSAGES:
        return _conversation_ids(tokenizer, value, f"{where} field {field.name!r}")
    if not isinstance(value, str):
        raise CalibrationDataError(
            f"{where} field {field.name!r} holds {type(value).__name__}, not text; name the text field with "
            "--calib-text-field, or a chat field with --calib-messages-field"
        )
    ids = _ids(tokenizer(value, return_attention_mask=False, verbose=False))
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + [eos] if isinstance(eos, int) and (not ids or ids[-1] != eos) else ids

"""REDI's data (``redi.data``): TRL preference rows or unpaired labelled rows, read and tokenised.

The format is detected from the columns: ``prompt``/``chosen``/``rejected`` (TRL preference) or
``prompt``/``completion``/``label`` (unpaired). Conversational rows go through the tokenizer's chat
template as TRL does; plain prompts are used as written, or formatted with the recipe's template
when ``redi.format_prompts``. Completions end with EOS; rows longer than ``redi.max_length`` tokens
are skipped and counted. The trainer is :mod:`rltk.trainer.redi`; docs/algorithms/redi.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rltk.data.loaders import DataError
from rltk.data.pairs import read_rows
from rltk.schema import Recipe

log = logging.getLogger(__name__)

PAIRED, UNPAIRED = "preference", "unpaired"
COLUMNS = {PAIRED: ("prompt", "chosen", "rejected"), UNPAIRED: ("prompt", "completion", "label")}


@dataclass(frozen=True)
class RediRow:
    """One data row as token ids: a prompt with (chosen, rejected), or with one labelled completion."""

    prompt: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]
    labels: tuple[bool, ...]


@dataclass(frozen=True)
class RediTable:
    """The rows of ``redi.data`` as read, and their format (detected from the columns)."""

    source: str
    fmt: str
    rows: list[tuple[str, dict[str, Any]]]


@dataclass
class RediData:
    """The tokenised rows of a :class:`RediTable`, and how many were skipped and why."""

    fmt: str
    rows: list[RediRow]
    skipped_long: int = 0  # prompt + completion longer than redi.max_length tokens
    skipped_empty_prompt: int = 0


def read_redi_table(source: str) -> RediTable:
    """Read ``source`` (.jsonl/.json/.parquet or HF dataset id) and detect its format.

    TRL preference rows have ``prompt``, ``chosen``, ``rejected``; unpaired rows ``prompt``,
    ``completion``, ``label``. A missing column is a :class:`DataError` naming the row.
    """
    try:
        rows = list(read_rows(source, "train"))
    except DataError as exc:
        raise DataError(f"redi.data: {exc}") from None
    if not rows:
        raise DataError(f"redi.data '{source}' has no rows")
    first = rows[0][1]
    if "chosen" in first or "rejected" in first:
        fmt = PAIRED
    elif "completion" in first or "label" in first:
        fmt = UNPAIRED
    else:
        raise DataError(f"redi.data '{source}': expected columns prompt/chosen/rejected (TRL preference) or "
                        f"prompt/completion/label (unpaired); {rows[0][0]} has {', '.join(sorted(first)) or 'none'}")
    for where, row in rows:
        missing = [c for c in COLUMNS[fmt] if c not in row]
        if missing:
            raise DataError(f"redi.data '{source}': {where} has no '{missing[0]}' column ({fmt} rows need "
                            f"{', '.join(COLUMNS[fmt])})")
    return RediTable(source, fmt, rows)


def _texts(table: RediTable, where: str, row: dict[str, Any], tokenizer, recipe: Recipe) -> dict[str, Any]:
    """The row's prompt and completion texts: conversational rows through the chat template (as TRL
    does), plain prompts formatted with the recipe's template when ``redi.format_prompts``."""
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    example = {c: row[c] for c in COLUMNS[table.fmt]}
    try:
        if is_conversational(example):
            return {**example, **maybe_apply_chat_template(example, tokenizer)}
        for column in COLUMNS[table.fmt]:
            if column != "label" and not isinstance(example[column], str):
                raise DataError(f"'{column}' must be a string or a list of messages, got "
                                f"{type(example[column]).__name__}")
        if recipe.redi.format_prompts:
            from rltk.data.templates import format_prompt

            d = recipe.data
            example["prompt"] = format_prompt(example["prompt"], d.template, tokenizer=tokenizer,
                                              chat_template=d.chat_template, system_prompt=d.system_prompt,
                                              **d.chat_template_kwargs)
        return example
    except (DataError, ValueError, KeyError, TypeError) as exc:  # e.g. a tokenizer without a chat template
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"redi.data '{table.source}': {where}: {message}") from None


def tokenize_table(table: RediTable, tokenizer, recipe: Recipe) -> RediData:
    """Token ids of every row; completions end with EOS; too-long rows are skipped and counted."""
    eos = tokenizer.eos_token_id
    data = RediData(table.fmt, [])

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    for where, row in table.rows:
        texts = _texts(table, where, row, tokenizer, recipe)
        if table.fmt == PAIRED:
            completions, labels = (texts["chosen"], texts["rejected"]), (True, False)
        else:
            label = row["label"]
            if not isinstance(label, (bool, int)) or label not in (0, 1):
                raise DataError(f"redi.data '{table.source}': {where}: 'label' must be true or false, got {label!r}")
            completions, labels = (texts["completion"],), (bool(label),)
        prompt = ids(texts["prompt"])
        tokens = tuple(c if c[-1:] == (eos,) else c + (eos,) for c in map(ids, completions))
        if not prompt:
            data.skipped_empty_prompt += 1
        elif len(prompt) + max(map(len, tokens)) > recipe.redi.max_length:
            data.skipped_long += 1
        else:
            data.rows.append(RediRow(prompt, tokens, labels))
    if data.skipped_long or data.skipped_empty_prompt:
        log.warning("redi.data: skipped %d rows longer than redi.max_length = %d tokens and %d with an empty "
                    "prompt; kept %d", data.skipped_long, recipe.redi.max_length, data.skipped_empty_prompt,
                    len(data.rows))
    if not data.rows:
        raise DataError(f"redi.data '{table.source}': no usable rows (all longer than redi.max_length = "
                        f"{recipe.redi.max_length} tokens or with an empty prompt)")
    return data

"""Load question/answer examples from the built-in task, local files or the Hugging Face Hub.

:func:`load_examples` returns the examples; :func:`load_examples_with_stats` also returns a
:class:`LoadStats` saying how many rows were read and how many were skipped and why (the same
counts are logged as a warning whenever rows are skipped). Prompts are not formatted here:
``Example.question`` is the raw problem text, turned into a prompt later by
:func:`rltk.data.templates.format_prompt`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewards.extract import last_boxed
from rltk.data.synthetic import generate_problems

__all__ = [
    "DataError",
    "Example",
    "LoadStats",
    "MissingSplitError",
    "hub_split_names",
    "load_examples",
    "load_examples_with_stats",
    "named_split_files",
    "split_files",
    "unknown_split",
]

logger = logging.getLogger(__name__)

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_BUILTIN_DEFAULT_SIZE = {"train": 5000, "test": 500}


class DataError(ValueError):
    """A data source cannot give usable examples (missing field, no rows, unreadable file)."""


class MissingSplitError(DataError):
    """The source exists but has no split of this name (``available``: the splits it has, when known)."""

    def __init__(self, message: str, split: str, available: Sequence[str] = ()):
        super().__init__(message)
        self.split, self.available = split, list(available)


MESSAGE_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    """One problem. ``question`` is the prompt text (for a conversational prompt: its last user turn);
    ``messages`` the conversational prompt itself (TRL's ``[{role, content}, ...]``), or None for a
    standard one; ``columns`` every other column of the row, passed to reward functions."""

    id: str
    question: str
    answer: str
    solution: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    columns: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class LoadStats:
    """What one load read and dropped. ``rows`` counts rows looked at (all of them, or up to
    ``num_examples`` usable ones); ``kept + skipped_no_answer + skipped_bad_prompt == rows``."""

    source: str
    split: str
    rows: int
    kept: int
    skipped_no_answer: int  # answer None/empty, or no balanced \boxed{} with extract_boxed_answer
    skipped_bad_prompt: int  # prompt not a string, or empty


def _split_owner(name: str, split: str, other_split: str | None) -> str | None:
    """The split a file name is named after: the longer of ``split``/``other_split`` that starts it
    (``train_eval.jsonl`` belongs to ``train_eval``, not ``train``), or None."""
    owners = [s for s in (split, other_split) if s and name.startswith(s)]
    return max(owners, key=len) if owners else None


def named_split_files(names: Sequence[str], split: str, other_split: str | None = None) -> list[str]:
    """The files among ``names`` (paths or bare names, judged by the file name) named after ``split``."""
    return [n for n in names if _split_owner(Path(n).name, split, other_split) == split]


def split_files(names: Sequence[str], split: str, other_split: str | None = None) -> list[str]:
    """The data files of ``split`` in a directory holding ``names``: those named after it
    (:func:`named_split_files`), else every file not named after ``other_split``. Without
    ``other_split`` that fallback is every file (a directory of unnamed parts is one split)."""
    return named_split_files(names, split, other_split) or [
        n for n in names if _split_owner(Path(n).name, split, other_split) is None]


def _local_files(source: str, split: str, other_split: str | None = None) -> tuple[str, list[str]] | None:
    """(datasets builder, files) when ``source`` is a local file or directory, else None.

    In a directory, files whose names start with ``split`` (``test.jsonl``,
    ``test-00000-of-00001.parquet``) are used when there are any, else all data files except those
    named after ``other_split`` (:func:`split_files`).
    """
    path = Path(source)
    if path.suffix in _FILE_FORMATS:
        if not path.is_file():
            raise DataError(f"data file not found: {source}")
        return _FILE_FORMATS[path.suffix], [str(path)]
    if not path.is_dir():
        return None
    every = sorted(p for p in path.rglob("*") if p.suffix in _FILE_FORMATS and p.is_file())
    files = [Path(f) for f in split_files([str(p) for p in every], split, other_split)]
    if every and not files:
        raise DataError(f"data directory {source} has no files for split {split!r}: every data file is named "
                        f"after {other_split!r} ({', '.join(p.name for p in every[:3])})")
    builders = {_FILE_FORMATS[p.suffix] for p in files}
    if len(builders) != 1:
        found = "no .jsonl/.json/.parquet files" if not files else "both JSON and Parquet files"
        raise DataError(f"data directory {source} has {found}")
    return builders.pop(), [str(p) for p in files]


def unknown_split(error: BaseException) -> list[str] | None:
    """The splits a dataset has when ``error`` (or its cause) is ``datasets``' refusal of a split it
    lacks (``ValueError: Unknown split "test". Should be one of ['train'].``); None for any other error."""
    import ast
    import re

    while error is not None:
        match = re.match(r"Unknown split \"[^\"]*\"\. Should be one of (\[.*\])", str(error))
        if isinstance(error, ValueError) and match:
            try:
                return [str(s) for s in ast.literal_eval(match.group(1))]
            except (ValueError, SyntaxError):
                return []
        error = error.__cause__ or error.__context__
    return None


def _is_empty(path: str) -> bool:
    """True when a local data file holds no rows: zero bytes, only whitespace, or a Parquet
    file whose footer says 0 rows (read lazily: a large file is not scanned)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # unreadable: let the loader report it
            return False
    with open(path, "rb") as handle:
        return all(not line.strip() for line in handle)


def _first_bad_json_row(path: str) -> str | None:
    """Where a JSON Lines file stops being JSON: 'row N: why', N counting non-blank lines from 0.
    A lone surrogate escape (``"\\ud800"``) parses in Python but is not text, so it counts too."""
    import json

    with open(path, "rb") as handle:
        rows = (line for line in handle if line.strip())
        for number, line in enumerate(rows):
            try:
                json.dumps(json.loads(line), ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                return f"row {number}: invalid escaped surrogate (a lone \\ud800-\\udfff escape is not text)"
            except ValueError as e:  # JSONDecodeError and undecodable bytes
                return f"row {number}: {e}"
    return None


def _root_message(error: BaseException) -> str:
    """The first line of the innermost cause: datasets wraps the useful message in generic ones."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _load_table(source: str, split: str, subset: str | None, other_split: str | None = None):
    import datasets  # heavy import, only when a file or Hub dataset is read

    local = _local_files(source, split, other_split)
    if local is not None:
        builder, files = local
        empty = [f for f in files if _is_empty(f)]
        if len(empty) == len(files):
            raise DataError(f"data file {empty[0]} is empty (no rows); write one JSON object per line or a "
                            "non-empty Parquet table")
    try:
        if local is not None:
            return datasets.load_dataset(builder, data_files=files, split="train")
        return datasets.load_dataset(source, subset, split=split)
    except Exception as e:  # datasets raises many types; the user needs one line
        bad_rows = [(f, row) for f in (local[1] if local else []) if f.endswith(".jsonl")
                    for row in [_first_bad_json_row(f)] if row]
        if bad_rows:
            raise DataError(f"cannot load {bad_rows[0][0]}: JSON parse error in {bad_rows[0][1]}") from e
        available = unknown_split(e) if local is None else None
        if available is not None:
            raise MissingSplitError(f"{source!r} has no split {split!r} (its splits: {available})", split,
                                    available) from e
        raise DataError(f"cannot load {source!r} (split {split!r}): {_root_message(e)}") from e


def hub_split_names(source: str, split: str, subset: str | None = None) -> list[str] | None:
    """None when the Hugging Face Hub dataset ``source`` has ``split``; else the splits it has
    (``datasets`` names them when it refuses the split). Other load errors are raised as DataError."""
    try:
        _load_table(source, split, subset)
    except MissingSplitError as e:
        return e.available
    return None


def _check_fields(columns: Sequence[str], source: str, fields: dict[str, str | None]) -> None:
    for role, name in fields.items():
        if name is not None and name not in columns:
            raise DataError(f"{role} {name!r} not found in {source!r}; available columns: {list(columns)}")


def _clean_answer(value: Any, extract_boxed: bool) -> str | None:
    """The gold answer as text; None (a counted skip) for missing, NaN, empty or structured values."""
    if value is None or isinstance(value, (dict, list, tuple)):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    answer = str(value).strip()
    if extract_boxed:
        answer = (last_boxed(answer) or "").strip()
    return answer or None


def conversational_prompt(value: Any, where: str) -> tuple[tuple[dict[str, str], ...], str] | None:
    """A TRL conversational prompt (a list of ``{"role", "content"}`` messages) as (messages, text of
    its last user turn); None when ``value`` is not a list whose first item is a mapping with a
    ``role`` (TRL's ``is_conversational`` test: such a prompt is then counted as a bad prompt). In a
    conversational prompt, a message that is not a mapping with a known role and string content is a
    :class:`DataError` naming ``where`` and the message."""
    if not (isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]):
        return None
    messages = []
    for k, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in MESSAGE_ROLES:
            shown = repr(role if isinstance(message, dict) else message)[:60]
            raise DataError(f"{where}: prompt message {k} has role {shown}; a conversational prompt holds "
                            f"{{role, content}} messages with role one of {', '.join(MESSAGE_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: prompt message {k} ({role}) has content of type "
                            f"{type(message.get('content')).__name__}; expected text")
        messages.append({"role": role, "content": message["content"]})
    users = [m["content"] for m in messages if m["role"] == "user"]
    return tuple(messages), users[-1] if users else ""


def _rows_to_examples(
    table, source: str, split: str, fields: dict[str, str | None], num_examples: int | None, extract_boxed: bool
) -> tuple[list[Example], LoadStats]:
    # [:] materializes a column as a list (datasets >= 4 returns a lazy Column, slow to index)
    columns = {role: table[name][:] if name else None for role, name in fields.items()}
    questions, answers = columns["prompt_field"], columns["answer_field"]
    solutions, ids = columns["solution_field"], columns["id_field"]
    others = {name: table[name][:] for name in table.column_names if name != fields["prompt_field"]}
    examples: list[Example] = []
    rows = no_answer = bad_prompt = 0
    for i in range(len(table)):
        if num_examples is not None and len(examples) >= num_examples:
            break
        rows += 1
        question, answer = questions[i], _clean_answer(answers[i], extract_boxed)
        conversation = conversational_prompt(question, f"{source} ({split}) row {i}")
        messages = None
        if conversation is not None:
            messages, question = conversation
        if not isinstance(question, str) or not question.strip():
            bad_prompt += 1
        elif answer is None:
            no_answer += 1
        else:
            examples.append(
                Example(
                    id=str(ids[i]) if ids is not None else f"{split}-{i}",
                    question=question,
                    answer=answer,
                    solution=None if solutions is None or solutions[i] is None else str(solutions[i]),
                    messages=messages,
                    columns={name: values[i] for name, values in others.items()},
                )
            )
    return examples, LoadStats(source, split, rows, len(examples), no_answer, bad_prompt)


def _builtin(split: str, levels, num_examples: int | None, seed: int) -> list[Example]:
    if split not in _BUILTIN_DEFAULT_SIZE:
        raise DataError(f"the builtin task has splits {sorted(_BUILTIN_DEFAULT_SIZE)}; got {split!r}")
    n = _BUILTIN_DEFAULT_SIZE[split] if num_examples is None else num_examples
    try:
        problems = generate_problems(levels, n, split, seed)
    except ValueError as e:
        raise DataError(f"builtin task: {e}") from None
    return [Example(p.id, p.question, p.answer, p.solution) for p in problems]


def load_examples_with_stats(
    source: str,
    *,
    split: str = "train",
    prompt_field: str = "problem",
    answer_field: str = "answer",
    solution_field: str | None = None,
    id_field: str | None = None,
    levels: int | Sequence[int] = (1,),
    num_examples: int | None = None,
    seed: int = 0,
    subset: str | None = None,
    extract_boxed_answer: bool = False,
    other_split: str | None = None,
) -> tuple[list[Example], LoadStats]:
    """:func:`load_examples` (same arguments) plus the :class:`LoadStats` of the load."""
    if num_examples is not None and num_examples < 1:
        raise DataError(f"num_examples must be >= 1; got {num_examples}")
    if source == "builtin":
        examples = _builtin(split, levels, num_examples, seed)
        return examples, LoadStats(source, split, len(examples), len(examples), 0, 0)
    table = _load_table(source, split, subset, other_split)
    fields = {
        "prompt_field": prompt_field,
        "answer_field": answer_field,
        "solution_field": solution_field,
        "id_field": id_field,
    }
    _check_fields(table.column_names, source, fields)
    examples, stats = _rows_to_examples(table, source, split, fields, num_examples, extract_boxed_answer)
    if stats.skipped_no_answer or stats.skipped_bad_prompt:
        logger.warning(
            "%s (%s): skipped %d rows without an answer and %d without a string prompt; kept %d",
            source, split, stats.skipped_no_answer, stats.skipped_bad_prompt, stats.kept,
        )
    if not examples:
        raise DataError(f"no usable examples in {source!r} (split {split!r}): {stats}")
    return examples, stats


def load_examples(
    source: str,
    *,
    split: str = "train",
    prompt_field: str = "problem",
    answer_field: str = "answer",
    solution_field: str | None = None,
    id_field: str | None = None,
    levels: int | Sequence[int] = (1,),
    num_examples: int | None = None,
    seed: int = 0,
    subset: str | None = None,
    extract_boxed_answer: bool = False,
    other_split: str | None = None,
) -> list[Example]:
    """Examples from ``source``:

    - ``"builtin"``: the synthetic task (:mod:`rltk.data.synthetic`) at ``levels``, split
      ``"train"``/``"test"``, ``num_examples`` (default 5000 train / 500 test), ``seed``;
    - a path ending in ``.jsonl``, ``.json`` or ``.parquet``, or a directory of such files: read
      with ``datasets.load_dataset("json"|"parquet", data_files=...)`` (a file is one split; in a
      directory, the files named after ``split``, else every file not named after ``other_split``);
    - anything else: a Hugging Face Hub dataset, ``datasets.load_dataset(source, subset, split=split)``.

    For files and Hub datasets, ``prompt_field``/``answer_field`` name the question and answer
    columns (the prompt may be TRL's conversational format, a list of ``{role, content}`` messages;
    every other column is kept in ``Example.columns`` for reward functions), ``solution_field``/``id_field`` optional ones (ids default to ``"<split>-<row>"``).
    ``extract_boxed_answer=True`` reads the answer as the last balanced ``\\boxed{...}`` of the
    ``answer_field`` text (e.g. MATH's ``solution`` column). Answers become strings; rows with no
    answer or a non-string/empty prompt are skipped and counted (warning + :class:`LoadStats`).
    ``num_examples`` keeps the first N usable rows in source order; ``seed`` only affects the
    builtin task. Raises :class:`DataError` for a missing field (naming the available columns),
    an unreadable source, or no usable rows, and its subclass :class:`MissingSplitError` when a Hub
    dataset has no ``split``. :func:`load_examples_with_stats` also returns the skip counts.
    Which split a recipe evaluates on (and the held-out slice carved when there is no test split)
    is decided in :mod:`rltk.data.heldout`, not here.
    """
    return load_examples_with_stats(
        source,
        split=split,
        prompt_field=prompt_field,
        answer_field=answer_field,
        solution_field=solution_field,
        id_field=id_field,
        levels=levels,
        num_examples=num_examples,
        seed=seed,
        subset=subset,
        extract_boxed_answer=extract_boxed_answer,
        other_split=other_split,
    )[0]

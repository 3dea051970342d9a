"""REDI's training data from verified traces (``rltk data pairs``; docs/algorithms/reference.md §6).

Xu et al. 2025 (arXiv 2505.24850) train in two stages on a teacher's verified traces: SFT on the
correct ones, then the REDI objective on one correct and one wrong trace per prompt. This module
turns traces into both data sets:

- **SFT rows** ``{"prompt", "completion"}``: every correct trace, deduplicated by
  (prompt, completion);
- **pairs** for every prompt that has at least one correct and one wrong trace: one of each, chosen
  at random with a seed (per prompt, so adding or removing other prompts does not change a
  prompt's choice), in TRL's preference format ``{"prompt", "chosen", "rejected"}`` or its
  unpaired format ``{"prompt", "completion", "label"}`` (two rows per pair).

Before that, truncated traces are dropped (they have no final answer to judge), traces shorter than
``min_chars`` or longer than ``max_chars`` characters are dropped, and duplicates removed.

Input rows, one JSON object per line (or a Parquet file / HF dataset id):

- ``samples.jsonl`` of ``rltk eval`` (one trace per row): ``prompt``, ``completion``, ``correct``
  and optionally ``truncated``; the prompt is the already formatted prompt the model saw;
- Open-R1 layout (one problem per row, e.g. ``open-r1/OpenR1-Math-Raw``): ``problem`` and a list
  ``generations``; a generation is correct when every verdict list present says so
  (``correctness.llama_verification`` and ``correctness.math_verify_reparsed_answer`` — the
  authors' "Llama and Math-Verify" rule — or ``correctness_math_verify``/``correctness_llama``),
  truncated when ``finish_reasons`` says ``length`` or ``is_reasoning_complete`` is false; rows
  whose ``problem_is_valid`` is present and not "yes" are skipped. The prompt is the raw problem:
  train with ``redi.format_prompts: true`` so the recipe's template is applied.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rltk.data.loaders import DataError
from rltk.io import atomic_write_text

FORMATS = ("preference", "unpaired")


@dataclass
class PairStats:
    """What one ``rltk data pairs`` run read, dropped and wrote."""

    rows: int = 0  # input rows (lines) read
    prompts: int = 0  # distinct prompts among them
    traces: int = 0  # traces read (= rows for samples.jsonl; generations for the Open-R1 layout)
    invalid_problems: int = 0  # Open-R1 rows with problem_is_valid != yes, or of an excluded source
    truncated_dropped: int = 0
    length_filtered: int = 0
    duplicates: int = 0
    correct: int = 0  # kept correct traces
    sft_rows: int = 0  # SFT rows written (all kept correct traces, or --sft-per-prompt of each prompt)
    wrong: int = 0  # kept wrong traces
    pairs: int = 0
    all_correct_prompts: int = 0  # prompts without a pair: every kept trace correct
    all_wrong_prompts: int = 0  # ... every kept trace wrong
    empty_prompts: int = 0  # ... no trace left after the filters
    excluded_sources: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"read {self.rows} rows: {self.traces} traces of {self.prompts} prompts"
            + (f" ({self.invalid_problems} invalid or excluded problems skipped)" if self.invalid_problems else ""),
            f"dropped: {self.truncated_dropped} truncated, {self.length_filtered} outside the length limits, "
            f"{self.duplicates} duplicates",
            f"kept: {self.correct} correct and {self.wrong} wrong traces; {self.sft_rows} SFT rows",
            f"pairs: {self.pairs}; prompts without a pair: {self.all_correct_prompts} all correct, "
            f"{self.all_wrong_prompts} all wrong, {self.empty_prompts} with no trace left",
        ]


@dataclass(frozen=True)
class Trace:
    prompt: str
    completion: str
    correct: bool
    truncated: bool


# ------------------------------------------------------------------------------------------ reading


def read_rows(source: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) pairs: ``line N`` of a JSONL file, or ``row N`` of a Parquet file / HF dataset."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or (path.is_file() and path.suffix != ".parquet"):
        if not path.is_file():
            raise DataError(f"data file not found: {source}")
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{source}: line {number} is not valid JSON "
                                    f"({exc.msg}, column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{source}: line {number} is a {type(row).__name__}, expected one JSON object "
                                    "per line")
                yield f"line {number}", row
        return
    from rltk.data.loaders import _load_table  # a Parquet file or directory, or an HF dataset id

    table = _load_table(source, split, None)
    for number, row in enumerate(table, start=1):
        yield f"row {number}", row


def _field(row: dict, name: str, kind: type, where: str, source: str) -> Any:
    if name not in row:
        raise DataError(f"{source}: {where} has no '{name}' field (fields: {', '.join(sorted(row)) or 'none'})")
    value = row[name]
    if not isinstance(value, kind):
        raise DataError(f"{source}: {where}: '{name}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _sample_traces(row: dict, where: str, source: str) -> list[Trace]:
    """One trace from a ``samples.jsonl`` row of ``rltk eval``."""
    truncated = row.get("truncated", False)
    if not isinstance(truncated, bool):
        raise DataError(f"{source}: {where}: 'truncated' must be a bool, got {type(truncated).__name__}")
    return [Trace(_field(row, "prompt", str, where, source), _field(row, "completion", str, where, source),
                  _field(row, "correct", bool, where, source), truncated)]


_OPEN_R1_VERDICTS = (("correctness", "llama_verification"), ("correctness", "math_verify_reparsed_answer"),
                     ("correctness_llama",), ("correctness_math_verify",))


def _open_r1_traces(row: dict, where: str, source: str) -> list[Trace]:
    """The generations of an Open-R1 row (``problem`` + ``generations`` + verdict lists)."""
    problem = _field(row, "problem", str, where, source)
    generations = _field(row, "generations", list, where, source)
    verdicts = []
    for path in _OPEN_R1_VERDICTS:
        value: Any = row
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            if not isinstance(value, list) or len(value) != len(generations):
                raise DataError(f"{source}: {where}: '{'.'.join(path)}' must be a list with one verdict per generation")
            verdicts.append(value)
    if not verdicts:
        raise DataError(f"{source}: {where} has generations but no verdicts (correctness.* or correctness_math_verify)")
    finish = row.get("finish_reasons") or [None] * len(generations)
    complete = row.get("is_reasoning_complete") or [True] * len(generations)
    traces = []
    for i, text in enumerate(generations):
        if not isinstance(text, str):
            raise DataError(f"{source}: {where}: generation {i} is a {type(text).__name__}, expected a string")
        correct = all(bool(v[i]) for v in verdicts)
        truncated = (i < len(finish) and finish[i] == "length") or (i < len(complete) and complete[i] is False)
        traces.append(Trace(problem, text, correct, truncated))
    return traces


def read_traces(source: str, *, split: str = "train", exclude_sources: tuple[str, ...] = (),
                stats: PairStats | None = None) -> list[Trace]:
    """Every trace of ``source`` (see the module docstring for the accepted layouts)."""
    stats = stats if stats is not None else PairStats()
    traces: list[Trace] = []
    for where, row in read_rows(source, split):
        stats.rows += 1
        if "generations" in row:
            valid = row.get("problem_is_valid")
            if (isinstance(valid, str) and valid.strip().lower() != "yes") or row.get("source") in exclude_sources:
                stats.invalid_problems += 1
                continue
            traces.extend(_open_r1_traces(row, where, source))
        else:
            traces.extend(_sample_traces(row, where, source))
    if not stats.rows:
        raise DataError(f"{source}: no rows")
    stats.traces = len(traces)
    stats.prompts = len({t.prompt for t in traces})
    return traces


# ------------------------------------------------------------------------------------------ building


def build_pairs(traces: list[Trace], *, min_chars: int = 0, max_chars: int | None = None, seed: int = 0,
                fmt: str = "preference", sft_per_prompt: int | None = None,
                stats: PairStats | None = None) -> tuple[list[dict], list[dict], PairStats]:
    """(pair rows, SFT rows, stats) from ``traces``: drop truncated traces, traces outside
    [``min_chars``, ``max_chars``] and duplicate (prompt, completion)s; SFT rows are the kept correct
    traces (all, or ``sft_per_prompt`` of each prompt, seeded, the pair's chosen one first); one
    seeded (correct, wrong) pair per prompt that has both."""
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if min_chars < 0 or (max_chars is not None and max_chars < min_chars):
        raise DataError(f"length limits must satisfy 0 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
    if sft_per_prompt is not None and sft_per_prompt < 1:
        raise DataError(f"--sft-per-prompt must be >= 1, got {sft_per_prompt}")
    stats = stats if stats is not None else PairStats(traces=len(traces), prompts=len({t.prompt for t in traces}))
    by_prompt: dict[str, tuple[list[str], list[str]]] = {t.prompt: ([], []) for t in traces}
    seen: set[tuple[str, str]] = set()
    for t in traces:
        if t.truncated:
            stats.truncated_dropped += 1
        elif len(t.completion) < min_chars or (max_chars is not None and len(t.completion) > max_chars):
            stats.length_filtered += 1
        elif (t.prompt, t.completion) in seen:
            stats.duplicates += 1
        else:
            seen.add((t.prompt, t.completion))
            by_prompt[t.prompt][0 if t.correct else 1].append(t.completion)
    pairs: list[dict] = []
    sft: list[dict] = []
    for prompt, (correct, wrong) in by_prompt.items():
        stats.correct += len(correct)
        stats.wrong += len(wrong)
        rng = random.Random(f"{seed}\x00{prompt}")  # str seeds hash with SHA-512: stable across runs
        shuffled = rng.sample(correct, len(correct))
        kept = correct if sft_per_prompt is None else shuffled[:sft_per_prompt]
        sft.extend({"prompt": prompt, "completion": c} for c in kept)
        if not correct and not wrong:
            stats.empty_prompts += 1
        elif not wrong:
            stats.all_correct_prompts += 1
        elif not correct:
            stats.all_wrong_prompts += 1
        else:
            chosen, rejected = shuffled[0], rng.choice(wrong)
            if fmt == "preference":
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            else:
                pairs.append({"prompt": prompt, "completion": chosen, "label": True})
                pairs.append({"prompt": prompt, "completion": rejected, "label": False})
            stats.pairs += 1
    stats.sft_rows = len(sft)
    return pairs, sft, stats


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def make_pairs(source: str, out: str | Path, *, sft_out: str | Path | None = None, min_chars: int = 0,
               max_chars: int | None = None, seed: int = 0, fmt: str = "preference", split: str = "train",
               exclude_sources: tuple[str, ...] = (), sft_per_prompt: int | None = None) -> PairStats:
    """``rltk data pairs``: read ``source``, write the pairs to ``out`` (and the SFT rows to
    ``sft_out``) atomically, and return the counts."""
    stats = PairStats(excluded_sources=list(exclude_sources))
    traces = read_traces(source, split=split, exclude_sources=exclude_sources, stats=stats)
    pairs, sft, stats = build_pairs(traces, min_chars=min_chars, max_chars=max_chars, seed=seed, fmt=fmt,
                                    sft_per_prompt=sft_per_prompt, stats=stats)
    atomic_write_text(out, _jsonl(pairs))
    if sft_out is not None:
        atomic_write_text(sft_out, _jsonl(sft))
    return stats

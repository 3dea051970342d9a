"""Bad data (issue 8, item 5): every malformed dataset gives a clear one-line ``DataError`` or a
counted skip, never another exception type deep in a step.

Builds on ``tests/test_data.py`` (which covers a missing field with its column list, no usable rows,
a missing file, an empty directory, and the basic skip counts) with files that are broken in other
ways: empty or unparseable files, non-string prompts of every JSON/Arrow type, odd answers, and
prompts longer than ``data.max_prompt_length`` through ``drop_long_prompts`` with the tiny model's
character tokenizer.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from rltk.schema import DataConfig
from rltk.data.loaders import DataError, Example, load_examples, load_examples_with_stats
from rltk.data.recipe import build_prompts, drop_long_prompts
from rltk.data.synthetic import CHARSET
from rltk.data.templates import format_prompt
from rltk.models import build_char_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write(tmp_path: Path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:  # a pyarrow table
        pq.write_table(content, path)
    return str(path)


def load_outcome(path: str, **kwargs):
    """("ok", examples, stats) or ("error", one-line message); any other exception propagates."""
    try:
        examples, stats = load_examples_with_stats(path, **kwargs)
    except DataError as exc:
        message = str(exc)
        assert "\n" not in message, f"multi-line DataError: {message!r}"
        assert message.strip(), "empty DataError message"
        return ("error", message)
    return ("ok", examples, stats)


# --------------------------------------------------------------------------- unreadable files

# name -> (file name, content, regex the one-line DataError must match)
UNREADABLE = {
    "empty jsonl": ("train.jsonl", "", r"empty|no rows"),
    "blank lines only": ("train.jsonl", "\n\n   \n", r"empty|no rows"),
    "truncated last line": ("train.jsonl", '{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "ans',
                            r"JSON.*row 1"),
    "not JSON at all": ("train.jsonl", "hello world\n", r"JSON.*row 0"),
    "invalid escaped surrogate": ("train.jsonl", '{"problem": "\\ud800", "answer": "1"}\n', r"JSON.*surrogate"),
    "garbage parquet": ("train.parquet", b"PAR1" + b"\x00garbage" * 10, r"[Pp]arquet"),
    "empty parquet": ("train.parquet", "EMPTY_TABLE", r"empty|no rows"),
    "json object with a list inside": ("train.json", json.dumps({"data": [{"problem": "a", "answer": "1"}]}),
                                       r"prompt_field 'problem' not found.*\['data'\]"),
    "all-null rows": ("train.jsonl", jsonl([{"problem": None, "answer": None}] * 3), r"no usable examples"),
}
@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_file_is_one_clear_data_error(case, tmp_path):
    file_name, content, pattern = UNREADABLE[case]
    if content == "EMPTY_TABLE":
        content = pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())})
    outcome = load_outcome(write(tmp_path, file_name, content))
    assert outcome[0] == "error", f"loaded: {outcome[1:]}"
    assert re.search(pattern, outcome[1]), outcome[1]


# --------------------------------------------------------------------------- prompts and answers

@pytest.mark.parametrize(
    "prompts",
    [[5, 6.5], [["a"], ["b", "c"]], [{"text": "a"}], [True, False], [""], ["   \n\t"]],
    ids=["numbers", "lists", "dicts", "bools", "empty", "whitespace"],
)
def test_only_non_string_prompts_is_a_data_error_with_counts(prompts, tmp_path):
    path = write(tmp_path, "train.jsonl", jsonl({"problem": p, "answer": "1"} for p in prompts))
    kind, message = load_outcome(path)
    assert kind == "error"
    assert "no usable examples" in message and f"skipped_bad_prompt={len(prompts)}" in message


def test_mixed_prompt_types_are_skipped_and_counted(tmp_path):
    rows = [{"problem": "2+2?", "answer": "4"}, {"problem": 5, "answer": "3"}, {"problem": ["x"], "answer": "1"},
            {"problem": {"t": "y"}, "answer": "1"}, {"problem": None, "answer": "1"}, {"problem": "", "answer": "1"},
            {"problem": "3+3?", "answer": "6"}]
    kind, examples, stats = load_outcome(write(tmp_path, "train.jsonl", jsonl(rows)))
    assert kind == "ok"
    assert [(e.question, e.answer) for e in examples] == [("2+2?", "4"), ("3+3?", "6")]
    assert (stats.rows, stats.kept, stats.skipped_bad_prompt, stats.skipped_no_answer) == (7, 2, 5, 0)


def test_non_string_prompts_in_parquet(tmp_path):
    for name, column in [("lists", pa.array([["a"], ["b"]])), ("ints", pa.array([1, 2])),
                         ("binary", pa.array([b"\x00\xff", b"q"])), ("structs", pa.array([{"x": 1}, {"x": 2}]))]:
        path = write(tmp_path, f"{name}.parquet", pa.table({"problem": column, "answer": ["1", "2"]}))
        kind, message = load_outcome(path)
        assert kind == "error" and "skipped_bad_prompt=2" in message, (name, message)


def test_missing_and_empty_answers_are_counted_skips(tmp_path):
    rows = [{"problem": "a", "answer": None}, {"problem": "b", "answer": ""}, {"problem": "c", "answer": "  \n"},
            {"problem": "d"},  # the key is missing from this row only
            {"problem": "e", "answer": 0},  # falsy but a real answer
            {"problem": "f", "answer": -3.5}, {"problem": "g", "answer": "\\frac{1}{2}"}]
    kind, examples, stats = load_outcome(write(tmp_path, "train.jsonl", jsonl(rows)))
    assert kind == "ok"
    assert [(e.question, e.answer) for e in examples] == [("e", "0"), ("f", "-3.5"), ("g", "\\frac{1}{2}")]
    assert (stats.rows, stats.kept, stats.skipped_no_answer, stats.skipped_bad_prompt) == (7, 3, 4, 0)


def test_missing_answer_column_names_it(tmp_path):
    path = write(tmp_path, "train.jsonl", jsonl([{"problem": "a", "solution": "1"}]))
    kind, message = load_outcome(path)
    assert kind == "error" and "answer_field 'answer' not found" in message and "'solution'" in message


def test_extract_boxed_answer_on_hostile_solutions(tmp_path):
    rows = [{"problem": "a", "answer": "\\boxed{" * 200},  # never closed (see the quadratic test below)
            {"problem": "b", "answer": "{" * 100_000 + "\\boxed{7}"},
            {"problem": "c", "answer": "\\boxed{}"},
            {"problem": "d", "answer": 42}]  # a number has no box
    kind, examples, stats = load_outcome(write(tmp_path, "train.jsonl", jsonl(rows)), extract_boxed_answer=True)
    assert kind == "ok"
    assert [(e.question, e.answer) for e in examples] == [("b", "7")]
    assert stats.skipped_no_answer == 3


def test_extract_boxed_answer_is_linear():
    from rewards.extract import last_boxed  # what the loader uses for extract_boxed_answer

    start = time.perf_counter()
    assert last_boxed("\\boxed{" * 2_500) is None
    assert time.perf_counter() - start < 0.5


def test_nan_answer_is_a_counted_skip(tmp_path):
    path = write(tmp_path, "train.parquet", pa.table({"problem": ["a", "b"], "answer": [1.0, float("nan")]}))
    kind, examples, stats = load_outcome(path)
    assert kind == "ok" and [e.question for e in examples] == ["a"] and stats.skipped_no_answer == 1


def test_mapping_answer_is_a_counted_skip(tmp_path):
    rows = [{"problem": "a", "answer": {"x": 1}}, {"problem": "b", "answer": {"x": 2}}]
    outcome = load_outcome(write(tmp_path, "train.jsonl", jsonl(rows)))
    assert outcome[0] == "error" and "skipped_no_answer=2" in outcome[1]


def test_odd_characters_survive_loading_and_templates(tmp_path):
    questions = ["a\x00b", "\u202eRTL\u202c", "{question} {0} {} }{", "\ufeffBOM", "\U0001f600 emoji", "x" * 50_000]
    path = write(tmp_path, "train.jsonl", jsonl({"problem": q, "answer": "1"} for q in questions))
    examples = load_examples(path)
    assert [e.question for e in examples] == questions
    for template in ["builtin", "compact", "boxed", "plain", "<<{question}>>"]:
        for q in questions:
            assert q in format_prompt(q, template)  # braces in a question are never parsed as fields


# --------------------------------------------------------------------------- long prompts

@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(CHARSET)


def _examples(questions):
    return [Example(f"train-{i}", q, "1") for i, q in enumerate(questions)]


def test_long_prompts_are_dropped_and_counted(tokenizer):
    cfg = DataConfig(template="plain", max_prompt_length=64)
    odd = "\u00e9\x00\U0001f600"  # outside the tiny tokenizer's alphabet
    questions = ["1+1=?", "x" * 64, "y" * 65, "z" * 200_000, odd * 30 + "w" * 65, odd * 30 + "v" * 10, "2+2=?"]
    examples = _examples(questions)
    prompts = build_prompts(examples, cfg, tokenizer)
    kept, kept_prompts, skipped = drop_long_prompts(examples, prompts, tokenizer, cfg.max_prompt_length)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert [e.question for e in kept] == [q for q, n in zip(questions, lengths) if n <= 64]
    assert {"1+1=?", "x" * 64, "2+2=?"} <= {e.question for e in kept}  # exactly 64 tokens is kept
    assert not {"y" * 65, "z" * 200_000, odd * 30 + "w" * 65} & {e.question for e in kept}
    assert kept_prompts == [e.question for e in kept]
    assert skipped == len(questions) - len(kept)


class _CountingTokenizer:
    """The tiny tokenizer, recording the length of every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def get_vocab(self):
        return self.tokenizer.get_vocab()


def test_20mb_prompt_row_is_skipped_and_counted_without_tokenizing(tmp_path, tokenizer, monkeypatch):
    """A 20 MB prompt once went whole through the tokenizer, which can abort the process (exit 134, no
    message); now it is longer than max_prompt_length × max_chars_per_token characters, so it is
    skipped and counted before any tokenizer sees it."""
    import datasets

    from rltk.data.recipe import max_chars_per_token

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # its 20 MB Arrow copy too
    huge = "7" * 20_000_000
    rows = [{"problem": "1+1=?", "answer": "2"}, {"problem": huge, "answer": "3"}, {"problem": "2+2=?", "answer": "4"}]
    path = write(tmp_path, "train.jsonl", jsonl(rows))
    start = time.perf_counter()
    examples = load_examples(path)
    assert len(examples) == 3 and len(examples[1].question) == 20_000_000
    cfg = DataConfig(source=path, template="builtin", max_prompt_length=512)
    prompts = build_prompts(examples, cfg, tokenizer)
    counting = _CountingTokenizer(tokenizer)
    kept, kept_prompts, skipped = drop_long_prompts(examples, prompts, counting, cfg.max_prompt_length)
    assert [e.question for e in kept] == ["1+1=?", "2+2=?"] and skipped == 1
    assert len(counting.lengths) == 2 and max(counting.lengths) <= 512 * max_chars_per_token(tokenizer)
    assert max_chars_per_token(tokenizer) >= 64
    assert time.perf_counter() - start < 60


def test_every_prompt_too_long_is_one_data_error(tokenizer):
    examples = _examples(["q" * 600, "r" * 10_000])
    prompts = [format_prompt(e.question, "builtin") for e in examples]
    with pytest.raises(DataError) as info:
        drop_long_prompts(examples, prompts, tokenizer, 512)
    message = str(info.value)
    assert "\n" not in message and "data.max_prompt_length = 512" in message


def test_template_counts_towards_the_limit(tokenizer):
    examples = _examples(["1+1=?"])
    template = format_prompt("1+1=?", "builtin")
    assert len(template) > len("1+1=?")
    kept, _, skipped = drop_long_prompts(examples, [template], tokenizer, len(template))
    assert len(kept) == 1 and skipped == 0
    with pytest.raises(DataError):
        drop_long_prompts(examples, [template], tokenizer, len(template) - 1)

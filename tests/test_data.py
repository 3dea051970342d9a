"""rltk.data: the built-in synthetic task, prompt templates and dataset loaders."""

import json
import os
import re
import subprocess
import sys

import pytest

from rltk.data import (
    CHARSET,
    LEVELS,
    TEMPLATES,
    DataError,
    Example,
    format_prompt,
    generate_problems,
    load_examples,
    load_examples_with_stats,
    split_of,
)
from rltk.data import synthetic

ALL_LEVEL1 = {f"{a}+{b}=?" for a in range(10, 100) for b in range(10, 100)}


# --- synthetic task -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples():
    return {lv: generate_problems(lv, 300, "train") + generate_problems(lv, 100, "test") for lv in LEVELS}


def test_examples_of_each_level_have_the_documented_shape(samples):
    shapes = {
        1: r"\d\d\+\d\d=\?",
        2: r"\d\d[+-]\d\d=\?",
        3: r"\d{3}[+-]\d{3}=\?|\d\*\d\d=\?|\d\d\*\d=\?",
        4: r"\d+[+-]\d\*\d+=\?|\d\*\d+[+-]\d+=\?|\(\d+[+-]\d+\)\*\d=\?",
        5: r"\dx[+-]\d+=-?\d+\. x=\?",
        6: r"[A-Z][a-z]+ (has|shares) \d+ .*\?",
    }
    for lv, problems in samples.items():
        for p in problems:
            assert p.level == lv
            assert re.fullmatch(shapes[lv], p.question), p
            assert re.fullmatch(r"L%d-[0-9a-f]{10}" % lv, p.id)
            assert p.solution.endswith(f". \\boxed{{{p.answer}}}")
            assert re.fullmatch(r"-?\d+", p.answer)


def _arith(expr: str) -> int:
    assert set(expr) <= set("0123456789+-*/()"), expr
    return eval(expr, {"__builtins__": {}})  # our own generated arithmetic, never model text


def test_answers_are_exact(samples):
    for p in samples[1] + samples[2] + samples[3] + samples[4]:
        assert _arith(p.question[:-2]) == int(p.answer), p
    for p in samples[5]:
        a, op, b, c = re.fullmatch(r"(\d)x([+-])(\d+)=(-?\d+)\. x=\?", p.question).groups()
        x = int(p.answer)
        assert int(a) * x + (int(b) if op == "+" else -int(b)) == int(c), p
    for p in samples[6]:
        work = p.solution.split(".")[0]
        left, right = work.split("=")
        assert _arith(left.replace("/", "//")) == int(right) == int(p.answer), p
        assert all(num in p.question for num in re.findall(r"\d+", left)), p


def test_worked_solutions_match_the_documented_format():
    by_question = {p.question: p for p in generate_problems(1, 7000, "train") + generate_problems(1, 700, "test")}
    assert by_question["37+48=?"].solution == "37+48=85. \\boxed{85}"
    family = {f.name: f for f in LEVELS[4]}["s+f*g"]
    assert family.build(7, 3, 12) == ("7+3*12=?", "3*12=36, 7+36=43", 43)
    family = {f.name: f for f in LEVELS[5]}["ax+b=c"]
    assert family.build(3, 5, 5) == ("3x+5=20. x=?", "3x=20-5=15, x=15/3=5", 5)


def test_charset_covers_problems_and_templates(samples):
    chars = set(CHARSET)
    assert len(chars) == len(CHARSET)
    for problems in samples.values():
        for p in problems:
            assert set(p.question + p.answer + p.solution) <= chars, p
    for template in TEMPLATES.values():
        assert set(template) <= chars
        assert set(format_prompt(samples[6][0].question, template)) <= chars


def test_train_and_test_partition_the_whole_level1_space():
    expected_test = {q for q in ALL_LEVEL1 if split_of(q) == "test"}
    n_test, n_train = len(expected_test), len(ALL_LEVEL1) - len(expected_test)
    assert 600 < n_test < 1000  # ~10 %
    train = {p.question for p in generate_problems(1, n_train, "train")}
    test = {p.question for p in generate_problems(1, n_test, "test")}
    assert test == expected_test
    assert train == ALL_LEVEL1 - expected_test
    with pytest.raises(ValueError, match=f"only {n_test} distinct"):
        generate_problems(1, n_test + 1, "test")


@pytest.mark.parametrize("limit", [100, 10**6])  # level 1 (8100) sampled by rejection / enumerated
def test_both_sampling_paths_cover_the_split_exactly(monkeypatch, limit):
    monkeypatch.setattr(synthetic, "_ENUMERATE_LIMIT", limit)
    expected = {q for q in ALL_LEVEL1 if split_of(q) == "test"}
    problems = generate_problems(1, len(expected), "test", seed=3)
    assert {p.question for p in problems} == expected
    assert len(problems) == len(expected)


def test_splits_are_disjoint_across_levels():
    train = {p.question for p in generate_problems(range(1, 7), 3000, "train")}
    test = {p.question for p in generate_problems(range(1, 7), 1000, "test")}
    assert not train & test
    assert all(split_of(q) == "test" for q in test)


def test_mixed_levels_give_distinct_questions_and_use_every_level():
    problems = generate_problems([1, 2], 14000, "train")  # level 2 repeats level 1's additions
    assert len({p.question for p in problems}) == len({p.id for p in problems}) == 14000
    assert {p.level for p in problems} == {1, 2}
    large = generate_problems(3, 300, "test")  # 3-digit families are sampled, not enumerated
    assert {p.question.count("*") for p in large} == {0, 1}


def test_generation_is_deterministic_and_seeded():
    a = generate_problems((1, 4, 6), 50, "train", seed=1)
    assert a == generate_problems((1, 4, 6), 50, "train", seed=1)
    assert a != generate_problems((1, 4, 6), 50, "train", seed=2)


def test_generation_is_identical_across_processes():
    code = "from rltk.data import generate_problems as g; print(','.join(p.id for p in g((2, 5), 20, 'test', seed=7)))"
    ids = set()
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        ids.add(out.stdout.strip())
    assert ids == {",".join(p.id for p in generate_problems((2, 5), 20, "test", seed=7))}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(levels=7, n=1, split="train"), "levels"),
        (dict(levels=[], n=1, split="train"), "levels"),
        (dict(levels=1, n=1, split="dev"), "split"),
        (dict(levels=1, n=-1, split="train"), "n must be"),
        (dict(levels=1, n=1, split="test", test_percent=0), "only 0 distinct"),
    ],
)
def test_bad_generation_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_problems(**kwargs)


# --- templates ------------------------------------------------------------------------------


def test_builtin_templates():
    assert format_prompt("37+48=?") == "Q: 37+48=?\nAnswer in \\boxed{}.\nA: "
    assert format_prompt("1+1", "boxed") == (
        "1+1\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert format_prompt("1+1", "plain") == "1+1"
    assert format_prompt("1+1", "Solve: {question} in \\boxed{{}}") == "Solve: 1+1 in \\boxed{}"
    assert format_prompt("1+1", "plain", system_prompt="Be brief.") == "Be brief.\n1+1"


def test_unknown_or_malformed_templates_raise():
    with pytest.raises(ValueError, match="'boxed', 'builtin', 'compact', 'plain'"):
        format_prompt("1+1", "nope")
    with pytest.raises(ValueError, match="double literal braces"):
        format_prompt("1+1", "{question} \\boxed{}")


class FakeTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_chat_template_wraps_the_filled_prompt():
    tok = FakeTokenizer()
    assert format_prompt("1+1", "plain", tok, chat_template=True) == "<user>1+1<assistant>"
    assert (
        format_prompt("1+1", "plain", tok, chat_template=True, system_prompt="S")
        == "<system>S<user>1+1<assistant>"
    )
    with pytest.raises(ValueError, match="tokenizer"):
        format_prompt("1+1", chat_template=True)


# --- loaders --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [
    {"problem": "1+1?", "answer": 2, "uid": "a", "solution": "so \\boxed{\\frac{1}{2}} or \\boxed{2}"},
    {"problem": "no answer", "answer": None, "uid": "b", "solution": "nothing boxed"},
    {"problem": "empty answer", "answer": " ", "uid": "c", "solution": "\\boxed{3"},
    {"problem": None, "answer": "4", "uid": "d", "solution": "\\boxed{\\sqrt{4}} then \\boxed{5"},
    {"problem": "2+3?", "answer": "5", "uid": "e", "solution": "\\boxed{5}"},
]


def test_builtin_source_matches_the_generator():
    examples = load_examples("builtin", split="test", levels=(1, 2), num_examples=40, seed=3)
    problems = generate_problems((1, 2), 40, "test", seed=3)
    assert examples == [Example(p.id, p.question, p.answer, p.solution) for p in problems]
    assert len(load_examples("builtin", split="test")) == 500
    assert len(load_examples("builtin")) == 5000
    with pytest.raises(DataError, match="splits"):
        load_examples("builtin", split="validation")
    with pytest.raises(DataError, match="only"):
        load_examples("builtin", split="test", num_examples=10_000)


def test_jsonl_loading_converts_answers_and_counts_skips(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "data.jsonl", ROWS)
    examples, stats = load_examples_with_stats(path, id_field="uid", solution_field="solution")
    assert examples == [
        Example("a", "1+1?", "2", ROWS[0]["solution"]),
        Example("e", "2+3?", "5", "\\boxed{5}"),
    ]
    assert (stats.rows, stats.kept, stats.skipped_no_answer, stats.skipped_bad_prompt) == (5, 2, 2, 1)
    assert "skipped 2 rows without an answer and 1 without a string prompt" in caplog.text
    assert [e.id for e in load_examples(path, split="test")] == ["test-0", "test-4"]
    assert load_examples(path, num_examples=1) == [Example("train-0", "1+1?", "2")]


def test_boxed_answers_are_extracted_from_a_solution_field(tmp_path):
    path = _write_jsonl(tmp_path / "math.jsonl", ROWS)
    examples, stats = load_examples_with_stats(path, answer_field="solution", extract_boxed_answer=True)
    assert [(e.question, e.answer) for e in examples] == [("1+1?", "2"), ("2+3?", "5")]
    assert stats.skipped_no_answer == 2  # "nothing boxed", unbalanced "\boxed{3"


def test_last_boxed_content():
    from rewards.extract import last_boxed as last_boxed_content

    assert last_boxed_content("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed_content("\\boxed{1} no \\boxed{2}") == "2"
    assert last_boxed_content("\\boxed{\\sqrt{4}} then \\boxed{5") == "\\sqrt{4}"
    assert last_boxed_content("\\boxed{}") == ""
    assert last_boxed_content("no box") is None


def test_missing_field_error_names_field_source_and_columns(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(DataError) as info:
        load_examples(path, prompt_field="question")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert "'question'" in message and "data.jsonl" in message
    assert "['problem', 'answer', 'uid', 'solution']" in message
    with pytest.raises(DataError, match="id_field 'idx'"):
        load_examples(path, id_field="idx")


def test_empty_or_missing_sources_raise(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "x", "answer": None}, {"problem": "y", "answer": ""}])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(path)
    with pytest.raises(DataError, match="not found"):
        load_examples(str(tmp_path / "missing.parquet"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no .jsonl"):
        load_examples(str(tmp_path / "empty_dir"))


def test_parquet_file_and_directory_with_splits(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "ds"
    folder.mkdir()
    for split, answers in (("train", [1, 2, 3]), ("test", [7])):
        table = pa.table({"question": [f"q{a}" for a in answers], "answer": answers})
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    train = load_examples(str(folder), prompt_field="question")
    assert [(e.question, e.answer) for e in train] == [("q1", "1"), ("q2", "2"), ("q3", "3")]
    test = load_examples(str(folder), split="test", prompt_field="question")
    assert [(e.id, e.question, e.answer) for e in test] == [("test-0", "q7", "7")]
    single = load_examples(str(folder / "test-00000-of-00001.parquet"), prompt_field="question")
    assert single[0].answer == "7"

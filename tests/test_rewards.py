"""Tests for rewards/: answer extraction, the math grader (table of hand-labelled cases), the
verifier pool's deadline and worker replacement, equivalence classes, format reward, registry."""

from __future__ import annotations

import builtins
import multiprocessing
import os
import signal
import time

import pytest

import rewards.math
from rewards import (
    REWARD_FUNCTIONS,
    VERIFIER_VERSION,
    MathVerifier,
    VerifierPool,
    clean_answer,
    format_reward,
    get_reward_function,
    last_boxed,
    math_reward,
    normalize_answer,
)
from rewards.extract import completion_text, refusal
from rewards.pool import check_pair

DEADLINE_S = 2.0
NUM_WORKERS = 2
BOMB = r"9^{9^{9^{9}}}"  # big-integer work math-verify's own timeout cannot interrupt
MB_PROSE = "The reasoning goes on. " * 45_000  # ~1 MB


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(deadline_s=DEADLINE_S, num_workers=NUM_WORKERS) as v:
        v.score([r"\boxed{2}"], ["x"])  # waits until the workers are warm
        yield v


def _workers() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.name == "rltk-verifier"}


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\boxed{a_{1}^{2}}", "a_{1}^{2}"),
        (r"\boxed {7}", "7"),
        (r"\fbox{7}", "7"),
        (r"\boxed{1} or \boxed{2}", "2"),
        (r"\boxed{1} and then \boxed{2", "1"),  # the last *balanced* box
        (r"\boxed{\boxed{3}}", r"\boxed{3}"),  # the outermost box: refused later, never the inner 3
        (r"\boxed{\boxed{7}8}", r"\boxed{7}8"),
        (r"\boxed{1} then \boxed{\boxed{2}}", r"\boxed{2}"),
        (r"\boxed{\boxed{2}} then \boxed{3}", "3"),
        (r"\boxed{\boxed{3}", "3"),  # the outer box never closes: the balanced one counts
        (r"\boxed{a}}", "a"),
        (r"\boxed{}", ""),
        (r"\boxed{3", None),
        (r"\boxedx{3}", None),
        ("no box here", None),
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (MB_PROSE + r"\boxed{5}", "5"),
        ("{" * 1_000_000 + r"\boxed{5}", "5"),
        (r"\boxed{" * 150_000, None),
        ((r"\boxed{1}" + "x" * 90) * 10_000, "1"),
    ],
    ids=["prose", "open-braces", "open-boxes", "many-boxes"],
)
def test_last_boxed_is_linear_on_1mb(text, expected):
    start = time.perf_counter()
    assert last_boxed(text) == expected
    normalize_answer(text)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "a, b",
    [
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\left( 1, 2 \right]", "(1,2]"),
        ("$3$.", "3"),
        (r"\$5", "5"),
        ("1,000", "1000"),
        ("1{,}000", "1000"),
        (r"10,\!080", "10080"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
        (r"1\,000", "1000"),
        ("-12,345.5", "-12345.5"),
        (r"10\%", "10"),
        (r"90^\circ", "90"),
        (r"5 \text{ cm}", "5"),
        (r"x \in [1, 2]", r"x\in[1,2]"),
        ("\u22123", "-3"),
        ("1e3", "1000"),
        ("1E3", "1000"),
        ("2.5e-3", "0.0025"),
        ("6.02e+23", "602000000000000000000000"),
        ("(1e3, 2e3)", "(1000,2000)"),
        (r"0.\overline{3}", r"\frac{1}{3}"),
        (r"0.1\overline{6}", r"\frac{1}{6}"),
        (r"1.\bar{3}", r"\frac{4}{3}"),
        (r"0.\dot{3}", r"\frac{1}{3}"),
        (r"0.\overline 3", r"\frac{1}{3}"),
        (r"-0.\overline{142857}", r"-\frac{1}{7}"),
        (r"0.\overline{9}", "1"),
    ],
)
def test_normalize_answer_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize(
    "a, b",
    [
        ("1 2", "12"),  # math-verify reads `1 2` as 3
        (r"\pi r", r"\pir"),
        ("1,5", "15"),
        ("1,0000", "10000"),
        ("0,100", "100"),
        ("(1,000)", "1000"),
        (r"\rightarrow", "arrow"),
        ("-12", "12"),
        ("[1,2]", "(1,2)"),
        ("3.5", "35"),
        (r"2\mathrm{e}", "2"),  # \mathrm is not taken for a unit
        ("2e - 3", "0.002"),  # with spaces, Euler's number: 2e - 3
        ("1e3x", "1000x"),  # glued to a letter: not a number in scientific notation
        ("x^2e3", "x^2000"),
        (r"\overline{12}", "12"),  # no decimal point: not a repeating decimal
    ],
)
def test_normalize_answer_conservative(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_clean_answer_keeps_percent_for_math_verify():
    assert clean_answer(r"50\%") == r"50\%"  # math-verify accepts 50% for both 50 and 0.5


@pytest.mark.parametrize(
    "answer, reason",
    [
        (r"\boxed{7}8", "nested box"),
        (r"\fbox{7}", "nested box"),
        (r"1+1 \approx 4", "approximation"),
        ("x \u2248 3", "approximation"),
        ("1e999", "number out of range"),
        ("9" * 60 + "e3", "number out of range"),
        (r"0.\dot{1}\dot{2}", "repeating decimal"),
        (r"0.\overline{" + "3" * 101 + "}", "repeating decimal"),
        ("1e100", None),
        (r"\overline{AB}", None),
        ("2e-3", None),
        (r"\frac{1}{2}", None),
        ("x = 4", None),  # equations are judged on the parse, in the workers
    ],
)
def test_refusal(answer, reason):
    assert refusal(clean_answer(answer)) == reason


def test_clean_answer_folds_unicode():
    assert clean_answer("\u202e5\u202c") == clean_answer("\u200b5\u00ad") == "5"
    assert clean_answer("\uff15\u0665\u0e53") == "553"  # fullwidth, Arabic-Indic, Thai
    assert clean_answer("\\frac{\uff11}{\uff12}") == "\\frac{1}{2}"
    assert clean_answer("x\u00b2+\u00bd") == "x\u00b2+\u00bd"  # superscripts and fractions keep their meaning
    assert clean_answer("\ud800") == ""  # a lone surrogate is dropped, like format characters
    assert clean_answer("5\x00\x1b\x7f\x9b") == "5"  # control characters are dropped
    assert clean_answer("1\t+\n2") == "1+2"
    assert clean_answer("5\u0301") == "5\u0301"  # a combining mark changes the character: kept
    every = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000)
    clean_answer(every)
    from rewards.extract import _FOLD
    assert len(_FOLD) <= _FOLD.LIMIT


# --------------------------------------------------------------------------- grader table

# (gold, completion, expected correct, expected reason), hand-labelled.
GRADER_CASES = [
    # equivalent forms
    ("5", r"The answer is \boxed{5}.", True, "ok"),
    (r"\frac{1}{2}", r"\boxed{0.5}", True, "ok"),
    ("0.5", r"\boxed{\frac{1}{2}}", True, "ok"),
    (r"\frac{1}{2}", r"\boxed{1/2}", True, "ok"),
    (r"\frac{1}{2}", r"\boxed{\frac12}", True, "ok"),  # valid TeX: accepted (strict=False)
    (r"\frac{1}{2}", r"\boxed{\dfrac{1}{2}}", True, "ok"),
    (r"\frac{3}{4}", r"\boxed{0.75}", True, "ok"),
    ("0.75", r"\boxed{75\%}", True, "ok"),
    (r"50\%", r"\boxed{50}", True, "ok"),
    ("5", r"\boxed{5 \text{ cm}}", True, "ok"),
    ("5", r"\boxed{5\,\text{cm}}", True, "ok"),
    ("10", r"\boxed{10^{\circ}}", True, "ok"),
    ("x + 1", r"\boxed{1+x}", True, "ok"),
    ("x=3", r"\boxed{3}", True, "ok"),
    (r"\{1,2\}", r"\boxed{2, 1}", True, "ok"),
    ("1,2", r"\boxed{\{2,1\}}", True, "ok"),
    ("[1,2]", r"\boxed{[1, 2]}", True, "ok"),
    (r"(-\infty, 2]", r"\boxed{(-\infty,2]}", True, "ok"),
    ("-3", r"\boxed{-3}", True, "ok"),
    ("-3", "\\boxed{\u22123}", True, "ok"),
    ("4", r"\boxed{\sqrt{16}}", True, "ok"),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}", True, "ok"),
    (r"\pi", r"$\boxed{\pi}$", True, "ok"),
    (r"\text{(B)}", r"\boxed{B}", True, "ok"),
    ("3", r"\boxed{3.}", True, "ok"),
    ("2", r"\boxed {2}", True, "ok"),
    ("7", r"\fbox{7}", True, "ok"),
    (r"We find $x = 4$, so \boxed{4}.", r"\boxed{4}", True, "ok"),  # gold solution: its box
    # a matrix row break followed by a space is not a spacing command (`\\ ` kept as `\\`)
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", True, "ok"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix} 2 \\ 1 \end{pmatrix}}", False, "ok"),
    # thousands separators
    ("1000", r"\boxed{1,000}", True, "ok"),
    ("1000", r"\boxed{1\,000}", True, "ok"),
    ("10080", r"\boxed{10,\!080}", True, "ok"),
    ("1000000", r"\boxed{1{,}000{,}000}", True, "ok"),
    ("1000", r"\boxed{1,0000}", False, "ok"),  # not groups of three: a set {1, 0}
    ("15", r"\boxed{1,5}", False, "ok"),
    # near misses
    (r"\frac{1}{3}", r"\boxed{0.33}", False, "ok"),
    ("12", r"\boxed{-12}", False, "ok"),
    ("[1,2]", r"\boxed{(1,2)}", False, "ok"),
    ("12", r"\boxed{1 2}", False, "ok"),
    (r"\frac{1}{2}", r"\boxed{2}", False, "ok"),
    ("x+1", r"\boxed{x-1}", False, "ok"),
    # several boxes: the last balanced one counts
    ("2", r"\boxed{1} no wait, \boxed{2}", True, "ok"),
    ("1", r"\boxed{1} no wait, \boxed{2}", False, "ok"),
    ("5", r"\boxed{5} and then \boxed{6", True, "ok"),
    # malformed
    ("5", "The answer is 5.", False, "no_answer"),
    ("5", r"\boxed{5", False, "no_answer"),
    ("5", "", False, "no_answer"),
    ("5", r"\boxed{}", False, "no_answer"),
    ("5", r"\boxed{ $ }", False, "no_answer"),
    ("5", MB_PROSE + r"\boxed{5}", True, "ok"),
    ("5", MB_PROSE, False, "no_answer"),
    # unicode: invisible format characters, fullwidth forms and non-ASCII digits are folded
    ("5", "\u202e\\boxed{\u202e5\u202c}\u202c", True, "ok"),
    ("5", "\\boxed{\u200b5\ufeff}", True, "ok"),
    ("55", "\\boxed{\uff15\u0665}", True, "ok"),
    (r"\frac{1}{2}", "\\boxed{\uff11\uff0f\u0968}", True, "ok"),  # fullwidth 1 and slash, Devanagari 2
    ("-3", "\\boxed{\uff0d\uff13}", True, "ok"),
    ("2", "\\boxed{x\u00b2}", False, "parse_error"),  # a superscript is not folded into a digit
    ("5", "\\boxed{5\x00}", True, "ok"),  # control characters and lone surrogates are dropped
    ("5", "\\boxed{5\ud800}", True, "ok"),
    ("5", "\\boxed{5\u0301}", False, "parse_error"),  # a combining mark: no partial read of the 5
    # equations: only `variable = value` counts against a gold that is not an equation
    ("4", r"\boxed{1+1 = 4}", False, "parse_error"),  # a false equation: never its right side
    ("2", r"\boxed{1+1 = 4}", False, "parse_error"),
    ("4", r"\boxed{x = 4}", True, "ok"),
    ("4", r"\boxed{x_{1} = 4}", True, "ok"),
    ("4", r"\boxed{\alpha = 2+2}", True, "ok"),
    ("5", r"\boxed{x = 4}", False, "ok"),
    ("4", r"\boxed{4 = 4}", False, "parse_error"),  # true, but no variable: not an answer form
    ("4", r"\boxed{2x = 4}", False, "parse_error"),
    ("4", r"\boxed{4 = x}", False, "parse_error"),
    ("4", r"\boxed{\pi = 4}", False, "parse_error"),  # a constant, not a variable
    ("4", r"\boxed{x = 1+1 = 4}", False, "parse_error"),  # chains: math-verify keeps only the ends
    ("4", r"\boxed{x = x + 4 - x}", False, "parse_error"),  # the variable on both sides
    ("4", r"\boxed{(1+1=4)}", False, "parse_error"),
    ("4", r"\boxed{1+1 \equiv 4}", False, "parse_error"),
    ("(1,2)", r"\boxed{(x, y) = (1, 2)}", True, "ok"),
    ("2x+1", r"\boxed{f(x) = 2x + 1}", True, "ok"),  # an unknown function names a value too
    ("5", r"\boxed{f(2) = 5}", True, "ok"),
    ("4", r"\boxed{f(2) = f(2) + 4}", False, "parse_error"),
    ("4", r"\boxed{\sin x = 4}", False, "parse_error"),
    (r"\{-2,2\}", r"\boxed{x = \pm 2}", True, "ok"),
    ("x=4", r"\boxed{x = 4}", True, "ok"),  # a gold equation: compared as equations
    ("x=4", r"\boxed{4}", True, "ok"),
    ("x=4", r"\boxed{y = 4}", False, "ok"),
    ("x=4", r"\boxed{1+1 = 4}", False, "ok"),
    ("y=2x+1", r"\boxed{2x + 1 = y}", True, "ok"),
    # partial reads: the whole answer must parse
    ("4", r"\boxed{1+1 \to 4}", False, "parse_error"),
    ("4", r"\boxed{1+1 \approx 4}", False, "parse_error"),
    ("2", r"\boxed{1+1 \approx 4}", False, "parse_error"),
    ("2", r"\boxed{2**10}", False, "parse_error"),
    # nested boxes: a parse_error, never the inner box
    ("7", r"\boxed{\boxed{7}8}", False, "parse_error"),
    ("78", r"\boxed{\boxed{7}8}", False, "parse_error"),
    ("7", r"\boxed{\boxed{7}}", False, "parse_error"),
    ("3", r"\boxed{\boxed{2}} then \boxed{3}", True, "ok"),
    # a bare comma list is a set: never a tuple or an interval, either way round
    ("(2,3)", r"\boxed{2,3}", False, "ok"),
    ("2,3", r"\boxed{(2,3)}", False, "ok"),
    ("(2,3)", r"\boxed{\{2,3\}}", False, "ok"),
    ("(1,2,3)", r"\boxed{1,2,3}", False, "ok"),
    ("1,2,3", r"\boxed{(1,2,3)}", False, "ok"),
    ("2,3", r"\boxed{3, 2}", True, "ok"),
    ("(2,3)", r"\boxed{(2, 3)}", True, "ok"),
    ("(2,3)", r"\boxed{x = 2, 3}", False, "ok"),  # the value of an assignment is a set too
    ("2,3", r"\boxed{x = 2, 3}", True, "ok"),
    # scientific notation and repeating decimals
    ("1000", r"\boxed{1e3}", True, "ok"),
    ("1e3", r"\boxed{1000}", True, "ok"),
    ("0.0025", r"\boxed{2.5E-3}", True, "ok"),
    ("1000", r"\boxed{1e4}", False, "ok"),
    ("1000", r"\boxed{1e999}", False, "parse_error"),  # out of range: refused, not misread
    (r"\frac{1}{3}", r"\boxed{0.\overline{3}}", True, "ok"),
    (r"0.\overline{3}", r"\boxed{\frac{1}{3}}", True, "ok"),
    (r"\frac{1}{6}", r"\boxed{0.1\overline{6}}", True, "ok"),
    ("0", r"\boxed{0.\overline{3}}", False, "ok"),  # math-verify alone reads it as 0
    ("1", r"\boxed{0.\overline{9}}", True, "ok"),
    ("0", r"\boxed{0.\dot{1}\dot{2}}", False, "parse_error"),
    # hostile
    ("1", rf"\boxed{{{BOMB}}}", False, "timeout"),
]


def test_grader_table(verifier):
    # the bomb goes first, so its deadline runs while the other worker scores the rest
    order = sorted(range(len(GRADER_CASES)), key=lambda i: GRADER_CASES[i][3] != "timeout")
    golds = [GRADER_CASES[i][0] for i in order]
    completions = [GRADER_CASES[i][1] for i in order]
    start = time.perf_counter()
    scored = verifier.score(completions, golds)
    elapsed = time.perf_counter() - start
    verdicts = [None] * len(GRADER_CASES)
    for i, verdict in zip(order, scored):
        verdicts[i] = verdict
    golds = [gold for gold, _, _, _ in GRADER_CASES]
    completions = [completion for _, completion, _, _ in GRADER_CASES]
    got = [(v.correct, v.reason) for v in verdicts]
    expected = [(correct, reason) for _, _, correct, reason in GRADER_CASES]
    cases = zip(golds, completions, expected, got)
    mismatches = [(g, c[:60], e, o) for g, c, e, o in cases if e != o]
    assert not mismatches
    assert [v.reward for v in verdicts] == [1.0 if correct else 0.0 for correct, _ in expected]
    # the bomb is cut at the deadline while the rest goes on, on the other worker: the rows cost
    # about 20 ms each on an idle core (up to 0.3 s for some), twice that at load average 6
    assert elapsed < DEADLINE_S + 1.0 + 0.04 * len(GRADER_CASES)


def test_grader_table_is_large_enough():
    assert len(GRADER_CASES) >= 100


def test_strict_rejects_frac12():
    assert check_pair(r"\frac{1}{2}", r"\frac12", strict=True) == (False, "parse_error")
    assert check_pair(r"\frac{1}{2}", r"\frac12", strict=False) == (True, "ok")


def test_verdict_keeps_extracted_answer(verifier):
    (verdict,) = verifier.score([r"so \boxed{\frac{2}{4}}."], ["0.5"])
    assert (verdict.reward, verdict.correct, verdict.reason) == (1.0, True, "ok")
    assert verdict.extracted == r"\frac{2}{4}"


def test_score_rejects_length_mismatch(verifier):
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        verifier.score(["a", "b"], ["1"])


def test_equivalence_keeps_the_rules(verifier):
    answers = ["4", "x = 4", "1+1 = 4", r"\boxed{4}", "2,3", "(2,3)", "1e3", "1000", r"0.\overline{3}", "1/3"]
    assert verifier.equivalence_classes(answers) == [0, 0, 1, 2, 3, 4, 5, 5, 6, 6]


def test_verifier_version():
    assert VERIFIER_VERSION.startswith("rltk-math/2 math-verify==")


# --------------------------------------------------------------------------- hostile input

INJECTIONS = [
    "__import__('os').system('touch MARKER_PATH')",
    "eval(\"open('MARKER_PATH', 'w')\")",
    "exec('import os; os.system(\"touch MARKER_PATH\")')",
    "open('MARKER_PATH', 'w').write('x')",
    "(lambda: __import__('os').system('touch MARKER_PATH'))()",
    r"\text{__import__('os').system('touch MARKER_PATH')}",
    "__import__('subprocess').run(['touch', 'MARKER_PATH'])",
]


def test_code_injection_never_runs(verifier, tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    answers = ["\\boxed{" + text.replace("MARKER_PATH", str(marker)) + "}" for text in INJECTIONS]

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called in the parent")

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "eval", forbidden)
        patch.setattr(builtins, "exec", forbidden)
        verdicts = verifier.score(answers, ["5"] * len(answers))
        classes = verifier.equivalence_classes([last_boxed(a) for a in answers])
    assert not any(v.correct for v in verdicts)
    assert {v.reason for v in verdicts} <= {"ok", "parse_error"}
    assert len(classes) == len(answers)
    assert not marker.exists()


# --------------------------------------------------------------------------- pool


def test_timed_out_worker_is_replaced(verifier):
    pool = verifier.pool
    before = _workers()
    start = time.perf_counter()
    bomb = ("7", BOMB)  # not the grader table's pair, which is cached by now
    normal = [(str(i), rf"\frac{{{2 * i}}}{{2}}") for i in range(400)]
    assert pool.verify([bomb, *normal]) == [(False, "timeout")] + [(True, "ok")] * 400
    # the 400 go on the other worker meanwhile (~5 ms each on one core)
    assert time.perf_counter() - start < DEADLINE_S + 2.0
    after = _workers()
    assert len(before - after) == 1 and len(after - before) == 1  # one killed, one new
    assert pool.num_alive == NUM_WORKERS
    batch = [(str(i), f"{2 * i}/2") for i in range(20)]  # the replacement warms up
    assert pool.verify(batch) == [(True, "ok")] * 20
    # verdicts are cached: the bomb is not run again
    start = time.perf_counter()
    assert pool.verify([bomb]) == [(False, "timeout")]
    assert time.perf_counter() - start < 0.5


def test_dead_idle_worker_is_replaced(verifier):
    pool = verifier.pool
    victim = min(_workers())
    os.kill(victim, signal.SIGKILL)
    while victim in _workers():
        time.sleep(0.01)
    batch = [(str(i), f"{3 * i}/3") for i in range(100, 120)]
    assert pool.verify(batch) == [(True, "ok")] * 20
    assert pool.num_alive == NUM_WORKERS


def test_single_worker_pool_lifecycle():
    pool = VerifierPool(num_workers=1, deadline_s=DEADLINE_S)
    assert pool.num_alive == 0
    assert pool.verify([]) == []
    assert pool.num_alive == 0  # started lazily, by the first real item
    with pool:
        assert pool.num_alive == 1
        # the second item can only be scored by the replacement of the killed worker
        expected = [(False, "timeout"), (True, "ok")]
        assert pool.verify([("8", BOMB), (r"\frac{1}{2}", "0.5")]) == expected
        assert pool.num_alive == 1
    assert pool.num_alive == 0


def test_pool_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_workers"):
        VerifierPool(num_workers=0)
    with pytest.raises(ValueError, match="deadline_s"):
        VerifierPool(deadline_s=0)


# --------------------------------------------------------------------------- maj@k classes


def test_equivalence_classes(verifier):
    answers = ["1/2", "0.5", r"\frac{1}{2}", "2", None, "", "x", "1,000", "1000", r"\dfrac12"]
    assert verifier.equivalence_classes(answers) == [0, 0, 0, 1, None, None, 2, 3, 3, 0]


def test_equivalence_classes_empty(verifier):
    assert verifier.equivalence_classes([]) == []
    assert verifier.equivalence_classes([None]) == [None]


# --------------------------------------------------------------------------- TRL reward functions


def test_math_reward_trl_signature(verifier, monkeypatch):
    monkeypatch.setattr(rewards.math, "_default_verifier", verifier)
    completions = [
        r"\boxed{4}",
        [{"role": "assistant", "content": r"so \boxed{5}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{4}"}]}],
        r"\boxed{4}",
        "no answer",
    ]
    answers = ["4", "4", "4", None, "4"]
    assert math_reward(completions, answer=answers, prompts=["q"] * 5) == [1.0, 0.0, 1.0, None, 0.0]


CONVERSATIONS = [
    # (completion, its text)
    ([{"role": "assistant", "content": r"so \boxed{4}"}], r"so \boxed{4}"),
    ([{"role": "assistant", "content": r"\boxed{4}"}, {"role": "tool", "content": r"\boxed{5}"}], r"\boxed{4}"),
    ([{"role": "assistant", "content": r"\boxed{5}"}, {"role": "assistant", "content": r"\boxed{4}"}], r"\boxed{4}"),
    ([{"content": r"\boxed{4}"}], r"\boxed{4}"),  # no role: taken for the model's
    ([{"role": "user", "content": r"\boxed{4}"}], ""),  # no assistant message
    ([{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{"}, "4", {"text": b"}"}]}], r"\boxed{4}"),
    ([{"role": "assistant", "content": None}], ""),
    ([{"role": "assistant", "content": b"\\boxed{4}"}], r"\boxed{4}"),
    ({"role": "assistant", "content": r"\boxed{4}"}, r"\boxed{4}"),
    (b"\\boxed{4}", r"\boxed{4}"),
    (bytearray(b"\\boxed{4}"), r"\boxed{4}"),
    (b"\xff\xfe\\boxed{4}\x80", "\ufffd\ufffd\\boxed{4}\ufffd"),  # bad UTF-8 replaced
    ([], ""),
    (["\\boxed{4}"], ""),  # not messages
    ([None, 3], ""),
    (None, ""),
    (4, ""),
    (4.0, ""),
]


@pytest.mark.parametrize("completion, text", CONVERSATIONS)
def test_completion_text_never_raises(completion, text):
    assert completion_text(completion) == text


def test_math_reward_hostile_completion_types(verifier, monkeypatch):
    """Conversational completions and bytes are read; other types score 0 (no_answer); none
    raises."""
    monkeypatch.setattr(rewards.math, "_default_verifier", verifier)
    completions = [completion for completion, _ in CONVERSATIONS]
    expected = [1.0 if r"\boxed{4}" in text else 0.0 for _, text in CONVERSATIONS]
    assert math_reward(completions, answer=["4"] * len(completions)) == expected
    verdicts = verifier.score(completions, [b"4"] * len(completions))  # a bytes gold is decoded too
    assert [v.reward for v in verdicts] == expected
    assert {v.reason for v in verdicts} == {"ok", "no_answer"}
    assert format_reward(completions) == [
        1.0 if text == r"\boxed{4}" or text == r"so \boxed{4}" else 0.0 for _, text in CONVERSATIONS
    ]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"The answer is \boxed{5}", 1.0),
        (r"The answer is $\boxed{5}$.", 1.0),
        ("so\n\\[\\boxed{5}\\]\n", 1.0),
        (r"**\boxed{5}**", 1.0),
        ([{"role": "assistant", "content": r"\boxed{5}."}], 1.0),
        (r"\boxed{5} is the answer", 0.0),
        (r"\boxed{4} or \boxed{5}", 0.0),
        (r"\boxed{\boxed{5}}", 0.0),
        (r"\boxed{5", 0.0),
        ("5", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]


# --------------------------------------------------------------------------- registry


def test_registry_names():
    assert get_reward_function("math") is math_reward
    assert get_reward_function("format") is format_reward
    assert set(REWARD_FUNCTIONS) == {"math", "format", "overlong"}
    from rewards.length import overlong_reward

    assert get_reward_function("overlong") is overlong_reward


def test_registry_import_path():
    assert get_reward_function("rewards.format:format_reward") is format_reward


@pytest.mark.parametrize(
    "name", ["nope", "no_such_module_xyz:fn", "rewards.format:nope", "rewards:__doc__"]
)
def test_registry_unknown(name):
    with pytest.raises(ValueError) as err:
        get_reward_function(name)
    message = str(err.value)
    assert "\n" not in message and name in message
    if ":" not in name:
        assert "math, format" in message

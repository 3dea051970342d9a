"""Hostile completions (issue 8, items 1 and 8): property-based fuzzing of the math verifier plus
a hand-made corpus of the worst inputs we know of, and of answers that once got the wrong verdict
(false boxed equations, nested boxes, partial reads, sets against tuples, completions that are
bytes or chat message lists).

Every item must get a verdict with a reason in ``rewards.pool.REASONS``; no file may be created and
no command run (a marker file that every injection payload tries to create, and a check that the
working directory of the verifier workers stays empty); each batch must finish within the time its
timeouts explain; and afterwards the pool must have its full number of live workers and still score
a normal batch correctly.

Time bounds. The pool runs ``W`` workers in parallel and hands the next item to whichever worker
is free. An item that overruns the deadline ``D`` holds its worker for ``D``; the worker is then
killed (SIGKILL) and its slot stays empty while a fresh worker warms up (``S`` seconds, measured
when the fixture starts the pool). Ordinary items are not free either: math-verify may spend up to
the deadline on an expression it can read (random ``\\sin``/``\\log`` towers take 0.1-0.7 s). So a
fixed bound such as "timeouts x D + margin" is either loose or flaky; instead :class:`PoolClock`
times every item on the pool (the dispatch and receive of the pool, observed from this test) and
each batch must satisfy

- per item: every answered item took at most ``D + SLACK_S``, every killed one was killed within
  ``D + SLACK_S`` of its start: *every item is scored within its deadline*;
- per batch: ``elapsed <= (busy + R * S) / W + (D + S) + MARGIN_S + PER_ITEM_S * n``, where
  ``busy`` is the summed time items held workers and ``R`` the workers replaced (timeouts and
  crashes): the pool keeps every slot busy while there is work (list-scheduling bound: total work
  over the slots, plus the longest single item), so one stuck item never stalls the batch. With
  ordinary items taking milliseconds this is ``~ceil(timeouts / W) * (D + S) + D + S + margin``.

Hypothesis runs derandomised with no example database (nothing written, the same examples in every
CI run). ``RLTK_FUZZ_SCALE=10`` multiplies the number of examples and draws fresh random ones.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import rewards.math
from rewards import REASONS, MathVerifier, format_reward, last_boxed, math_reward

DEADLINE_S = 2.0
NUM_WORKERS = 2
MARGIN_S = 3.0
SLACK_S = 1.0  # the pool notices an overrun on its next poll; a loaded 2-core CI machine adds delay
PER_ITEM_S = 0.02
BATCH = 100  # completions per score call (hypothesis caps the choices one example may draw)
SCALE = max(1, int(os.environ.get("RLTK_FUZZ_SCALE", "1")))

FUZZ = settings(
    max_examples=1,  # overridden per test
    deadline=None,
    database=None,  # no .hypothesis/ directory in the working directory
    derandomize=SCALE == 1,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing batch names its bad items
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

STATS = {"items": 0, "batches": 0, "timeouts": 0, "replaced": 0, "seconds": 0.0, "busy": 0.0, "pool_items": 0,
         "reasons": dict.fromkeys(REASONS, 0), "worst_batch_s": 0.0, "slowest_answer_s": 0.0}
FUZZ_TESTS_RUN: set[str] = set()


# --------------------------------------------------------------------------- fixtures


class PoolClock:
    """Times every item on a :class:`rewards.pool.VerifierPool` from outside: wraps the pool's
    ``_receive`` (an answer or a death) and ``_replace`` (a kill or a respawn). The pool stamps
    ``worker.deadline = start + deadline_s`` when it hands an item out, which gives the start."""

    def __init__(self, pool):
        for name in ("_receive", "_replace", "_workers", "deadline_s"):
            assert hasattr(pool, name), f"VerifierPool has no {name}: update PoolClock to the pool's internals"
        self.pool = pool
        self.answered: list[float] = []  # seconds each answered (or crashed) item held its worker
        self.killed: list[float] = []  # seconds from start to kill of each overrunning item
        self.replaced = 0  # workers killed or found dead, hence respawned
        receive, replace = pool._receive, pool._replace

        def _receive(slot):
            worker = pool._workers[slot]
            started = worker.deadline - pool.deadline_s if worker.ready and worker.job is not None else None
            finished = receive(slot)
            if finished and started is not None:
                self.answered.append(time.monotonic() - started)
            return finished

        def _replace(slot, kill):
            worker = pool._workers[slot]
            if worker.job is not None:
                self.killed.append(time.monotonic() - (worker.deadline - pool.deadline_s))
            self.replaced += 1
            return replace(slot, kill)

        pool._receive, pool._replace = _receive, _replace

    def mark(self) -> tuple[int, int, int]:
        return len(self.answered), len(self.killed), self.replaced

    def since(self, mark) -> tuple[list[float], list[float], int]:
        a, k, r = mark
        return self.answered[a:], self.killed[k:], self.replaced - r


class Harness:
    def __init__(self, verifier: MathVerifier, cwd: Path, warmup_s: float):
        self.verifier = verifier
        self.cwd = cwd
        self.marker = cwd / "MARKER"
        self.warmup_s = warmup_s
        self.clock = PoolClock(verifier.pool)

    def score_and_check(self, completions: list[str], golds: list[str]) -> list:
        """Score one batch and check every property of the module docstring."""
        mark = self.clock.mark()
        start = time.perf_counter()
        verdicts = self.verifier.score(completions, golds)
        elapsed = time.perf_counter() - start
        answered, killed, replaced = self.clock.since(mark)
        assert len(verdicts) == len(completions)
        bad = [(c[:80], v) for c, v in zip(completions, verdicts) if v.reason not in REASONS]
        assert not bad, bad
        bad = [(c[:80], v) for c, v in zip(completions, verdicts)
               if v.reward != (1.0 if v.correct else 0.0) or (v.correct and v.reason != "ok")]
        assert not bad, bad
        timeouts = sum(v.reason == "timeout" for v in verdicts)
        assert len(killed) == timeouts and replaced >= timeouts
        longest = max(answered + killed, default=0.0)
        assert longest <= DEADLINE_S + SLACK_S, f"an item held a worker for {longest:.2f}s"
        busy = sum(answered) + sum(killed)
        slot_s = DEADLINE_S + self.warmup_s
        bound = (busy + replaced * self.warmup_s) / NUM_WORKERS + slot_s + MARGIN_S + PER_ITEM_S * len(completions)
        assert elapsed <= bound, (f"{elapsed:.1f}s > {bound:.1f}s for {len(completions)} items: "
                                  f"{busy:.1f}s busy, {replaced} workers replaced")
        assert set(format_reward(completions)) <= {0.0, 1.0}  # the other built-in reward, in this process
        assert not self.marker.exists(), "an injection payload ran"
        assert sorted(p.name for p in self.cwd.iterdir()) == [], "a file appeared in the workers' cwd"
        STATS["items"] += len(completions)
        STATS["batches"] += 1
        STATS["timeouts"] += timeouts
        STATS["replaced"] += replaced
        STATS["seconds"] += elapsed
        STATS["busy"] += busy
        STATS["pool_items"] += len(answered) + len(killed)
        STATS["worst_batch_s"] = max(STATS["worst_batch_s"], elapsed)
        STATS["slowest_answer_s"] = max(STATS["slowest_answer_s"], max(answered, default=0.0))
        for v in verdicts:
            STATS["reasons"][v.reason] += 1
        return verdicts


def _verifier_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.name == "rltk-verifier"}


NORMAL = [(rf"so \boxed{{\frac{{{3 * i}}}{{3}}}}", str(i)) for i in range(1000, 1200)]  # math-verify decides


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A verifier (deadline 2 s, 2 workers) whose workers run in an empty directory."""
    cwd = tmp_path_factory.mktemp("hostile-cwd")
    old_cwd = os.getcwd()
    os.chdir(cwd)  # workers (and their replacements) inherit it: a relative 'touch MARKER' lands here
    try:
        with MathVerifier(deadline_s=DEADLINE_S, num_workers=NUM_WORKERS, cache_size=0) as verifier:
            start = time.perf_counter()
            verifier.score([r"\boxed{2}"] * NUM_WORKERS, ["x", "y"])  # waits until the workers are warm
            warmup_s = max(1.0, 1.5 * (time.perf_counter() - start))
            h = Harness(verifier, cwd, warmup_s)
            start = time.perf_counter()
            assert [v.correct for v in verifier.score(*zip(*NORMAL))] == [True] * len(NORMAL)
            h.normal_batch_s = time.perf_counter() - start
            yield h
    finally:
        os.chdir(old_cwd)


# --------------------------------------------------------------------------- strategies

MARKER_CMDS = ["touch MARKER", "touch {abs}", "echo pwned > MARKER"]
PAYLOADS = [
    "__import__('os').system('{cmd}')",
    "__import__(\"os\").system(\"{cmd}\")",
    "eval(\"__import__('os').system('{cmd}')\")",
    "exec('import os; os.system(\"{cmd}\")')",
    "exec(compile('import os\\nos.system(\"{cmd}\")', 'x', 'exec'))",
    "open('MARKER', 'w').write('x')",
    "open('{abs}', 'w').write('x')",
    "__import__('subprocess').run(['sh', '-c', '{cmd}'])",
    "__import__('pathlib').Path('{abs}').touch()",
    "(lambda: __import__('os').system('{cmd}'))()",
    "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0]('{cmd}', shell=True)",
    "().__class__.__mro__[1].__subclasses__()",
    "getattr(__builtins__, 'exec')('open(\"MARKER\", \"w\")')",
    "sympify(\"__import__('os').system('{cmd}')\")",
    "parse_expr(\"__import__('os').system('{cmd}')\")",
    "Symbol('x').__class__.__init__.__globals__['os'].system('{cmd}')",
    "lambdify(x, \"__import__('os').system('{cmd}')\")(1)",
    "Function('__import__')('os').system('{cmd}')",
    "S(\"exec('import os; os.system(\\\\'{cmd}\\\\')')\")",
    "x; import os; os.system('{cmd}')",
    "1 + __import__('os').system('{cmd}')",
    "{{__import__('os').system('{cmd}')}}",
    "\\text{{__import__('os').system('{cmd}')}}",
    "\\operatorname{{eval}}(\\text{{__import__('os').system('{cmd}')}})",
    "\\input{{MARKER}}",
    "\\immediate\\write18{{{cmd}}}",
    "\\write18{{{cmd}}}",
    "\\def\\x{{\\x}}\\x",
    "\\newcommand{{\\a}}{{\\a\\a}}\\a",
    "$(touch MARKER)",
    "`{cmd}`",
    "'; {cmd}; '",
]
WRAPPERS = ["\\boxed{{{p}}}", "{p}", "The answer is $\\boxed{{{p}}}$.", "\\boxed{{\\text{{{p}}}}}", "\\[{p}\\] \\boxed{{5}}",
            "\\boxed{{5}} {p}", "\\fbox{{{p}}}", "\\boxed{{{p}}} and \\boxed{{{p}}}"]
GOLDS = st.sampled_from(["5", "0", "-3", r"\frac{1}{2}", "x+1", r"\sqrt{2}", "[1,2]", r"\{1,2\}", r"\pi", "1000",
                         "2.5", r"\text{(B)}", "x^2"])

atoms = st.one_of(st.integers(-99, 999).map(str), st.sampled_from(list("xyzabn")),
                  st.sampled_from([r"\pi", r"\infty", "e", r"\alpha", "0.5", r"\theta"]))


def _extend(children):
    return st.one_of(
        st.tuples(children, children).map(lambda t: rf"\frac{{{t[0]}}}{{{t[1]}}}"),
        children.map(lambda c: rf"\sqrt{{{c}}}"),
        st.tuples(children, st.integers(0, 9)).map(lambda t: f"{{{t[0]}}}^{{{t[1]}}}"),  # small exponents only
        children.map(lambda c: f"{{{c}}}"),
        children.map(lambda c: rf"\left({c}\right)"),
        st.tuples(children, st.sampled_from(["+", "-", r"\cdot", r"\times", "/", ",", "=", r"\le"]), children)
        .map("".join),
        children.map(lambda c: rf"\sin({c})"),
        children.map(lambda c: rf"\log {c}"),
    )


latex = st.recursive(atoms, _extend, max_leaves=6)
any_text = st.text(max_size=40)
odd_chars = st.text(st.characters(categories=["Cc", "Cf", "Co", "Cs", "Zs", "Zl", "Zp", "Mn", "Me", "So"]),
                    max_size=30)
special = st.sampled_from(["\x00", "\u202e", "\u202d", "\u200f", "\u200e", "\ufeff", "\u200b", "\u2212", "\ud800",
                           "\x1b[2J", "\r", "\x0b", "\x0c", "\\", "{", "}", "$", "\\boxed{", "}}}", "%", "&", "#",
                           "^", "_", "\\\\", "\\{", "\\}", "\U0001f600", "\u0301" * 50, "\uff15", "\u0665"])

boxed_unicode = st.tuples(any_text, any_text, any_text).map(lambda t: f"{t[0]}\\boxed{{{t[1]}}}{t[2]}")
boxed_latex = st.tuples(any_text, latex, st.sampled_from(["", ".", "$", " \\quad", "}", "{"])).map(
    lambda t: f"{t[0]}\\boxed{{{t[1]}}}{t[2]}")
controls = st.tuples(odd_chars, st.lists(special, max_size=6).map("".join), odd_chars, st.booleans()).map(
    lambda t: f"{t[0]}\\boxed{{{t[1]}{t[2]}}}" if t[3] else f"{t[1]}{t[0]}\\boxed{{5{t[2]}}}{t[1]}")


def injections(marker_abs: str):
    def build(t):
        payload, cmd, wrapper = t
        cmd = cmd.format(abs=marker_abs)
        return wrapper.format(p=payload.format(cmd=cmd, abs=marker_abs))

    return st.tuples(st.sampled_from(PAYLOADS), st.sampled_from(MARKER_CMDS), st.sampled_from(WRAPPERS)).map(build)


# long strings: hypothesis draws the pattern, repetition makes it long (20 kB to 400 kB)
long_strings = st.tuples(st.text(min_size=1, max_size=20), st.integers(1_000, 20_000),
                         st.sampled_from(["end", "start", "inside", "none", "open"]), latex).map(
    lambda t: {"end": t[0] * t[1] + rf"\boxed{{{t[3]}}}",
               "start": rf"\boxed{{{t[3]}}}" + t[0] * t[1],
               "inside": rf"\boxed{{{(t[0] * t[1])[:2000]}}}",
               "none": t[0] * t[1],
               "open": (r"\boxed{" + t[0]) * (t[1] // 10)}[t[2]])

# known-heavy shapes: towers of exponents, deep \frac/\sqrt/brace nesting, huge factorials and sums
heavy = st.one_of(
    st.tuples(st.integers(2, 99), st.integers(3, 6)).map(lambda t: "^{".join([str(t[0])] * t[1]) + "}" * (t[1] - 1)),
    st.integers(20, 400).map(lambda d: r"\frac{" * d + "1" + "}{2}" * d),
    st.integers(50, 2000).map(lambda d: r"\frac{" * d),  # never closed: parsers that loop on this
    st.integers(20, 500).map(lambda d: r"\sqrt{" * d + "2" + "}" * d),
    st.integers(100, 5000).map(lambda d: "{" * d + "1" + "}" * d),
    st.integers(100, 2000).map(lambda d: "(" * d + "1" + ")" * d),
    st.integers(7, 12).map(lambda k: f"(10^{{{k}}})!"),
    st.integers(50, 300).map(lambda k: rf"\sum_{{n=1}}^{{10^{{{k}}}}} n"),
    st.integers(2_000, 20_000).map(lambda k: "+".join(["x"] * k)),
).map(lambda s: rf"\boxed{{{s}}}")


# completions that are not strings: bytes (valid or broken UTF-8), TRL conversational message lists
# with any roles and contents, single messages, None, numbers
texts = st.one_of(boxed_unicode, boxed_latex, controls)
contents = st.one_of(
    texts, texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=60), st.none(), st.integers(),
    st.lists(st.one_of(texts.map(lambda t: {"type": "text", "text": t}), texts, st.binary(max_size=20),
                       st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=2), st.none()), max_size=4),
)
messages = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["assistant", "user", "system", "tool", "", "ASSISTANT"]),
                           "content": contents}),
    st.fixed_dictionaries({"content": contents}),
    st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=20), st.none(), st.integers()), max_size=3),
    texts, st.none(), st.integers(),
)
odd_types = st.one_of(
    st.lists(messages, max_size=5),
    st.lists(messages, max_size=5).map(tuple),
    messages,
    texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.tuples(texts, st.binary(min_size=1, max_size=8)).map(lambda t: t[0].encode("utf-8", "surrogatepass") + t[1]),
    st.binary(max_size=200).map(bytearray),
    st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(),
)


def _pairs(completion_strategy, batch=BATCH):
    return st.lists(st.tuples(completion_strategy, GOLDS), min_size=batch, max_size=batch)


def _run(harness, name: str, pairs):
    FUZZ_TESTS_RUN.add(name)
    completions, golds = [list(x) for x in zip(*pairs)]
    return harness.score_and_check(completions, golds)


# --------------------------------------------------------------------------- fuzzing


def test_fuzz_unicode_with_boxes(harness):
    @settings(FUZZ, max_examples=8 * SCALE)
    @given(_pairs(boxed_unicode))
    def run(pairs):
        _run(harness, "unicode", pairs)

    run()


def test_fuzz_nested_latex(harness):
    @settings(FUZZ, max_examples=2 * SCALE)
    @given(_pairs(boxed_latex))
    def run(pairs):
        _run(harness, "latex", pairs)

    run()


def test_fuzz_control_and_odd_unicode(harness):
    @settings(FUZZ, max_examples=4 * SCALE)
    @given(_pairs(controls))
    def run(pairs):
        _run(harness, "controls", pairs)

    run()


def test_fuzz_injection_strings(harness):
    @settings(FUZZ, max_examples=3 * SCALE)
    @given(_pairs(injections(str(harness.marker))))
    def run(pairs):
        _run(harness, "injection", pairs)

    run()


def test_fuzz_long_strings(harness):
    @settings(FUZZ, max_examples=2 * SCALE)
    @given(_pairs(long_strings, batch=50))
    def run(pairs):
        _run(harness, "long", pairs)

    run()


def test_fuzz_mixed_with_heavy_items(harness):
    """Mostly light items plus two known-heavy ones (towers, deep nesting) per batch: the heavy
    ones time out on their own workers while the rest of the batch goes on."""
    light = st.one_of(boxed_unicode, controls, injections(str(harness.marker)))

    @settings(FUZZ, max_examples=3 * SCALE)
    @given(_pairs(light, batch=BATCH - 2), st.lists(st.tuples(heavy, GOLDS), min_size=2, max_size=2),
           st.randoms(use_true_random=False))
    def run(pairs, heavy_pairs, rnd):
        pairs = pairs + heavy_pairs
        rnd.shuffle(pairs)
        _run(harness, "mixed", pairs)

    run()


def test_fuzz_completion_types(harness, monkeypatch):
    """Bytes, chat message lists, single messages, None and numbers: every one gets a verdict, the
    same through :func:`rewards.math.math_reward` (TRL's entry point), and none raises."""
    monkeypatch.setattr(rewards.math, "_default_verifier", harness.verifier)

    @settings(FUZZ, max_examples=2 * SCALE)
    @given(_pairs(odd_types))
    def run(pairs):
        verdicts = _run(harness, "types", pairs)
        completions, golds = [list(x) for x in zip(*pairs)]
        assert math_reward(completions, answer=golds) == [v.reward for v in verdicts]

    run()


# --------------------------------------------------------------------------- hand-made corpus

MB = 1_000_000


def hand_corpus(marker: Path) -> list[tuple[str, str, str]]:
    """(name, completion, gold): the worst inputs we know of, each one on purpose."""
    m = str(marker)
    return [
        ("1MB prose, box at the end", "The reasoning goes on. " * (MB // 23) + r"\boxed{5}", "5"),
        ("1MB of digits in a box", r"\boxed{" + "9" * MB + "}", "5"),
        ("1MB of open braces", "{" * MB + r"\boxed{5}", "5"),
        ("1MB of unclosed boxes", r"\boxed{" * (MB // 7), "5"),
        ("1MB of empty boxes", r"\boxed{}" * (MB // 8), "5"),
        ("1MB of unclosed fracs", r"\frac{" * (MB // 6), "5"),
        ("100k nested braces in a box", r"\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}", "1"),
        ("\\frac tower 500 deep", r"\boxed{" + r"\frac{" * 500 + "1" + "}{2}" * 500 + "}", "0"),
        ("exponent tower 9^9^9^9", r"\boxed{9^{9^{9^{9}}}}", "1"),
        ("huge factorial", r"\boxed{(10^{10})!}", "1"),
        ("sum to a googol", r"\boxed{\sum_{n=1}^{10^{100}} n}", "1"),
        ("overflowing float", r"\boxed{1e999999999}", "1"),
        ("tiny power", r"\boxed{10^{-999999999}}", "0"),
        ("undefined forms", r"\boxed{\frac{0}{0} + \infty - \infty}", "0"),
        ("NUL bytes", "\x00" * 1000 + r"\boxed{5" + "\x00" + "}", "5"),
        ("every C0/C1 control", "".join(map(chr, [*range(32), *range(127, 160)])) + r"\boxed{5}", "5"),
        ("RTL override around the answer", "\u202e" + r"\boxed{" + "\u202e5\u202c" + "}" + "\u202c", "5"),
        ("bidi marks and zero-width", "\u200f\u200e\u200b\ufeff" * 1000 + "\\boxed{\u200b5}", "5"),
        ("lone surrogates", "\ud800\udfff" * 100 + "\\boxed{5\ud800}", "5"),
        ("zalgo: 10k combining marks", "5" + "\u0301\u0336\u0489" * 10_000 + r"\boxed{5" + "\u0301" * 500 + "}", "5"),
        ("fullwidth and arabic-indic digits", r"\boxed{" + "\uff15\u0665" + "}", "55"),
        ("ANSI escapes", "\x1b[2J\x1b[31m" + r"\boxed{5}" + "\x1b]0;title\x07", "5"),
        ("os.system injection", rf"\boxed{{__import__('os').system('touch {m}')}}", "0"),
        ("eval injection", "\\boxed{eval(\"__import__('os').system('touch MARKER')\")}", "0"),
        ("exec injection", "\\boxed{exec('import os; os.system(\"touch MARKER\")')}", "0"),
        ("open().write injection", rf"\boxed{{open('{m}', 'w').write('x')}}", "0"),
        ("sympify payload", "\\boxed{sympify(\"__import__('os').system('touch MARKER')\")}", "0"),
        ("subclasses escape", r"\boxed{().__class__.__base__.__subclasses__()[-1]('touch MARKER', shell=True)}", "0"),
        ("injection in \\text", rf"\boxed{{\text{{__import__('os').system('touch {m}')}}}}", "0"),
        ("TeX file input", r"\boxed{\input{/etc/passwd}}", "0"),
        ("TeX shell escape", r"\boxed{\immediate\write18{touch MARKER}}", "0"),
        ("recursive macro", r"\def\x{\x}\x \boxed{\newcommand{\a}{\a\a}\a}", "0"),
        ("10k \\left( without \\right", r"\boxed{" + r"\left(" * 10_000 + "1}", "1"),
        ("30x30 matrix", r"\boxed{\begin{pmatrix}" + r"\\".join(["&".join(["1"] * 30)] * 30)
         + r"\end{pmatrix}}", "1"),
        ("100k-digit decimal vs 1/3", r"\boxed{0." + "3" * 100_000 + "}", r"\frac{1}{3}"),
        # wrong verdicts of the past (issue 8, item 8): none of these may score
        ("false boxed equation", r"\boxed{1+1 = 4}", "4"),
        ("false equation chain", r"\boxed{x = 1+1 = 4}", "4"),
        ("false equation in a set", r"\boxed{\{1+1=4\}}", "4"),
        ("nested boxes", r"\boxed{\boxed{7}8}", "7"),
        ("1k nested boxes", r"\boxed{" * 1000 + "7" + "}" * 1000, "7"),
        ("junk before the number", r"\boxed{1+1 \to 4}", "4"),
        ("approximation", r"\boxed{1+1 \approx 4}", "2"),
        ("set against a tuple", r"\boxed{2,3}", "(2,3)"),
        ("100k-digit repeating decimal", r"\boxed{0.\overline{" + "3" * 100_000 + "}}", r"\frac{1}{3}"),
        ("1MB mantissa in e-notation", r"\boxed{" + "9" * MB + "e5}", "5"),
    ]


def test_hand_made_hostile_corpus(harness):
    corpus = hand_corpus(harness.marker)
    assert len(corpus) >= 25
    names, completions, golds = zip(*corpus)
    verdicts = harness.score_and_check(list(completions), list(golds))
    STATS["hand_items"] = len(corpus)
    STATS["hand_reasons"] = {name: v.reason for name, v in zip(names, verdicts)}
    print("\nhand-made corpus:", STATS["hand_reasons"])
    wrong = [name for name, v in zip(names, verdicts) if v.correct and "injection" in name]
    assert not wrong
    refused = ["false boxed equation", "false equation chain", "false equation in a set", "nested boxes",
               "1k nested boxes", "junk before the number", "approximation", "overflowing float",
               "100k-digit repeating decimal", "1MB mantissa in e-notation"]
    by_reason = {name: v.reason for name, v in zip(names, verdicts)}
    assert {name: by_reason[name] for name in refused} == dict.fromkeys(refused, "parse_error")
    assert by_reason["set against a tuple"] == "ok"
    # the plain answers that hostile surroundings must not hide
    by_name = dict(zip(names, verdicts))
    for name in ["1MB prose, box at the end", "1MB of open braces", "ANSI escapes", "every C0/C1 control",
                 "RTL override around the answer", "bidi marks and zero-width", "fullwidth and arabic-indic digits",
                 "NUL bytes", "lone surrogates"]:
        assert by_name[name].correct, (name, by_name[name])
    assert not by_name["set against a tuple"].correct


def test_extraction_never_evaluates(harness):
    """Extraction in the parent is string work: the payload comes back verbatim, not run."""
    payload = rf"__import__('os').system('touch {harness.marker}')"
    assert last_boxed(rf"\boxed{{{payload}}}") == payload
    assert not harness.marker.exists()


# --------------------------------------------------------------------------- afterwards


def test_pool_is_whole_after_fuzzing(harness):
    pool = harness.verifier.pool
    deadline = time.monotonic() + 30
    while pool.num_alive < NUM_WORKERS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.num_alive == NUM_WORKERS
    assert len(_verifier_pids()) == NUM_WORKERS  # replaced, not leaked
    normal = [(rf"\boxed{{\frac{{{5 * i}}}{{5}}}}", str(i)) for i in range(2000, 2200)]
    start = time.perf_counter()
    verdicts = harness.verifier.score(*zip(*normal))
    elapsed = time.perf_counter() - start
    assert [(v.correct, v.reason) for v in verdicts] == [(True, "ok")] * len(normal)
    # throughput kept: the same work as before the fuzzing, within noise (a generous factor)
    assert elapsed <= 3 * harness.normal_batch_s + 2.0, (elapsed, harness.normal_batch_s)
    assert not harness.marker.exists()
    assert sorted(p.name for p in harness.cwd.iterdir()) == []


def test_fuzz_counts():
    """At least 2,000 generated completions when the whole module runs; the figures for the docs."""
    fuzz = {"unicode", "latex", "controls", "injection", "long", "mixed", "types"}
    if FUZZ_TESTS_RUN != fuzz:
        pytest.skip("only part of the module ran")
    hand = STATS.get("hand_items", 0)
    print(f"\nhostile completions scored: {STATS['items']} in {STATS['batches']} batches "
          f"({STATS['items'] - hand} generated, {hand} hand-made), {STATS['timeouts']} timeouts, "
          f"{STATS['replaced']} workers replaced, {STATS['seconds']:.1f}s scoring (workers busy "
          f"{STATS['busy']:.1f}s on {STATS['pool_items']} items), worst batch {STATS['worst_batch_s']:.1f}s, "
          f"slowest answered item {STATS['slowest_answer_s']:.2f}s; reasons {STATS['reasons']}")
    assert STATS["items"] - hand >= 2000

"""Built-in math task: seeded arithmetic/algebra problems with exact answers.

Made for a tiny character-level model trained on CPU, so questions and solutions are short and use
only the characters in :data:`CHARSET`. Every problem belongs to a *family* (one question shape
over a product of integer ranges); a difficulty level is a set of families:

1. 2-digit addition, ``37+48=?`` (the calibrated quickstart task, docs/design.md §9).
2. 2-digit addition and subtraction, ``37-48=?`` (answers may be negative).
3. 3-digit addition/subtraction (``374+528=?``) and 1-digit x 2-digit multiplication
   (``7*48=?``, ``48*7=?``, factors 2-9 and 10-99).
4. Two operations with precedence: ``7+3*12=?``, ``7-3*12=?``, ``3*12+7=?``, ``3*12-7=?``,
   ``(7+3)*4=?``, ``(7-3)*4=?`` (addends 1-30, factors 2-9 and 2-12).
5. Linear equations with an integer solution x in -9..20: ``3x+5=20. x=?``, ``3x-5=10. x=?``.
6. Short word problems over a few templates and small numbers, e.g.
   ``Ann has 12 pens and buys 7 more. How many pens?`` (add, take away, bags of, share equally).

Each :class:`Problem` has a short worked ``solution`` ending in ``\\boxed{ANSWER}``, e.g.
``37+48=85. \\boxed{85}``, ``3*12=36, 7+36=43. \\boxed{43}`` or
``3x=20-5=15, x=15/3=5. \\boxed{5}``.

Train and test splits are disjoint by construction: a question belongs to ``test`` when the SHA-1
of its text modulo 100 is below ``test_percent`` (:func:`split_of`), so the same question lands in
the same split at every level, seed and Python run. Sampling uses :class:`random.Random` seeded
from SHA-1 digests, never the salted built-in ``hash()``.
"""

from __future__ import annotations

import hashlib
import math
import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

__all__ = ["CHARSET", "LEVELS", "Problem", "generate_problems", "split_of"]

CHARSET: str = " \n" + string.digits + string.ascii_lowercase + string.ascii_uppercase + "+-*/=?.,:()\\{}"
"""Every character a question, answer, solution or prompt template (rltk.data.templates) uses."""

SPLITS = ("train", "test")

# Families up to this size are enumerated and shuffled; larger ones are sampled by rejection.
_ENUMERATE_LIMIT = 2_000


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    solution: str
    level: int


@dataclass(frozen=True)
class _Family:
    """One question shape: ``build(*params)`` for params in the product of ``axes``."""

    name: str
    axes: tuple[Sequence, ...]
    build: Callable[..., tuple[str, str, int]]

    @property
    def size(self) -> int:
        return math.prod(len(axis) for axis in self.axes)

    def make(self, index: int) -> tuple[str, str, int]:
        """(question, worked steps, answer) of the ``index``-th parameter tuple (mixed-radix decoding)."""
        params = []
        for axis in reversed(self.axes):
            index, r = divmod(index, len(axis))
            params.append(axis[r])
        return self.build(*reversed(params))


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _binop(op: str) -> Callable[[int, int], tuple[str, str, int]]:
    def build(a: int, b: int) -> tuple[str, str, int]:
        value = _apply(a, op, b)
        return f"{a}{op}{b}=?", f"{a}{op}{b}={value}", value

    return build


def _mul_1x2(f: int, g: int, swap: bool) -> tuple[str, str, int]:
    a, b = (g, f) if swap else (f, g)
    return f"{a}*{b}=?", f"{a}*{b}={a * b}", a * b


def _with_product(op: str, mul_first: bool) -> Callable[[int, int, int], tuple[str, str, int]]:
    """``s op f*g`` (``mul_first=False``) or ``f*g op s``: the product is worked out first."""

    def build(s: int, f: int, g: int) -> tuple[str, str, int]:
        p = f * g
        left, right = (p, s) if mul_first else (s, p)
        value = _apply(left, op, right)
        question = f"{f}*{g}{op}{s}=?" if mul_first else f"{s}{op}{f}*{g}=?"
        return question, f"{f}*{g}={p}, {left}{op}{right}={value}", value

    return build


def _paren(op: str) -> Callable[[int, int, int], tuple[str, str, int]]:
    def build(s: int, t: int, f: int) -> tuple[str, str, int]:
        inner = _apply(s, op, t)
        value = inner * f
        return f"({s}{op}{t})*{f}=?", f"{s}{op}{t}={inner}, {inner}*{f}={value}", value

    return build


def _linear(op: str) -> Callable[[int, int, int], tuple[str, str, int]]:
    """``a*x op b = c`` with the integer solution ``x``."""

    def build(a: int, x: int, b: int) -> tuple[str, str, int]:
        c = _apply(a * x, op, b)
        undo = "-" if op == "+" else "+"
        return f"{a}x{op}{b}={c}. x=?", f"{a}x={c}{undo}{b}={a * x}, x={a * x}/{a}={x}", x

    return build


_NAMES = ("Ann", "Bob", "Tom", "Eva", "Sam", "Mia")
_ITEMS = ("pens", "apples", "cards", "books", "coins", "eggs")


def _buys(name: str, item: str, a: int, b: int) -> tuple[str, str, int]:
    return f"{name} has {a} {item} and buys {b} more. How many {item}?", f"{a}+{b}={a + b}", a + b


def _gives(name: str, item: str, b: int, d: int) -> tuple[str, str, int]:
    a = b + d
    return f"{name} has {a} {item} and gives away {b}. How many {item} are left?", f"{a}-{b}={d}", d


def _bags(name: str, item: str, a: int, b: int) -> tuple[str, str, int]:
    return f"{name} has {a} bags of {b} {item}. How many {item}?", f"{a}*{b}={a * b}", a * b


def _shares(name: str, item: str, a: int, b: int) -> tuple[str, str, int]:
    total = a * b
    return f"{name} shares {total} {item} equally among {b} friends. How many {item} each?", f"{total}/{b}={a}", a


_D2, _D3 = range(10, 100), range(100, 1000)
_WORDS = (_NAMES, _ITEMS)

LEVELS: dict[int, tuple[_Family, ...]] = {
    1: (_Family("add2", (_D2, _D2), _binop("+")),),
    2: (_Family("add2", (_D2, _D2), _binop("+")), _Family("sub2", (_D2, _D2), _binop("-"))),
    3: (
        _Family("add3", (_D3, _D3), _binop("+")),
        _Family("sub3", (_D3, _D3), _binop("-")),
        _Family("mul1x2", (range(2, 10), _D2, (False, True)), _mul_1x2),
    ),
    4: (
        _Family("s+f*g", (range(1, 31), range(2, 10), range(2, 13)), _with_product("+", False)),
        _Family("s-f*g", (range(1, 31), range(2, 10), range(2, 13)), _with_product("-", False)),
        _Family("f*g+s", (range(1, 31), range(2, 10), range(2, 13)), _with_product("+", True)),
        _Family("f*g-s", (range(1, 31), range(2, 10), range(2, 13)), _with_product("-", True)),
        _Family("(s+t)*f", (range(1, 31), range(1, 31), range(2, 10)), _paren("+")),
        _Family("(s-t)*f", (range(1, 31), range(1, 31), range(2, 10)), _paren("-")),
    ),
    5: (
        _Family("ax+b=c", (range(2, 10), range(-9, 21), range(1, 21)), _linear("+")),
        _Family("ax-b=c", (range(2, 10), range(-9, 21), range(1, 21)), _linear("-")),
    ),
    6: (
        _Family("buys", (*_WORDS, range(2, 21), range(2, 21)), _buys),
        _Family("gives", (*_WORDS, range(1, 20), range(1, 20)), _gives),
        _Family("bags", (*_WORDS, range(2, 10), range(2, 10)), _bags),
        _Family("shares", (*_WORDS, range(2, 10), range(2, 10)), _shares),
    ),
}
"""Difficulty level -> its problem families (see the module docstring)."""


def _sha1_int(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16)


def split_of(question: str, test_percent: int = 10) -> str:
    """``"test"`` when SHA-1(question) mod 100 < ``test_percent``, else ``"train"``."""
    return "test" if _sha1_int(question) % 100 < test_percent else "train"


def _rng(*key: object) -> random.Random:
    return random.Random(_sha1_int("|".join(map(str, key))))


def _family_stream(family: _Family, split: str, test_percent: int, rng: random.Random) -> Iterator[int]:
    """Every index of ``family`` whose question is in ``split``, once each, in a seeded order.

    Small families are enumerated and shuffled. Large ones are drawn by rejection until half the
    family has been seen (cheap while few are needed); the unseen rest is then enumerated.
    """

    def in_split(i: int) -> bool:
        return split_of(family.make(i)[0], test_percent) == split

    seen: set[int] = set()
    if family.size > _ENUMERATE_LIMIT:
        while len(seen) < family.size // 2:
            i = rng.randrange(family.size)
            if i not in seen:
                seen.add(i)
                if in_split(i):
                    yield i
    rest = [i for i in range(family.size) if i not in seen and in_split(i)]
    rng.shuffle(rest)
    yield from rest


def _check_args(levels: int | Sequence[int], n: int, split: str, test_percent: int) -> tuple[int, ...]:
    levels = (levels,) if isinstance(levels, int) else tuple(levels)
    bad = [lv for lv in levels if lv not in LEVELS]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty subset of {sorted(LEVELS)}; got {levels}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if not 0 <= test_percent <= 100:
        raise ValueError(f"test_percent must be in 0..100; got {test_percent}")
    return tuple(sorted(set(levels)))


def generate_problems(
    levels: int | Sequence[int], n: int, split: str, seed: int = 0, *, test_percent: int = 10
) -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train" or "test") drawn from ``levels``.

    Each problem picks its level uniformly among ``levels`` still having unused problems, then a
    family uniformly within that level. Deterministic for (levels, n, split, seed, test_percent)
    across processes and Python runs. Questions are distinct across levels too (level 2 contains
    level 1's additions; a repeat is skipped). Raises ValueError when fewer than ``n`` distinct
    problems exist for these levels and split.
    """
    levels = _check_args(levels, n, split, test_percent)
    rng = _rng("levels", seed, levels, split)
    active = {
        lv: [(f, _family_stream(f, split, test_percent, _rng(seed, split, lv, f.name))) for f in LEVELS[lv]]
        for lv in levels
    }
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        if not active:
            raise ValueError(
                f"asked for {n} {split} problems at levels {list(levels)}, but only {len(problems)} "
                f"distinct ones exist (test_percent={test_percent})"
            )
        level = rng.choice(sorted(active))
        families = active[level]
        j = rng.randrange(len(families))
        family, stream = families[j]
        index = next(stream, None)
        if index is None:
            del families[j]
            if not families:
                del active[level]
            continue
        question, steps, value = family.make(index)
        if question not in seen:
            seen.add(question)
            qid = f"L{level}-{hashlib.sha1(question.encode()).hexdigest()[:10]}"
            problems.append(Problem(qid, question, str(value), f"{steps}. \\boxed{{{value}}}", level))
    return problems

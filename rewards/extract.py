"""Answer extraction and cheap string normalisation for math rewards.

Everything here is plain string work in linear time: no ``eval``, no sympy, no regex with nested
quantifiers, so a hostile or 1 MB completion costs milliseconds. Mathematical equivalence is decided
elsewhere, by math-verify inside killable worker processes (:mod:`rewards.pool`).

- :func:`find_boxes` / :func:`last_boxed`: balanced ``\\boxed{...}`` / ``\\fbox{...}`` groups. We
  pick the last box ourselves because math-verify merges several boxes that stand close together
  into a set (``\\boxed{1} no \\boxed{2}`` -> {1, 2}; ALGORITHMS.md §9.1).
- :func:`clean_answer`: cosmetic clean-up, safe to hand to math-verify (it fixes inputs math-verify
  misreads: ``3.`` fails to parse, ``1\\,000`` reads as ``1*0``, ``1 000`` as ``1*0``; invisible
  format characters, fullwidth forms and non-ASCII decimal digits fail to parse).
- :func:`normalize_answer`: the fast-path key; two answers with equal keys are equivalent.

Thousands separators: an answer that is *entirely* one number written with groups of three digits
(``1,000``, ``12,345,678.5``, ``1{,}000``, ``10,\\!080``, ``1\\,000``, ``1 000``; first group 1-3
digits not starting with 0) is read as that number. Any other comma separates elements, as
math-verify reads it (``1,5`` and ``1,0000`` are sets, ``(1,000)`` is a tuple, ``0,100`` is left to
math-verify).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

__all__ = ["Box", "clean_answer", "completion_text", "find_boxes", "last_boxed", "normalize_answer"]

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A brace token: an escaped pair (\\, \{, \}) that never opens or closes a group, or a bare brace.
_BRACE = re.compile(r"\\[\\{}]|[{}]")


def completion_text(completion: str | list[dict]) -> str:
    """The text of a completion as TRL passes it to reward functions: a string, or a list of chat
    messages whose last one is the model's reply (its ``content`` a string or a list of
    ``{"type": "text", "text": ...}`` parts)."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content") or ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


@dataclass(frozen=True)
class Box:
    """A balanced box: ``text[start:end]`` is ``\\boxed{...}``, ``text[inner_start:inner_end]`` its
    content."""

    start: int
    inner_start: int
    inner_end: int
    end: int


def find_boxes(text: str) -> list[Box]:
    """All balanced ``\\boxed{...}`` / ``\\fbox{...}`` groups of ``text``, ordered by start.

    Whitespace between the command and its brace is allowed (``\\boxed {x}``); escaped braces
    (``\\{``, ``\\}``) do not count. A box whose brace never closes is left out. One pass over the
    brace tokens with a stack: linear time.
    """
    opens = {m.end() - 1: m.start() for m in _BOX_OPEN.finditer(text)}
    if not opens:
        return []
    boxes, stack = [], []
    for m in _BRACE.finditer(text, min(opens)):
        token = m.group()
        if token == "{":
            stack.append(m.start())
        elif token == "}" and stack:
            brace = stack.pop()
            if brace in opens:
                boxes.append(Box(opens[brace], brace + 1, m.start(), m.end()))
    boxes.sort(key=lambda box: box.start)
    return boxes


def last_boxed(text: str) -> str | None:
    """Content of the last balanced box in ``text`` (the one that starts last, so the inner box
    of ``\\boxed{\\boxed{3}}``), or ``None`` when there is none."""
    boxes = find_boxes(text)
    if not boxes:
        return None
    box = boxes[-1]
    return text[box.inner_start : box.inner_end]


_CLEAN_STEPS = (
    (re.compile(r"\\\$"), ""),  # an escaped dollar is a currency sign
    (re.compile(r"\$"), ""),
    (re.compile("\u2212"), "-"),  # unicode minus
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\(?:left|right|displaystyle|textstyle)(?![A-Za-z])"), ""),
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\!"), ""),  # negative thin space (``10,\\!080``)
    (re.compile(r"\\[,;: ]|\\q?quad(?![A-Za-z])|~"), " "),  # spacing commands
)
_GROUPED_NUMBER = re.compile(r"-?[1-9]\d{0,2}(?:(?:,|\s+)\d{3})+(?:\.\d+)?")
_THOUSANDS_SEP = re.compile(r",|\s+")
# A run of whitespace not standing between two letters/digits (``\pi r``, ``1 2`` keep theirs).
_LOOSE_SPACE = re.compile(r"\s+(?![A-Za-z0-9])|(?<![A-Za-z0-9])\s+")


class _UnicodeFold(dict):
    """A ``str.translate`` table filled on first sight of each character: format characters
    (category Cf: zero-width spaces, bidi controls, the BOM, soft hyphens) are dropped, fullwidth
    ASCII forms (U+FF01-U+FF5E) become ASCII, and every decimal digit (category Nd: Arabic-Indic,
    Devanagari, ...) becomes its ASCII digit. Other characters, superscripts (``x²``) and vulgar
    fractions included, are kept: folding them would change what the answer says. At most
    ``LIMIT`` characters are remembered, so a completion of every code point cannot grow it."""

    LIMIT = 4096

    def __missing__(self, code: int) -> int | None:
        char = chr(code)
        category = unicodedata.category(char)
        if category == "Cf":
            value = None
        elif 0xFF01 <= code <= 0xFF5E:
            value = code - 0xFEE0
        elif category == "Nd":
            value = ord("0") + unicodedata.decimal(char)
        else:
            value = code
        if len(self) < self.LIMIT:
            self[code] = value
        return value


_FOLD = _UnicodeFold()


def clean_answer(s: str) -> str:
    """Cosmetic clean-up of an extracted answer, kept readable by math-verify.

    Folds Unicode first (:class:`_UnicodeFold`: ``\\u200b5`` and ``５`` are ``5``), then drops
    ``$`` and ``\\$``, ``\\left``/``\\right``/``\\displaystyle``, spacing commands (``\\,``
    ``\\!`` ``\\;`` ``\\quad`` ``~``) and trailing periods; ``\\dfrac``/``\\tfrac`` become
    ``\\frac``; a whole-answer number with thousands separators becomes plain digits (module
    docstring); whitespace is removed except one space between two letters/digits (``\\pi r`` is
    not ``\\pir``, and math-verify reads ``1 2`` as 3, so ``1 2`` must not become ``12``).
    """
    if not s.isascii():
        s = s.translate(_FOLD)
    for pattern, repl in _CLEAN_STEPS:
        s = pattern.sub(repl, s)
    s = s.strip().rstrip(".").strip()
    if _GROUPED_NUMBER.fullmatch(s):
        s = _THOUSANDS_SEP.sub("", s)
    return _LOOSE_SPACE.sub("", re.sub(r"\s+", " ", s))


_DEGREES = re.compile(r"\^\{?\\circ\}?|\\degree(?![A-Za-z])|\u00b0")
_PERCENT = re.compile(r"\\?%")
_NUMBER_WITH_UNIT = re.compile(
    r"(-?\d+(?:\.\d+)?)\s?\\(?:text|mbox)\{\s?[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?"
)


def normalize_answer(s: str) -> str:
    """Fast-path key: :func:`clean_answer`, then degrees (``^\\circ``), percent signs and a
    ``\\text{...}`` unit after a number are dropped, as math-verify itself ignores them
    (``10\\%`` = 10, ``5 \\text{ cm}`` = 5; ALGORITHMS.md §9.1). Conservative by design: equal keys
    mean equal answers; unequal keys mean nothing (math-verify decides)."""
    s = _PERCENT.sub("", _DEGREES.sub("", clean_answer(s)))
    unit = _NUMBER_WITH_UNIT.fullmatch(s)
    return unit.group(1) if unit else s

"""Answer extraction and cheap string normalisation for math rewards.

Everything here is plain string work in linear time: no ``eval``, no sympy, no regex with nested
quantifiers, so a hostile or 1 MB completion costs milliseconds. Mathematical equivalence is decided
elsewhere, by math-verify inside killable worker processes (:mod:`rewards.pool`).

- :func:`completion_text`: the text of a completion, whatever TRL (or a caller) passes: a string,
  bytes (decoded as UTF-8, bad bytes replaced), or a chat message list (the last assistant
  message's content). Never raises; anything else has no text.
- :func:`find_boxes` / :func:`last_boxed`: balanced ``\\boxed{...}`` / ``\\fbox{...}`` groups. We
  pick the last box ourselves because math-verify merges several boxes that stand close together
  into a set (``\\boxed{1} no \\boxed{2}`` -> {1, 2}; docs/algorithms/reference.md §9.1). The answer is the
  content of the last *outermost* box: ``\\boxed{\\boxed{7}8}`` gives ``\\boxed{7}8``, which
  :func:`refusal` then refuses (a box inside the answer), never the inner ``7``.
- :func:`clean_answer`: cosmetic clean-up, safe to hand to math-verify (it fixes inputs math-verify
  misreads: ``3.`` fails to parse, ``1\\,000`` reads as ``1*0``, ``1 000`` as ``1*0``, ``1e3`` as
  ``1*e*3``, ``0.\\overline{3}`` as 0; invisible format characters, fullwidth forms and non-ASCII
  decimal digits fail to parse).
- :func:`refusal`: answers the grader will not score (a counted ``parse_error``), whatever
  math-verify would make of them.
- :func:`normalize_answer`: the fast-path key; two answers with equal keys are equivalent.

Thousands separators: an answer that is *entirely* one number written with groups of three digits
(``1,000``, ``12,345,678.5``, ``1{,}000``, ``10,\\!080``, ``1\\,000``, ``1 000``; first group 1-3
digits not starting with 0) is read as that number. Any other comma separates elements, as
math-verify reads it (``1,5`` and ``1,0000`` are sets, ``(1,000)`` is a tuple, ``0,100`` is left to
math-verify).

Scientific notation: a number written ``<mantissa>e<exponent>`` or ``E`` with no spaces (``1e3``,
``2.5E-4``, ``6.02e+23``), standing alone (not glued to letters, digits, a dot, a backslash command,
``^``, ``_`` or ``}`` on its left, nor to letters, digits, a dot, ``^``, ``{`` or ``(`` on its
right), is that number exactly (``1e3`` -> ``1000``, ``2.5e-3`` -> ``0.0025``). With spaces it is
Euler's number: ``2e - 3`` stays 2e - 3. A mantissa over 50 characters or an exponent beyond 100 in
size is not rewritten, and :func:`refusal` refuses the answer.

Repeating decimals: ``0.\\overline{3}``, ``0.1\\overline{6}``, ``1.\\bar{3}``, ``0.\\dot{3}`` (one
repeating digit; ``\\overline``/``\\bar`` also take one digit without braces) become the exact
fraction (``\\frac{1}{3}``, ``\\frac{1}{6}``, ``\\frac{4}{3}``; ``0.\\overline{9}`` -> ``1``).
Over 100 digits in all, or any other decimal followed by ``\\overline``/``\\bar``/``\\dot``
(``0.\\dot{1}\\dot{2}``), is refused rather than misread.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

__all__ = [
    "Box",
    "clean_answer",
    "cleaned_key",
    "completion_text",
    "find_boxes",
    "last_boxed",
    "normalize_answer",
    "refusal",
]

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A brace token: an escaped pair (\\, \{, \}) that never opens or closes a group, or a bare brace.
_BRACE = re.compile(r"\\[\\{}]|[{}]")


def _decode(data: bytes | bytearray | memoryview) -> str:
    return bytes(data).decode("utf-8", errors="replace")


def _content_text(content: object) -> str:
    """A message's ``content``: a string, bytes, or a list of parts (``{"type": "text", "text":
    ...}`` dicts or strings); anything else is empty."""
    if isinstance(content, str):
        return content
    if isinstance(content, (bytes, bytearray, memoryview)):
        return _decode(content)
    if not isinstance(content, (list, tuple)):
        return ""
    parts = []
    for part in content:
        if isinstance(part, Mapping):
            part = part.get("text")
        if isinstance(part, (str, bytes, bytearray, memoryview)):
            parts.append(_content_text(part))
    return "".join(parts)


def completion_text(completion: object) -> str:
    """The text of a completion as TRL passes it to reward functions, never raising.

    - a string: itself;
    - bytes: decoded as UTF-8, undecodable bytes replaced by U+FFFD;
    - a chat message list (TRL's conversational format, ``[{"role": "assistant", "content":
      ...}]``): the content of the last message whose role is ``assistant`` (a message without a
      role counts as one), the content a string, bytes or a list of ``{"type": "text", "text":
      ...}`` parts; a list with no assistant message has no text;
    - a single message dict: its content;
    - anything else (``None``, numbers, ...): no text, ``""`` (scored ``no_answer``).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (bytes, bytearray, memoryview)):
        return _decode(completion)
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        for message in reversed(completion):
            if isinstance(message, Mapping) and message.get("role", "assistant") == "assistant":
                return _content_text(message.get("content"))
    return ""


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


def last_outer_box(text: str) -> Box | None:
    """The last outermost balanced box of ``text`` (in ``\\boxed{\\boxed{7}8}`` the outer one)."""
    last = None
    for box in find_boxes(text):  # ordered by start; a nested box starts and ends inside its parent
        if last is None or box.start >= last.end:
            last = box
    return last


def last_boxed(text: str) -> str | None:
    """Content of the last outermost balanced box in ``text`` (``\\boxed{\\boxed{7}8}`` gives
    ``\\boxed{7}8``, not the inner ``7``), or ``None`` when there is none."""
    last = last_outer_box(text)
    return None if last is None else text[last.inner_start : last.inner_end]


_CLEAN_STEPS = (
    (re.compile(r"\\\$"), ""),  # an escaped dollar is a currency sign
    (re.compile(r"\$"), ""),
    (re.compile("\u2212"), "-"),  # unicode minus
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\(?:left|right|displaystyle|textstyle)(?![A-Za-z])"), ""),
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    # negative thin space (``10,\\!080``) and spacing commands; a ``\\\\`` (matrix row break) is
    # matched first and kept, so ``1 \\\\ 2`` does not lose a backslash to ``\\ ``
    (re.compile(r"(\\\\)|\\!"), lambda m: m.group(1) or ""),
    (re.compile(r"(\\\\)|\\[,;: ]|\\q?quad(?![A-Za-z])|~"), lambda m: m.group(1) or " "),
)
# A number in scientific notation, not glued to its neighbours (module docstring). No nested or
# overlapping quantifiers: the mantissa's digits and the exponent's are separated by [eE].
_SCIENTIFIC = re.compile(r"(?<![\w.\\^}])(\d+(?:\.\d*)?|\.\d+)[eE]([-+]?\d+)(?![\w.^{(])")
_MAX_MANTISSA_CHARS = 50
_MAX_EXPONENT = 100
# A repeating decimal: integer digits, '.', fixed digits, then the repeating digits under
# \overline/\bar (braced digits, or one digit) or \dot (one digit).
_REPEATING = re.compile(
    r"(?<![\w.\\^}])(\d*)\.(\d*)"
    r"(?:\\(?:overline|bar)\s*(?:\{(\d+)\}|(\d))|\\dot\s*(?:\{(\d)\}|(\d)))"
    r"(?![\w.^{(\\])"
)
_MAX_REPEATING_DIGITS = 100
# What is left of a repeating decimal that was not rewritten (too long, or another notation).
_REPEATING_LEFT = re.compile(r"(?<![A-Za-z\d])\d*\.\d*\\(?:overline|bar|dot)(?![A-Za-z])")
_GROUPED_NUMBER = re.compile(r"-?[1-9]\d{0,2}(?:(?:,|\s+)\d{3})+(?:\.\d+)?")
_THOUSANDS_SEP = re.compile(r",|\s+")
# A run of whitespace not standing between two letters/digits (``\pi r``, ``1 2`` keep theirs).
_LOOSE_SPACE = re.compile(r"\s+(?![A-Za-z0-9])|(?<![A-Za-z0-9])\s+")


class _UnicodeFold(dict):
    """A ``str.translate`` table filled on first sight of each character: format characters
    (category Cf: zero-width spaces, bidi controls, the BOM, soft hyphens), control characters
    (Cc: NUL, ESC, DEL, C1; whitespace controls such as tab and newline become a space) and lone
    surrogates (Cs) are dropped, fullwidth ASCII forms (U+FF01-U+FF5E) become ASCII, and every
    decimal digit (category Nd: Arabic-Indic, Devanagari, ...) becomes its ASCII digit. Other
    characters, superscripts (``x²``), vulgar fractions and combining marks (``5\u0301``)
    included, are kept: folding them would change what the answer says. At most ``LIMIT``
    characters are remembered, so a completion of every code point cannot grow it."""

    LIMIT = 4096

    def __missing__(self, code: int) -> int | None:
        char = chr(code)
        category = unicodedata.category(char)
        if category == "Cc" and char.isspace():
            value = ord(" ")
        elif category in ("Cf", "Cc", "Cs"):
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


def _scientific_in_range(mantissa: str, exponent: str) -> bool:
    if len(mantissa) > _MAX_MANTISSA_CHARS or len(exponent) > 5:  # int() of a 1 MB string is slow
        return False
    return abs(int(exponent)) <= _MAX_EXPONENT


def _expand_scientific(match: re.Match) -> str:
    """``2.5e-3`` -> ``0.0025``: exact, by decimal arithmetic on a string the regex vetted."""
    mantissa, exponent = match.group(1), match.group(2)
    if not _scientific_in_range(mantissa, exponent):
        return match.group()  # refused later (refusal)
    return format(Decimal(f"{mantissa}e{exponent}"), "f")


def _repeating_fraction(match: re.Match) -> str:
    """``0.1\\overline{6}`` -> ``\\frac{1}{6}``: the exact value of a repeating decimal."""
    whole, fixed = match.group(1), match.group(2)
    period = next(group for group in match.groups()[2:] if group is not None)
    if len(whole) + len(fixed) + len(period) > _MAX_REPEATING_DIGITS:
        return match.group()  # refused later (refusal)
    # whole.fixed(period)(period)... =
    #     (whole fixed period - whole fixed) / (10^|fixed| * (10^|period| - 1))
    numerator = int(whole + fixed + period) - int(whole + fixed or "0")
    denominator = 10 ** len(fixed) * (10 ** len(period) - 1)
    divisor = math.gcd(numerator, denominator)
    numerator, denominator = numerator // divisor, denominator // divisor
    return str(numerator) if denominator == 1 else rf"\frac{{{numerator}}}{{{denominator}}}"


def clean_answer(s: str) -> str:
    """Cosmetic clean-up of an extracted answer, kept readable by math-verify.

    Folds Unicode first (:class:`_UnicodeFold`: ``\\u200b5``, ``5\\x00`` and ``５`` are ``5``),
    then drops ``$`` and ``\\$``, ``\\left``/``\\right``/``\\displaystyle``, spacing commands
    (``\\,`` ``\\!`` ``\\;`` ``\\quad`` ``~``) and trailing periods; ``\\dfrac``/``\\tfrac`` become
    ``\\frac``; scientific notation becomes the plain number and a repeating decimal the exact
    fraction (module docstring); a whole-answer number with thousands separators becomes plain
    digits (module docstring); whitespace is removed except one space between two letters/digits
    (``\\pi r`` is not ``\\pir``, and math-verify reads ``1 2`` as 3, so ``1 2`` must not become
    ``12``).
    """
    if not s.isascii() or not s.isprintable():
        s = s.translate(_FOLD)
    for pattern, repl in _CLEAN_STEPS:
        s = pattern.sub(repl, s)
    s = s.strip().rstrip(".").strip()
    if "e" in s or "E" in s:
        s = _SCIENTIFIC.sub(_expand_scientific, s)
    if "\\" in s:
        s = _REPEATING.sub(_repeating_fraction, s)
    if _GROUPED_NUMBER.fullmatch(s):
        s = _THOUSANDS_SEP.sub("", s)
    return _LOOSE_SPACE.sub("", re.sub(r"\s+", " ", s))


# A box inside the answer: ``\\boxed{\\boxed{7}8}`` (see last_boxed).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Approximate relations: math-verify's parser keeps one side of them and drops the other
# (``1+1 \\approx 4`` reads as 1+1), so what they claim is never checked.
_APPROXIMATE = re.compile(
    r"\\(?:approx|approxeq|thickapprox)(?![A-Za-z])|[\u2243\u2245\u2248\u224a\u224b]"
)


def refusal(answer: str) -> str | None:
    """Why the grader will not score ``answer`` (a cleaned answer, see :func:`clean_answer`), or
    ``None``. Refused answers score 0 with reason ``parse_error``, whatever math-verify would
    make of them:

    - ``"nested box"``: a box inside the answer (``\\boxed{\\boxed{7}8}``): neither the inner nor
      the outer content is taken;
    - ``"approximation"``: ``\\approx`` or its Unicode forms (``≈ ≅ ≃ ≊ ≋``);
    - ``"number out of range"``: scientific notation beyond the limits of the module docstring;
    - ``"repeating decimal"``: one that was not rewritten (over 100 digits, or two ``\\dot``).

    Equations are judged on math-verify's parse, in the workers (:func:`rewards.pool.check_pair`).
    """
    if _BOX_COMMAND.search(answer):
        return "nested box"
    if _APPROXIMATE.search(answer):
        return "approximation"
    if "e" in answer or "E" in answer:
        for match in _SCIENTIFIC.finditer(answer):
            if not _scientific_in_range(match.group(1), match.group(2)):
                return "number out of range"
    if _REPEATING_LEFT.search(answer):
        return "repeating decimal"
    return None


_DEGREES = re.compile(r"\^\{?\\circ\}?|\\degree(?![A-Za-z])|\u00b0")
_PERCENT = re.compile(r"\\?%")
_NUMBER_WITH_UNIT = re.compile(
    r"(-?\d+(?:\.\d+)?)\s?\\(?:text|mbox)\{\s?[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?"
)


def normalize_answer(s: str) -> str:
    """Fast-path key: :func:`clean_answer`, then degrees (``^\\circ``), percent signs and a
    ``\\text{...}`` unit after a number are dropped, as math-verify itself ignores them
    (``10\\%`` = 10, ``5 \\text{ cm}`` = 5; docs/algorithms/reference.md §9.1). Conservative by design: equal keys
    mean equal answers; unequal keys mean nothing (math-verify decides)."""
    return cleaned_key(clean_answer(s))


def cleaned_key(cleaned: str) -> str:
    """:func:`normalize_answer` of an answer already passed through :func:`clean_answer`."""
    s = _PERCENT.sub("", _DEGREES.sub("", cleaned))
    unit = _NUMBER_WITH_UNIT.fullmatch(s)
    return unit.group(1) if unit else s

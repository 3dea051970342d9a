"""Format reward: did the completion end with exactly one boxed answer?

Rule: 1.0 when the completion holds exactly one balanced ``\\boxed{...}`` (or ``\\fbox{...}``) and
nothing after it but whitespace, closing punctuation and math delimiters (``. , ; : ! ? ) ] } $ *``,
``\\]``, ``\\)``), so ``$\\boxed{5}$.``, ``\\[\\boxed{5}\\]`` and ``**\\boxed{5}**`` pass; several
boxes (nested ones included), a box followed by more prose, or no box score 0.0. Whether the boxed
answer is right is :func:`rewards.math.math_reward`'s business.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rewards.extract import completion_text, find_boxes

__all__ = ["format_ok", "format_reward"]

_TRAILER = re.compile(r"(?:\s|[.,;:!?)\]}$*]|\\[\])])*")


def format_ok(text: str) -> bool:
    """True when ``text`` follows the rule in the module docstring."""
    boxes = find_boxes(text)
    return len(boxes) == 1 and _TRAILER.fullmatch(text, boxes[0].end) is not None


def format_reward(completions: Sequence[str | bytes | list[dict]], **kwargs) -> list[float]:
    """TRL-style reward function: 1.0 per well-formatted completion, else 0.0. Completions are read
    as :func:`rewards.extract.completion_text` reads them (strings, bytes, chat message lists);
    anything without text scores 0.0, never an exception."""
    return [1.0 if format_ok(completion_text(c)) else 0.0 for c in completions]

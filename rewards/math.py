"""Math answer reward: the last boxed answer, checked against the gold answer.

Per completion: take its text (:func:`~rewards.extract.completion_text`: strings, bytes, chat
message lists), then the last outermost balanced ``\\boxed{...}`` (none -> ``no_answer``); a refused
answer (:func:`~rewards.extract.refusal`) is a ``parse_error``; if its
:func:`~rewards.extract.normalize_answer` key equals the gold's, it is correct without a worker;
otherwise math-verify decides in a killable worker (:class:`~rewards.pool.VerifierPool`), the gold
parsed first (``verify`` is asymmetric; docs/algorithms/reference.md §9.1), under the rules of
:func:`~rewards.pool.check_pair`. Timeouts and parse failures score 0 and keep their reason, so
metrics can count them.

Decisions (tested in ``tests/test_rewards.py``):
- thousands separators: a whole-answer number with groups of three digits is that number
  (``1,000`` = ``1{,}000`` = ``1\\,000`` = 1000); other commas separate set elements, as
  math-verify reads them (``1,2`` = ``2,1``, ``1,0000`` = {1, 0}); see :mod:`rewards.extract`.
- a bare comma list is a set: it equals ``\\{2,3\\}`` and ``3,2`` but never a tuple or interval
  (``2,3`` is not ``(2,3)``, whichever is the gold).
- equations: against a gold that is not an equation, a boxed equation counts only as
  ``variable = value`` (``x = 4``, ``x_1 = 4``, ``(x, y) = (1, 2)``, ``f(2) = 4``), and its value
  is compared; any other equation (``1+1 = 4``, ``4 = 4``, ``2x = 4``, ``\\pi = 4``, chains
  ``x = 1+1 = 4``) is a ``parse_error``. Against a gold equation, the equations are compared as
  equations.
- partial reads: math-verify must read the whole answer (``1+1 \\to 4`` and ``2**10`` are
  ``parse_error``, not 4 and 2); ``\\approx`` is refused.
- nested boxes: ``\\boxed{\\boxed{7}8}`` is a ``parse_error`` (never the inner 7), and so is
  ``\\boxed{\\boxed{7}}``.
- ``1e3`` is 1000 and ``0.\\overline{3}`` is 1/3 (:mod:`rewards.extract`).
- ``\\frac12``: accepted as 1/2 by default, since it is valid TeX (math-verify's
  ``malformed_operators`` repair on). ``strict=True`` turns the repair off, as open-r1's reward
  does; ``\\frac12`` then fails to parse and scores 0 with ``parse_error``.
- percent signs, degree signs and ``\\text{}`` units after a number are ignored (``10\\%`` = 10 =
  ``10^\\circ``, ``5 \\text{ cm}`` = 5), as math-verify itself does.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from rewards.extract import clean_answer, cleaned_key, completion_text, last_boxed, refusal
from rewards.pool import VerifierPool

__all__ = ["VERIFIER_VERSION", "MathVerifier", "Verdict", "default_verifier", "math_reward"]

VERIFIER_VERSION = f"rltk-math/2 math-verify=={importlib.metadata.version('math-verify')}"
"""Recorded in every report: answer extraction/normalisation rules and the math-verify release
(a parser regression once moved MATH-500 scores by 6 points; docs/algorithms/reference.md §9.1)."""


@dataclass(frozen=True)
class Verdict:
    """One scored completion. ``reason`` is one of :data:`rewards.pool.REASONS`; ``extracted`` is
    the last boxed answer (``None`` when there is none)."""

    reward: float
    correct: bool
    reason: str
    extracted: str | None


def _verdict(correct: bool, reason: str, extracted: str | None) -> Verdict:
    return Verdict(1.0 if correct else 0.0, correct, reason, extracted)


def _gold_answer(answer: object) -> str:
    """The gold answer as text (bytes decoded as UTF-8); a full solution with a box is reduced to
    its last box."""
    answer = completion_text(answer) if isinstance(answer, (bytes, bytearray)) else str(answer)
    boxed = last_boxed(answer)
    return answer if boxed is None else boxed


class MathVerifier:
    """Scores completions against gold answers (see the module docstring).

    Args:
        deadline_s: hard wall-clock limit per math-verify item; overruns score 0 with ``timeout``.
        num_workers: worker processes (default ``min(4, os.cpu_count())``).
        strict: turn off math-verify's ``malformed_operators`` repair (``\\frac12`` fails).
        cache_size: verdicts cached for repeated (gold, answer) pairs.

    Workers start on first use and stop at :meth:`close`, at exit of a ``with`` block or at
    interpreter exit.
    """

    def __init__(
        self,
        deadline_s: float = 5.0,
        num_workers: int | None = None,
        strict: bool = False,
        cache_size: int = 65536,
    ) -> None:
        self.pool = VerifierPool(num_workers, deadline_s, strict, cache_size)

    def __enter__(self) -> MathVerifier:
        self.pool.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.pool.close()

    def score(self, completions: Sequence[object], answers: Sequence[object]) -> list[Verdict]:
        """A :class:`Verdict` per completion, given its gold answer (same order and length).
        Completions may be strings, bytes or chat message lists
        (:func:`~rewards.extract.completion_text`); none of them raises."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        extracted = [last_boxed(completion_text(completion)) for completion in completions]
        gold_texts = [_gold_answer(answer) for answer in answers]
        cleaned_golds = {text: clean_answer(text) for text in set(gold_texts)}  # a group shares one
        golds = [cleaned_golds[text] for text in gold_texts]
        preds = [None if pred is None else clean_answer(pred) for pred in extracted]
        verdicts = [
            self._fast_verdict(gold, pred, raw) for gold, pred, raw in zip(golds, preds, extracted)
        ]
        pending = [i for i, verdict in enumerate(verdicts) if verdict is None]
        pairs = [(golds[i], preds[i]) for i in pending]
        for i, (correct, reason) in zip(pending, self.pool.verify(pairs)):
            verdicts[i] = _verdict(correct, reason, extracted[i])
        return verdicts

    @staticmethod
    def _fast_verdict(gold: str, pred: str | None, extracted: str | None) -> Verdict | None:
        """``no_answer``, a refused answer (``parse_error``) or an exact normalised match (both
        cleaned); ``None`` when math-verify must decide."""
        key = None if pred is None else cleaned_key(pred)
        if not key:
            return _verdict(False, "no_answer", extracted)
        if refusal(pred) or refusal(gold):
            return _verdict(False, "parse_error", extracted)
        if key == cleaned_key(gold):
            return _verdict(True, "ok", extracted)
        return None

    def equivalence_classes(self, answers: Sequence[str | None]) -> list[int | None]:
        """Group extracted answers by mathematical equivalence (for maj@k).

        Class ids count up from 0 in order of first appearance; ``None`` and empty answers get
        ``None``. Answers with equal normalised keys share a class; each other distinct answer is
        compared (math-verify, the class's first answer as gold) with the classes so far and joins
        the first that matches (greedy: math-verify's equivalence is not guaranteed transitive).
        An answer math-verify cannot read, one the grader refuses (a nested box, an equation that
        is not ``variable = value``, ...), or one that times out on its own, only matches equal
        keys.
        """
        cleaned = [None if a is None else clean_answer(a) for a in answers]
        keys = [None if c is None else cleaned_key(c) or None for c in cleaned]
        firsts: dict[str, str] = {}  # key -> cleaned first answer with that key, in order
        for key, answer in zip(keys, cleaned):
            if key and key not in firsts:
                firsts[key] = answer
        checked = [first for first in firsts.values() if not refusal(first)]
        verdicts = dict(zip(checked, self.pool.verify([(first, first) for first in checked])))
        readable = [verdicts.get(first, (False, "parse_error")) for first in firsts.values()]
        class_of: dict[str, int] = {}
        num_classes = 0
        representatives: list[tuple[int, str]] = []  # (class id, first answer) of readable classes
        for (key, first), (is_readable, _) in zip(firsts.items(), readable):
            class_id = self._match(first, representatives) if is_readable else None
            if class_id is None:
                class_id, num_classes = num_classes, num_classes + 1
                if is_readable:
                    representatives.append((class_id, first))
            class_of[key] = class_id
        return [None if key is None else class_of[key] for key in keys]

    def _match(self, answer: str, representatives: list[tuple[int, str]]) -> int | None:
        """The first class whose representative math-verify finds equivalent to ``answer``."""
        verdicts = self.pool.verify([(rep, answer) for _, rep in representatives])
        return next((cid for (cid, _), (ok, _) in zip(representatives, verdicts) if ok), None)


_default_verifier: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide verifier behind :func:`math_reward` (default settings, created lazily)."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            _default_verifier = MathVerifier()
        return _default_verifier


def math_reward(
    completions: Sequence[str | bytes | list[dict]], answer: Sequence[str | None], **kwargs
) -> list[float | None]:
    """TRL-style reward function: 1.0 when the last boxed answer equals the gold ``answer``
    column mathematically, else 0.0; ``None`` where the gold answer is missing. Completions may be
    strings, bytes (decoded as UTF-8, bad bytes replaced) or chat message lists (TRL's
    conversational format: the last assistant message counts); anything else scores 0.0
    (``no_answer``), never an exception. Extra TRL keyword arguments (prompts, ...) are ignored."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    present = [i for i, gold in enumerate(answer) if gold is not None]
    verdicts = default_verifier().score(
        [completion_text(completions[i]) for i in present], [answer[i] for i in present]
    )
    rewards: list[float | None] = [None] * len(completions)
    for i, verdict in zip(present, verdicts):
        rewards[i] = verdict.reward
    return rewards

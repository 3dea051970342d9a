"""Math answer reward: the last boxed answer, checked against the gold answer.

Per completion: take the last balanced ``\\boxed{...}`` (none -> ``no_answer``); if its
:func:`~rewards.extract.normalize_answer` key equals the gold's, it is correct without a worker;
otherwise math-verify decides in a killable worker (:class:`~rewards.pool.VerifierPool`), the gold
parsed first (``verify`` is asymmetric; ALGORITHMS.md §9.1). Timeouts and parse failures score 0
and keep their reason, so metrics can count them.

Decisions (tested in ``tests/test_rewards.py``):
- thousands separators: a whole-answer number with groups of three digits is that number
  (``1,000`` = ``1{,}000`` = ``1\\,000`` = 1000); other commas separate set elements, as
  math-verify reads them (``1,2`` = ``2,1``, ``1,0000`` = {1, 0}); see :mod:`rewards.extract`.
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

from rewards.extract import clean_answer, completion_text, last_boxed, normalize_answer
from rewards.pool import VerifierPool

__all__ = ["VERIFIER_VERSION", "MathVerifier", "Verdict", "default_verifier", "math_reward"]

VERIFIER_VERSION = f"rltk-math/1 math-verify=={importlib.metadata.version('math-verify')}"
"""Recorded in every report: answer extraction/normalisation rules and the math-verify release
(a parser regression once moved MATH-500 scores by 6 points; ALGORITHMS.md §9.1)."""


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


def _gold_answer(answer: str | float) -> str:
    """The gold answer as text; a full solution with a box is reduced to its last box."""
    answer = str(answer)
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

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        """A :class:`Verdict` per completion, given its gold answer (same order and length)."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        extracted = [last_boxed(text) for text in completions]
        golds = [_gold_answer(answer) for answer in answers]
        verdicts = [self._fast_verdict(gold, pred) for gold, pred in zip(golds, extracted)]
        pending = [i for i, verdict in enumerate(verdicts) if verdict is None]
        pairs = [(clean_answer(golds[i]), clean_answer(extracted[i])) for i in pending]
        for i, (correct, reason) in zip(pending, self.pool.verify(pairs)):
            verdicts[i] = _verdict(correct, reason, extracted[i])
        return verdicts

    @staticmethod
    def _fast_verdict(gold: str, extracted: str | None) -> Verdict | None:
        """``no_answer`` or an exact normalised match; ``None`` when math-verify must decide."""
        key = None if extracted is None else normalize_answer(extracted)
        if not key:
            return _verdict(False, "no_answer", extracted)
        if key == normalize_answer(gold):
            return _verdict(True, "ok", extracted)
        return None

    def equivalence_classes(self, answers: Sequence[str | None]) -> list[int | None]:
        """Group extracted answers by mathematical equivalence (for maj@k).

        Class ids count up from 0 in order of first appearance; ``None`` and empty answers get
        ``None``. Answers with equal normalised keys share a class; each other distinct answer is
        compared (math-verify, the class's first answer as gold) with the classes so far and joins
        the first that matches (greedy: math-verify's equivalence is not guaranteed transitive).
        An answer math-verify cannot read, or that times out on its own, only matches equal keys.
        """
        keys = [None if a is None else normalize_answer(a) or None for a in answers]
        firsts: dict[str, str] = {}  # key -> cleaned first answer with that key, in order
        for key, answer in zip(keys, answers):
            if key and key not in firsts:
                firsts[key] = clean_answer(answer)
        readable = self.pool.verify([(first, first) for first in firsts.values()])
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
    completions: Sequence[str | list[dict]], answer: Sequence[str | None], **kwargs
) -> list[float | None]:
    """TRL-style reward function: 1.0 when the last boxed answer equals the gold ``answer``
    column mathematically, else 0.0; ``None`` where the gold answer is missing. Completions may be
    strings or chat message lists. Extra TRL keyword arguments (prompts, ...) are ignored."""
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

"""DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, Eq. 13), a reward function.

With ``max_length`` = L_max and ``buffer`` = L_cache, a completion of |y| tokens (EOS included, as
the trainer's ``completion_ids`` hold them) gets

    R(y) = 0                                  if |y| ≤ L_max − L_cache
    R(y) = ((L_max − L_cache) − |y|) / L_cache if L_max − L_cache < |y| ≤ L_max
    R(y) = −1                                 if |y| > L_max

added to the other rewards with the entry's weight. DAPO's setting: L_max 20,480 (the generation
limit) and L_cache 4,096, so the penalty ramps from 0 at 16,384 tokens to −1 at the limit. Test
vectors (L_max 10, L_cache 4): |y| = 3, 6, 7, 9, 10, 12 → 0, 0, −0.25, −0.75, −1, −1.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["overlong_penalty", "overlong_reward"]


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """R(y) of one completion of ``length`` tokens (module docstring)."""
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / buffer
    return -1.0


def check_overlong_settings(max_length: int = 20480, buffer: int = 4096, **_) -> None:
    """One line unless ``0 < buffer <= max_length`` are integers (called when the recipe loads)."""
    if isinstance(max_length, bool) or isinstance(buffer, bool) or not isinstance(max_length, int) \
            or not isinstance(buffer, int) or not 0 < buffer <= max_length:
        raise ValueError(f"overlong: needs integers 0 < buffer <= max_length, got buffer={buffer!r}, "
                         f"max_length={max_length!r}")


def overlong_reward(completion_ids: Sequence[Sequence[int]], max_length: int = 20480, buffer: int = 4096,
                    **kwargs) -> list[float]:
    """TRL-style reward function: the soft overlong punishment of every completion. Set
    ``max_length`` to the generation limit (``rollout.max_new_tokens``) and ``buffer`` through the
    entry's ``kwargs``: ``rewards: [{name: math}, {name: overlong, kwargs: {max_length: 3072, buffer: 512}}]``."""
    check_overlong_settings(max_length, buffer)
    return [overlong_penalty(len(ids), max_length, buffer) for ids in completion_ids]


overlong_reward.check_settings = check_overlong_settings  # rewards.registry checks the recipe's kwargs with it

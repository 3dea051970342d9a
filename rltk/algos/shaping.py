"""Reward-shaping stages: a term added to each completion's reward before the estimator runs
(``algorithm.shaping``; docs/algorithms/reference.md §0.5)."""
from __future__ import annotations

import torch
from torch import Tensor

from rltk.algos.registry import StageError, register_shaping
from rltk.algos.types import Rollouts


@register_shaping("length_penalty")
def length_penalty(rollouts: Rollouts, *, coef: float = 1.0) -> Tensor:
    """Kimi k1.5's length reward (Kimi Team 2025, arXiv 2501.12599, §2.3.3), scaled by ``coef``.

    Over the completions of one prompt (a group), with len_i the completion's tokens (EOS included)
    and min_len / max_len the group's shortest and longest:

        λ_i = 0.5 − (len_i − min_len) / (max_len − min_len)
        term_i = coef · λ_i            if completion i is correct
        term_i = coef · min(0, λ_i)    otherwise

    so among correct answers the shorter are rewarded and the longer penalised, and a wrong answer is
    only ever penalised, more the longer it is. A group whose completions are all as long gets 0.
    """
    if coef < 0:
        raise StageError(f"length_penalty: coef must be >= 0, got {coef}")
    lengths = rollouts.lengths.to(torch.float64)
    index, groups = rollouts.group_index()
    shortest = torch.full((groups,), float("inf"), dtype=torch.float64).scatter_reduce(0, index, lengths, "amin")
    longest = torch.full((groups,), float("-inf"), dtype=torch.float64).scatter_reduce(0, index, lengths, "amax")
    spread = (longest - shortest)[index]
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))  # a flat group divides by 1, then gets 0
    lam = torch.where(spread > 0, 0.5 - (lengths - shortest[index]) / safe, torch.zeros_like(lengths))
    term = torch.where(rollouts.correct, lam, lam.clamp(max=0.0))
    return (coef * term).to(torch.float32)

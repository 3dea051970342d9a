"""PSR, NSR and W-REINFORCE: positive / negative sample reinforcement (docs/algorithms/reference.md §1).

Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning"
(arXiv 2506.01347; authors' code: github.com/TianHongZXY/RLVR-Decomposed). The RLVR objective with ±1 rewards
splits into a positive part (PSR: raise the likelihood of correct samples) and a negative part
(NSR: lower the likelihood of wrong samples); W-REINFORCE weights them as λ·PSR + NSR:

    estimator     correct     wrong
    psr           +1          dropped
    nsr           dropped     −1
    w_reinforce   +λ          −1

No group baseline and no std: the sign comes from the verifier's ``rollouts.correct`` (never from
the possibly shaped rewards). The rule "a group of one has advantage 0" (docs/algorithms/reference.md §0)
exists for baselines; these estimators have none, so a lone completion keeps its +1 / −1 / +λ.

"Dropped" means ``Advantages.keep`` is False: the completion leaves the loss *and* the
aggregation normaliser, which differs from a zero advantage under ``token_mean``. ``drop=False``
zeroes instead (the other half of the batch still counts in the token normaliser).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rltk.algos.registry import StageError, register_advantage
from rltk.algos.types import Advantages, Rollouts


def _check_drop(name: str, drop: object) -> None:
    if not isinstance(drop, bool):
        raise StageError(f"{name}: drop must be true or false, got {drop!r}")


def _share(mask: Tensor) -> float:
    return float(mask.double().mean()) if mask.numel() else 0.0


def _one_sided(rollouts: Rollouts, reinforce_correct: bool, drop: bool) -> Advantages:
    """+1 on correct (PSR) or −1 on wrong (NSR); the other side dropped or zeroed."""
    correct = rollouts.correct.bool()
    side = correct if reinforce_correct else ~correct
    sign = 1.0 if reinforce_correct else -1.0
    values = torch.where(side, sign, 0.0).to(rollouts.rewards.dtype)
    keep = side if drop else None
    metrics = {"kept_share": _share(side) if drop else 1.0, "correct_share": _share(correct)}
    return Advantages(values.detach(), keep=keep, metrics=metrics)


@register_advantage("psr")
def psr(rollouts: Rollouts, *, drop: bool = True) -> Advantages:
    """Positive Sample Reinforcement (Zhu et al. 2025, the L_PSR half of the decomposed RLVR
    objective): A = +1 on correct completions; wrong completions are dropped (``drop=True``, what
    the authors ran) or get A = 0.
    """
    _check_drop("psr", drop)
    return _one_sided(rollouts, reinforce_correct=True, drop=drop)


@register_advantage("nsr")
def nsr(rollouts: Rollouts, *, drop: bool = True) -> Advantages:
    """Negative Sample Reinforcement (Zhu et al. 2025, the L_NSR half of the decomposed RLVR
    objective): A = −1 on wrong completions; correct completions are dropped (``drop=True``, what
    the authors ran) or get A = 0.
    An all-wrong group still gets −1 (a group baseline would give 0).
    """
    _check_drop("nsr", drop)
    return _one_sided(rollouts, reinforce_correct=False, drop=drop)


@register_advantage("w_reinforce")
def w_reinforce(rollouts: Rollouts, *, lam: float = 0.1) -> Advantages:
    """Weighted-REINFORCE (Zhu et al. 2025, the objective that upweights NSR): λ·PSR + NSR, i.e.
    A = +λ on correct and −1 on wrong completions; nothing is dropped.

    ``lam`` is the paper's λ (default 0.1, the paper's choice); the recipe key is ``lam`` because
    ``lambda`` is a Python keyword.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise StageError(f"w_reinforce: lam must be a finite number >= 0, got {lam!r}")
    correct = rollouts.correct.bool()
    values = torch.where(correct, float(lam), -1.0).to(rollouts.rewards.dtype)
    return Advantages(values.detach(), metrics={"correct_share": _share(correct)})

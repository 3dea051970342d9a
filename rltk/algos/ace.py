"""ACE: asymmetric confidence-aware error penalty (docs/algorithms/reference.md §2).

Xu et al. 2026, "Overconfident Errors Need Stronger Correction" (arXiv 2602.21420; no public code).
A modifier applied after any estimator. Each completion's confidence shift is the sequence
log-ratio of the sampling policy to the reference,

    c_i = Σ_t (old_logp − ref_logp)    over the completion mask (detached),

and only **wrong** completions are modulated:

    multiplicative (default):  Â_i = A_i · m_i          m_i = 1 + α·f(c_i)
    additive:                  Â_i = A_i − (m_i − 1)    i.e. A_i − α·f(c_i)

with f = softplus (default; beat ReLU in the paper) or relu, and m_i optionally capped at
``max_multiplier`` (the same cap bounds the additive penalty at ``max_multiplier − 1``). The form
is reconstructed from the abstract and secondary summaries (docs/algorithms/reference.md §2 says so); ``alpha``'s
default 1.0 is not published. The rule follows the spec literally: a wrong completion whose
incoming advantage is positive (possible with shaped rewards) is scaled too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rltk.algos.registry import StageError, register_modifier
from rltk.algos.types import Advantages, Rollouts

_FNS = {"softplus": F.softplus, "relu": torch.relu}
_FORMS = ("multiplicative", "additive")
_REDUCTIONS = ("sum", "mean")


def _check_knobs(alpha: float, fn: str, form: str, c_reduction: str, max_multiplier: float | None) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise StageError(f"ace: alpha must be a finite number >= 0, got {alpha!r}")
    if fn not in _FNS:
        raise StageError(f"ace: fn must be softplus or relu, got {fn!r}")
    if form not in _FORMS:
        raise StageError(f"ace: form must be multiplicative or additive, got {form!r}")
    if c_reduction not in _REDUCTIONS:
        raise StageError(f"ace: c_reduction must be sum or mean, got {c_reduction!r}")
    if max_multiplier is not None and (
        isinstance(max_multiplier, bool)
        or not isinstance(max_multiplier, (int, float))
        or not max_multiplier >= 1  # also rejects nan
    ):
        raise StageError(f"ace: max_multiplier must be null or a number >= 1, got {max_multiplier!r}")


def confidence_shift(rollouts: Rollouts, c_reduction: str = "sum") -> Tensor:
    """c_i = Σ_t mask·(old_logp − ref_logp) (``sum``) or its per-token mean (``mean``), float64 [N].

    An empty completion has c = 0.
    """
    if rollouts.old_logps is None or rollouts.ref_logps is None:
        raise StageError("ace: rollouts lack old_logps/ref_logps; the trainer must compute the stage's needs")
    mask = rollouts.completion_mask.double()
    log_ratio = (rollouts.old_logps.detach().double() - rollouts.ref_logps.detach().double()) * mask
    c = log_ratio.sum(-1)
    if c_reduction == "mean":
        c = c / mask.sum(-1).clamp(min=1)
    return c


def _metrics(c: Tensor, multiplier: Tensor, wrong: Tensor) -> dict[str, float]:
    """Over the wrong completions that enter the loss; neutral values when there are none."""
    if not bool(wrong.any()):
        return {"overconfident_share": 0.0, "mean_multiplier": 1.0, "max_multiplier": 1.0}
    return {
        "overconfident_share": float((c[wrong] > 0).double().mean()),
        "mean_multiplier": float(multiplier[wrong].mean()),
        "max_multiplier": float(multiplier[wrong].max()),
    }


@register_modifier("ace", needs={"old_logps", "ref_logps"})
def ace(
    rollouts: Rollouts,
    advantages: Advantages,
    *,
    alpha: float = 1.0,
    fn: str = "softplus",
    form: str = "multiplicative",
    c_reduction: str = "sum",
    max_multiplier: float | None = None,
) -> Advantages:
    """ACE (Xu et al. 2026, arXiv 2602.21420; docs/algorithms/reference.md §2): scale wrong completions'
    advantages by m = 1 + α·f(c), c the sampling-vs-reference sequence log-ratio.

    Works on ``[N]`` or ``[N, T]`` advantages (the multiplier is per completion). Needs ref logps
    every step, even when the KL coefficient is 0. ``c_reduction``: ``sum`` is the paper's
    definition, ``mean`` is length-normalised. Metrics (over kept wrong completions):
    ``overconfident_share`` (c > 0), ``mean_multiplier``, ``max_multiplier``.
    """
    _check_knobs(alpha, fn, form, c_reduction, max_multiplier)
    c = confidence_shift(rollouts, c_reduction)
    multiplier = 1.0 + alpha * _FNS[fn](c)
    if max_multiplier is not None:
        multiplier = multiplier.clamp(max=float(max_multiplier))
    wrong = ~rollouts.correct.bool()
    multiplier = torch.where(wrong, multiplier, torch.ones_like(multiplier))

    values = advantages.values.detach()
    factor = multiplier if values.dim() == 1 else multiplier.unsqueeze(-1)
    if form == "multiplicative":
        new = values.double() * factor
    else:
        new = values.double() - (factor - 1.0)
    metrics = _metrics(c, multiplier, wrong & advantages.kept())
    return Advantages(new.to(values.dtype).detach(), keep=advantages.keep, metrics=metrics)

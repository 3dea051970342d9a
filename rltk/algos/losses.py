"""Per-token policy losses (docs/algorithms/reference.md §0.2), before aggregation.

Each is ``(logps, rollouts, advantages, **params) -> LossOutput``; ``logps`` [N, T] carry the
gradient. The ratio ρ = exp(logp − old_logp) is 1 in value when the batch is on-policy (no
``old_logps`` requested), but its gradient still flows (ρ = exp(logp − sg(logp))).
"""
from __future__ import annotations

import torch
from torch import Tensor

from rltk.algos.registry import check_number, register_loss
from rltk.algos.types import Advantages, LossOutput, Rollouts


def _check_clip(stage: str, epsilon_low: object, epsilon_high: object) -> None:
    """ε_low in [0, 1] (the ratio's lower bound 1 − ε_low stays in [0, 1]; 1 = no lower clip), ε_high >= 0."""
    check_number(stage, "epsilon_low", epsilon_low, "in [0, 1]", lambda v: 0 <= v <= 1)
    check_number(stage, "epsilon_high", epsilon_high, ">= 0", lambda v: v >= 0)


def _old(logps: Tensor, rollouts: Rollouts) -> Tensor:
    return logps.detach() if rollouts.old_logps is None else rollouts.old_logps


def _clipped_objective(
    ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> LossOutput:
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    loss = -torch.min(unclipped, clipped)
    metrics = {
        "clip_low": ((ratio < 1 - eps_low) & (adv < 0)).float(),
        "clip_high": ((ratio > 1 + eps_high) & (adv > 0)).float(),
    }
    if dual_clip is not None:
        capped = torch.min(loss, -dual_clip * adv)
        dual = (adv < 0) & (capped < loss)
        loss = torch.where(adv < 0, capped, loss)
        metrics["clip_dual"] = dual.float()
    return LossOutput(loss, metrics)


@register_loss("ppo_clip")
def ppo_clip(
    logps: Tensor,
    rollouts: Rollouts,
    advantages: Advantages,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    dual_clip: float | None = None,
) -> LossOutput:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7) with asymmetric ε (DAPO's clip-higher,
    Yu et al. 2025) and optional dual clip c > 1 (Ye et al. 2020): for A < 0 the loss is capped at −c·A.
    """
    _check_clip("ppo_clip", epsilon_low, epsilon_high)
    if dual_clip is not None:  # c <= 1 would cap the loss below the clipped objective itself
        check_number("ppo_clip", "dual_clip", dual_clip, "> 1 (or null)", lambda v: v > 1)
    ratio = torch.exp(logps - _old(logps, rollouts))
    adv = advantages.per_token(logps.shape[1])
    return _clipped_objective(ratio, adv, epsilon_low, epsilon_high, dual_clip)


@register_loss("gspo")
def gspo(
    logps: Tensor,
    rollouts: Rollouts,
    advantages: Advantages,
    *,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
) -> LossOutput:
    """GSPO (Zheng et al. 2025, Eq. 5–7): the clipped objective with the sequence ratio
    s_i = exp(mean_t(logp − old_logp)), broadcast to every token. Defaults are the paper's ε.
    """
    _check_clip("gspo", epsilon_low, epsilon_high)
    mask = rollouts.completion_mask
    log_ratio = (logps - _old(logps, rollouts)) * mask
    seq_log_ratio = log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)
    ratio = torch.exp(seq_log_ratio).unsqueeze(-1).expand_as(logps)
    adv = advantages.per_token(logps.shape[1])
    return _clipped_objective(ratio, adv, epsilon_low, epsilon_high, None)


@register_loss("cispo")
def cispo(
    logps: Tensor, rollouts: Rollouts, advantages: Advantages, *, epsilon_max: float = 5.0
) -> LossOutput:
    """CISPO (MiniMax-M1, 2025, Eq. 4): −sg(min(ρ, ε_max))·A·logp — the importance weight is
    clipped and detached, so every token keeps a gradient.
    """
    check_number("cispo", "epsilon_max", epsilon_max, "> 0", lambda v: v > 0)
    ratio = torch.exp(logps.detach() - _old(logps, rollouts))
    weight = torch.clamp(ratio, max=epsilon_max)
    adv = advantages.per_token(logps.shape[1])
    return LossOutput(-weight * adv * logps, {"clip_high": (ratio > epsilon_max).float()})


@register_loss("reinforce")
def reinforce_loss(logps: Tensor, rollouts: Rollouts, advantages: Advantages) -> LossOutput:
    """REINFORCE (Williams 1992): −A·logp, no ratio and no clipping."""
    return LossOutput(-advantages.per_token(logps.shape[1]) * logps)

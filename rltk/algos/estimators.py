"""Base advantage estimators (docs/algorithms/reference.md §0.1).

Each is a pure function ``(rollouts, **params) -> Advantages`` with one value per completion,
detached. Statistics are over whole groups; std is the unbiased sample std (ddof=1) plus eps; a
group of one completion has advantage 0.
"""
from __future__ import annotations

import torch

from rltk.algos.registry import StageError, check_number, register_advantage
from rltk.algos.types import Advantages, Rollouts, flat_groups, group_stats


def _zero_variance_share(rewards, index, groups: int, size) -> float:
    """Share of groups (of two or more completions) whose rewards are all equal."""
    multi = size > 1
    flat = flat_groups(rewards, index, groups)[index]
    per_row = (flat & multi).double() / size  # each group's rows add up to one group
    return float(per_row.sum() / (multi.double() / size).sum().clamp(min=1))


@register_advantage("grpo", group_baseline=True)
def grpo(rollouts: Rollouts, *, scale: str = "group", eps: float = 1e-6) -> Advantages:
    """GRPO (Shao et al. 2024, DeepSeekMath, Eq. 3): (r − mean_g r) / (std_g r + eps).

    ``scale``: ``group`` divides by the group's std (the paper), ``batch`` by the std of the whole
    batch (Hu et al. 2025, REINFORCE++-baseline), ``none`` does not divide (= ``dr_grpo``).
    """
    if scale not in ("group", "batch", "none"):
        raise StageError(f"grpo: scale must be group, batch or none, got '{scale}'")
    check_number("grpo", "eps", eps, "> 0 (an all-equal group has std 0)", lambda v: v > 0)
    index, groups = rollouts.group_index()
    mean, std, size = group_stats(rollouts.rewards, index, groups)
    centred = rollouts.rewards.double() - mean
    if scale == "group":
        values = centred / (std + eps)
    elif scale == "batch":
        batch_std = rollouts.rewards.double().std() if rollouts.num_completions > 1 else centred.new_tensor(0.0)
        values = centred / (batch_std + eps)
    else:
        values = centred
    values = torch.where(size > 1, values, torch.zeros_like(values))
    metrics = {"zero_variance_groups": _zero_variance_share(rollouts.rewards, index, groups, size)}
    return Advantages(values.to(rollouts.rewards.dtype).detach(), metrics=metrics)


@register_advantage("dr_grpo", group_baseline=True)
def dr_grpo(rollouts: Rollouts) -> Advantages:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): r − mean_g r, no std."""
    return grpo(rollouts, scale="none")


@register_advantage("rloo", group_baseline=True)
def rloo(rollouts: Rollouts) -> Advantages:
    """RLOO (Ahmadian et al. 2024): r_i − mean_{j≠i} r_j = G/(G−1)·(r_i − mean_g r)."""
    index, groups = rollouts.group_index()
    mean, std, size = group_stats(rollouts.rewards, index, groups)
    values = (rollouts.rewards.double() - mean) * size / (size - 1).clamp(min=1)
    values = torch.where(size > 1, values, torch.zeros_like(values))
    metrics = {"zero_variance_groups": _zero_variance_share(rollouts.rewards, index, groups, size)}
    return Advantages(values.to(rollouts.rewards.dtype).detach(), metrics=metrics)


@register_advantage("reinforce")
def reinforce(rollouts: Rollouts, *, baseline: str = "none") -> Advantages:
    """REINFORCE (Williams 1992): the raw reward, optionally minus the batch-mean reward.

    ``baseline``: ``none`` or ``batch_mean``.
    """
    if baseline not in ("none", "batch_mean"):
        raise StageError(f"reinforce: baseline must be none or batch_mean, got '{baseline}'")
    values = rollouts.rewards.clone()
    if baseline == "batch_mean":
        values = values - values.mean()
    return Advantages(values.detach())

"""Filters: modifiers that only drop completions from the loss (docs/algorithms/reference.md §0.4)."""
from __future__ import annotations

from dataclasses import replace

from rltk.algos.registry import register_modifier
from rltk.algos.types import Advantages, Rollouts, flat_groups


@register_modifier("zero_variance_filter")
def zero_variance_filter(rollouts: Rollouts, advantages: Advantages) -> Advantages:
    """Drop groups whose rewards are all equal (DAPO's dynamic-sampling filter, without refill)."""
    index, groups = rollouts.group_index()
    keep = ~flat_groups(rollouts.rewards, index, groups)[index]
    metrics = {"dropped": float((~keep).double().mean())}
    return replace(advantages, keep=advantages.combine_keep(keep), metrics=metrics)


@register_modifier("mask_truncated")
def mask_truncated(rollouts: Rollouts, advantages: Advantages) -> Advantages:
    """Drop completions that hit the length limit without EOS (DAPO's overlong filtering)."""
    keep = ~rollouts.truncated
    metrics = {"dropped": float(rollouts.truncated.double().mean())}
    return replace(advantages, keep=advantages.combine_keep(keep), metrics=metrics)

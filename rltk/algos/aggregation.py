"""Aggregations: per-token losses -> one scalar (docs/algorithms/reference.md §0.3).

The normaliser is computed once per optimizer step over every micro-batch and every rank and
passed in, so the step loss and gradient do not depend on how the step is cut into micro-batches.
Each normaliser is additive over rows: the trainer sums it over micro-batches and ranks.
"""
from __future__ import annotations

from torch import Tensor

from rltk.algos.registry import register_aggregation


def _token_count(mask: Tensor, max_completion_length: int) -> float:
    return float(mask.sum())


def _sequence_count(mask: Tensor, max_completion_length: int) -> float:
    return float((mask.sum(-1) > 0).sum())


def _sequence_budget(mask: Tensor, max_completion_length: int) -> float:
    return _sequence_count(mask, max_completion_length) * max_completion_length


@register_aggregation("token_mean", normalizer=_token_count)
def token_mean(per_token_loss: Tensor, mask: Tensor, normalizer: float) -> Tensor:
    """Σ loss over all tokens of the step / Σ tokens of the step (DAPO, Yu et al. 2025, Eq. 8)."""
    return (per_token_loss * mask).sum() / normalizer


@register_aggregation("seq_mean_token_mean", normalizer=_sequence_count)
def seq_mean_token_mean(per_token_loss: Tensor, mask: Tensor, normalizer: float) -> Tensor:
    """Mean over sequences of each sequence's token mean (GRPO, Shao et al. 2024, Eq. 3)."""
    per_sequence = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sequence.sum() / normalizer


@register_aggregation("seq_mean_token_sum_norm", normalizer=_sequence_budget)
def seq_mean_token_sum_norm(per_token_loss: Tensor, mask: Tensor, normalizer: float) -> Tensor:
    """Σ loss / (num_sequences · max_completion_length) (Dr. GRPO, Liu et al. 2025)."""
    return (per_token_loss * mask).sum() / normalizer

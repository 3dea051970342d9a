"""The tensors that flow through the advantage/loss stage (docs/design.md §4).

`Rollouts` holds one row per completion; the completions of one prompt (a *group*) are
contiguous and never split. `Advantages` is what estimators and modifiers return.
Both are frozen: a stage returns a new object instead of mutating its input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rollouts:
    """A batch of scored completions, plus whatever extra forwards the stages asked for.

    Shapes: N completions, T completion tokens (right-padded), H hidden size.
    Optional fields are ``None`` unless a selected stage declared it ``needs`` them.
    """

    group_ids: Tensor  # long [N]; equal ids = same prompt; groups contiguous
    rewards: Tensor  # float [N]; possibly shaped
    correct: Tensor  # bool [N]; the verifier's outcome, never shaped
    completion_mask: Tensor  # float [N, T]; 1 on completion tokens (EOS included), 0 on padding
    truncated: Tensor  # bool [N]; hit max_new_tokens without EOS
    old_logps: Tensor | None = None  # [N, T] behaviour-policy per-token log-probs
    ref_logps: Tensor | None = None  # [N, T] reference-model per-token log-probs
    hidden: Tensor | None = None  # [N, T, H] hidden state predicting each completion token
    answer_logps: Tensor | None = None  # [N] log p(gold answer | prompt, completion)
    roles: tuple[str, ...] | None = None  # one role per group, in group order (e.g. "pos"/"neg")
    entropy: Tensor | None = None  # [N, T] current-policy token entropy, with grad, per micro-batch
    is_weights: Tensor | None = None  # [N, T] sampler→trainer importance weights (rltk.algos.importance)
    step: int = 0  # optimizer steps taken before this rollout batch's first update (seeds PAFT's draw)
    extra: dict[str, Any] = field(default_factory=dict)  # room for user stages

    @property
    def num_completions(self) -> int:
        return int(self.group_ids.shape[0])

    @property
    def lengths(self) -> Tensor:
        """Completion lengths in tokens, float [N]."""
        return self.completion_mask.sum(-1)

    def group_index(self) -> tuple[Tensor, int]:
        """Dense group index in [0, num_groups) for every row, and the number of groups."""
        _, inverse = torch.unique_consecutive(self.group_ids, return_inverse=True)
        return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0

    def select(self, index: Tensor) -> "Rollouts":
        """Rows ``index`` (a long or bool tensor) of every per-row tensor.

        Roles are per group and are dropped unless ``index`` keeps whole groups in order.
        """
        if index.dtype == torch.bool:
            index = index.nonzero(as_tuple=True)[0]
        updates: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                updates[f.name] = value[index]
        if self.roles is not None:
            dense, _ = self.group_index()
            kept = torch.unique_consecutive(dense[index]).tolist()
            updates["roles"] = tuple(self.roles[g] for g in kept)
        return replace(self, **updates)


@dataclass(frozen=True)
class Advantages:
    """Advantages per completion ``[N]`` or per token ``[N, T]``.

    ``keep`` drops completions from the loss *and* from the aggregation normaliser (so dropping
    differs from zeroing under token_mean); ``None`` keeps all. ``metrics`` are logged by the
    trainer under the stage's name. ``answer_sft_weights`` ``[N]`` (detached), when an estimator
    sets it, weights the SFT term on the gold answer after each completion (GARL's pathwise term in
    likelihood mode, docs/algorithms/reference.md §5); the pipeline carries it through modifiers that drop it.
    """

    values: Tensor
    keep: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    answer_sft_weights: Tensor | None = None

    def per_token(self, num_tokens: int) -> Tensor:
        """Values broadcast to ``[N, T]``."""
        if self.values.dim() == 2:
            return self.values
        return self.values.unsqueeze(-1).expand(-1, num_tokens)

    def kept(self) -> Tensor:
        """Bool ``[N]`` of completions that enter the loss."""
        if self.keep is None:
            return torch.ones(self.values.shape[0], dtype=torch.bool, device=self.values.device)
        return self.keep

    def combine_keep(self, keep: Tensor | None) -> Tensor | None:
        """This object's ``keep`` and-ed with another mask (``None`` = keep all)."""
        if keep is None:
            return self.keep
        return keep if self.keep is None else self.keep & keep


@dataclass(frozen=True)
class LossOutput:
    """A loss returns its per-token loss ``[N, T]`` and optional metrics.

    Each metric is a per-token tensor ``[N, T]`` (e.g. 1.0 where the ratio was clipped); the
    trainer averages it over the kept completion tokens of the whole step.
    """

    per_token: Tensor
    token_metrics: dict[str, Tensor] = field(default_factory=dict)


def flat_groups(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """bool [num_groups]: all of the group's values are equal (a group of one is flat), compared
    exactly as max == min. A zero ``group_stats`` std is not exact: the mean is formed as total / size,
    so a flat group such as three rewards of 0.1 in float64 gets a std of about 1e-17. Used wherever
    rltk asks "do this group's rewards differ" (zero_variance_filter, dynamic sampling, metrics)."""
    high = torch.full((num_groups,), -math.inf, dtype=values.dtype, device=values.device)
    low = torch.full((num_groups,), math.inf, dtype=values.dtype, device=values.device)
    high = high.scatter_reduce(0, group_index, values, "amax")
    return high == low.scatter_reduce(0, group_index, values, "amin")


def group_stats(values: Tensor, group_index: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row group mean, unbiased group std (ddof=1; 0 for a group of one) and group size.

    Used by every group-baseline estimator (docs/algorithms/reference.md, notation).
    """
    values = values.double()
    ones = torch.ones_like(values)
    size = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group_index, ones)
    total = torch.zeros_like(size).index_add_(0, group_index, values)
    mean = total / size
    centred = values - mean[group_index]
    sq = torch.zeros_like(size).index_add_(0, group_index, centred**2)
    std = torch.where(size > 1, (sq / (size - 1).clamp(min=1)).sqrt(), torch.zeros_like(size))
    return mean[group_index], std[group_index], size[group_index]

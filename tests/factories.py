"""Builders of small Rollouts shared by the stage tests."""
from __future__ import annotations

import torch

from rltk.algos.types import Rollouts


def make_rollouts(rewards, lengths=None, correct=None, group_ids=None, truncated=None, width=None,
                  dtype=torch.float64, **extra) -> Rollouts:
    """Rollouts of len(rewards) completions with the given token lengths (default 1 each).

    ``correct`` defaults to reward > 0, ``group_ids`` to one group, ``truncated`` to none;
    ``extra`` sets optional fields (old_logps, ref_logps, hidden, roles, ...).
    """
    rewards = torch.tensor(rewards, dtype=dtype)
    n = rewards.shape[0]
    lengths = lengths if lengths is not None else [1] * n
    width = width or max(max(lengths), 1)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(dtype)
    return Rollouts(
        group_ids=torch.tensor(group_ids if group_ids is not None else [0] * n),
        rewards=rewards,
        correct=torch.tensor(correct) if correct is not None else rewards > 0,
        completion_mask=mask,
        truncated=torch.tensor(truncated) if truncated is not None else torch.zeros(n, dtype=torch.bool),
        **extra,
    )

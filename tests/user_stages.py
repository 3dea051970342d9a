"""User stages selected by import path in tests (``tests.user_stages:fn``), as a recipe would."""
from __future__ import annotations

import threading

import torch

from rltk.algos.types import Advantages, Rollouts


def double_reward(rollouts: Rollouts, *, factor: float = 2.0) -> Advantages:
    """An estimator: A = factor · r."""
    return Advantages(rollouts.rewards * factor, metrics={"factor": factor})


def needs_ref(rollouts: Rollouts, advantages: Advantages) -> Advantages:
    """A modifier that declares a need through a ``needs`` attribute."""
    return Advantages(advantages.values, keep=advantages.keep)


needs_ref.needs = {"ref_logps"}


def plain_sum(per_token_loss: torch.Tensor, mask: torch.Tensor, normalizer: float) -> torch.Tensor:
    """An aggregation without a ``normalizer`` attribute: rejected."""
    return (per_token_loss * mask).sum()


NOT_CALLABLE = 3


def digit_share_reward(completions, **columns):
    """A dense TRL-style reward for tests: the share of digits in the completion, so even a
    random-init model gets varied rewards (and non-zero advantages)."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


def alternating_unless_even_answer(completions, answer, **columns):
    """Dynamic-sampling tests: 0, 1, 0, 1, ... over the batch's completions (so every group of an
    even size has rewards that differ), except 0 for every completion of a prompt whose answer is
    even (a group with equal rewards)."""
    return [0.0 if int(a) % 2 == 0 else float(k % 2) for k, a in enumerate(answer)]


RELEASE_HANGING_REWARD = threading.Event()


def hanging_reward(completions, **columns):
    """A reward function that hangs until the test sets ``RELEASE_HANGING_REWARD``."""
    RELEASE_HANGING_REWARD.wait(timeout=60)
    return [0.0] * len(completions)


def raising_reward(completions, **columns):
    """A reward function that fails (tests of how a failure reaches the user)."""
    raise ValueError("no reward today")

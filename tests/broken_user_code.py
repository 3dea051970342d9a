"""Broken user stages and reward functions, selected by import path (``tests.broken_user_code:fn``)
in tests/reliability/test_user_code.py. Each one fails in one way a user's code does; rltk must
report every failure on one line naming the stage or reward, the function and (in training) the
step. Modules with a syntax error or that raise while imported are written by the tests."""
from __future__ import annotations

import torch

from rltk.algos.samplers import Sampler
from rltk.algos.types import Advantages, LossOutput, Rollouts


class StageBug(RuntimeError):
    pass


# ---------------------------------------------------------------- estimators and modifiers
def raising_estimator(rollouts: Rollouts) -> Advantages:
    raise StageBug("my estimator is broken")


def list_estimator(rollouts: Rollouts):
    """Returns a plain list instead of Advantages."""
    return [0.0] * rollouts.num_completions


def wrong_length_estimator(rollouts: Rollouts) -> Advantages:
    """One value too many."""
    return Advantages(torch.zeros(rollouts.num_completions + 1))


def int_estimator(rollouts: Rollouts) -> Advantages:
    """Integer advantages."""
    return Advantages(torch.zeros(rollouts.num_completions, dtype=torch.long))


def bad_keep_modifier(rollouts: Rollouts, advantages: Advantages) -> Advantages:
    """``keep`` as floats instead of bools."""
    return Advantages(advantages.values, keep=torch.ones(rollouts.num_completions))


def estimator_failing_from_step_2(rollouts: Rollouts) -> Advantages:
    """Works on the load-time check batch and on step 1; raises on the batch of step 2."""
    if rollouts.step >= 1:
        raise KeyError("missing_column")
    return Advantages(rollouts.rewards - rollouts.rewards.mean())


# ---------------------------------------------------------------- losses, terms, aggregations
def scalar_loss(logps: torch.Tensor, rollouts: Rollouts, advantages: Advantages) -> torch.Tensor:
    """Averages itself: a scalar instead of per-token values."""
    return -(advantages.per_token(logps.shape[1]) * logps).mean()


def dict_loss(logps: torch.Tensor, rollouts: Rollouts, advantages: Advantages):
    return {"loss": -logps}


def bad_metric_loss(logps: torch.Tensor, rollouts: Rollouts, advantages: Advantages) -> LossOutput:
    return LossOutput(-logps, {"ratio": 1.0})


def raising_term(logps: torch.Tensor, rollouts: Rollouts, advantages: Advantages) -> torch.Tensor:
    return logps @ logps  # a shape error inside the user's code


def loss_failing_from_step_2(logps: torch.Tensor, rollouts: Rollouts, advantages: Advantages) -> torch.Tensor:
    """Works on the load-time check batch and on step 1; raises on step 2."""
    if rollouts.step >= 1:
        raise StageBug("division by a zero-length group")
    return -advantages.per_token(logps.shape[1]) * logps


def vector_aggregation(per_token_loss: torch.Tensor, mask: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Forgets to reduce the rows."""
    return (per_token_loss * mask).sum(-1) / normalizer


vector_aggregation.normalizer = lambda mask, max_len: float(mask.sum())


def nan_normalizer_aggregation(per_token_loss: torch.Tensor, mask: torch.Tensor, normalizer: float) -> torch.Tensor:
    return (per_token_loss * mask).sum() / normalizer


nan_normalizer_aggregation.normalizer = lambda mask, max_len: "many"


# ---------------------------------------------------------------- samplers
class RaisingSampler(Sampler):
    """Constructs fine; ``next_indices`` raises."""

    def __init__(self, num_prompts: int, seed: int):
        self.num_prompts = num_prompts

    def next_indices(self, n: int) -> list[int]:
        raise IndexError("sampler ran out of prompts")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------- reward functions
def raising_reward(completions, **columns):
    return [1.0 / 0 for _ in completions]


def short_reward(completions, **columns):
    return [0.0] * (len(completions) - 1)


def string_reward(completions, **columns):
    return ["1.0" for _ in completions]


def nan_reward(completions, **columns):
    return [float("nan") for _ in completions]


def scalar_reward(completions, **columns):
    return 1.0


def positional_only_reward(completions):
    """Does not accept the dataset columns as keyword arguments."""
    return [0.0 for _ in completions]


def tensor_reward(completions, **columns):
    """A 1-D tensor and None values: accepted."""
    return torch.tensor([float(len(c) % 2) for c in completions])


CALLS = {"count": 0}


def reward_failing_from_call_2(completions, **columns):
    """The first call (step 1) works; every later one raises."""
    CALLS["count"] += 1
    if CALLS["count"] >= 2:
        raise ConnectionError("reward server unreachable")
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


class NotASampler:
    """Has the methods, but is no rltk.algos.Sampler: refused when the recipe loads."""

    def __init__(self, num_prompts: int, seed: int):
        self.num_prompts = num_prompts

    def next_indices(self, n: int) -> list[int]:
        return list(range(n))

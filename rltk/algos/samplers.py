"""Prompt samplers: which dataset prompts each RL step uses (docs/design.md §4).

A sampler is a subclass of :class:`Sampler` built as ``cls(num_prompts, seed, **params)``; the
trainer saves its state in every checkpoint so a resumed run sees the same prompts as an
uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from rltk.algos.registry import register_sampler


class ProbeCache(Protocol):
    """Where a probing sampler keeps its probes across resumes (the trainer's is a JSON file in the
    run directory); the sampler itself does no I/O."""

    def load(self, fingerprint: str) -> dict[str, Any]:
        """The probes stored under ``fingerprint``; {} when none are, or another fingerprint's are."""

    def store(self, fingerprint: str, probes: dict[str, Any]) -> None:
        """Replace what is stored with ``probes`` under ``fingerprint``."""


@dataclass
class ProbeContext:
    """What the trainer lends a sampler that selects prompts by the policy's success rate."""

    probe: Callable[[list[int]], list[int]]  # prompt indices -> number of correct of G samples
    group_size: int
    example_ids: list[str]
    cache: ProbeCache
    fingerprint: str = ""  # what the probes depend on (model, data, ...); a mismatching cache is ignored


class Sampler:
    """What the trainer calls on a sampler, and nothing else. ``next_indices``, ``state_dict`` and
    ``load_state_dict`` are required; the rest have defaults a sampler may override."""

    provides_roles = False  # True: every next_indices also sets last_roles, one role per prompt
    last_roles: list[str] | None = None
    wants_outcomes = False  # True: the trainer calls observe() with every visited group's correct count

    def next_indices(self, n: int) -> list[int]:
        """The dataset indices of the next ``n`` prompts."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def attach(self, context: ProbeContext) -> None:
        """Called once before the first batch; samplers that probe the policy keep ``context``."""

    def observe(self, indices: list[int], correct: list[int], group_size: int) -> None:
        """With ``wants_outcomes``: the groups of prompts ``indices`` (over all processes) had
        ``correct`` correct completions of ``group_size``; called after each generation round."""

    def metrics(self) -> dict[str, float]:
        """Logged with every rollout batch."""
        return {}


@register_sampler("uniform")
class UniformSampler(Sampler):
    """Shuffled epochs over the dataset: every prompt once per epoch, order seeded by (seed, epoch)."""

    def __init__(self, num_prompts: int, seed: int, *, shuffle: bool = True):
        if num_prompts <= 0:
            raise ValueError("uniform sampler: the dataset has no prompts")
        self.num_prompts = num_prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_prompts))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_prompts, generator=generator).tolist()

    def next_indices(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.position == self.num_prompts:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), self.num_prompts - self.position)
            out.extend(self._order[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)

"""Prompt samplers: which dataset prompts each RL step uses (DESIGN.md §4).

A sampler is a class ``cls(num_prompts, seed, **params)`` with ``next_indices(n) -> list[int]``,
``state_dict()`` and ``load_state_dict(state)``; the trainer saves its state in every checkpoint
so a resumed run sees the same prompts as an uninterrupted one.
"""
from __future__ import annotations

import torch

from rltk.algos.registry import register_sampler


@register_sampler("uniform")
class UniformSampler:
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

"""Difficulty pools: a sampler that retires prompts the policy always solves and defers those it never
solves, and revisits both at a set rate (docs/pipeline.md, "Difficulty pools").

A prompt whose G completions are all correct (or all wrong) teaches a group-centred estimator
nothing; visiting it again soon is likely to waste the group again. The sampler keeps, per prompt,
a streak: +k after k consecutive all-correct visits, −k after k consecutive all-wrong ones, 0 after
a mixed one. A prompt is **retired** once its streak reaches ``retire_after`` and **deferred** once
it reaches −``defer_after``; both leave the active pool. Each batch takes ``revisit_share`` of its
prompts from the retired and deferred ones (at random), so a prompt the policy has forgotten, or
has learned, comes back: one mixed visit returns it to the active pool. The rest of the batch
walks the active prompts in shuffled epochs, as the ``uniform`` sampler does.

The trainer reports every visited group's number of correct completions through
:meth:`DifficultyPoolSampler.observe` (gathered over processes, so every rank's sampler holds the
same state); the state is in every checkpoint.
"""
from __future__ import annotations

import torch

from rltk.algos.registry import StageError, register_sampler
from rltk.algos.samplers import Sampler, UniformSampler

ACTIVE, RETIRED, DEFERRED = "active", "retired", "deferred"


@register_sampler("difficulty_pools")
class DifficultyPoolSampler(Sampler):
    """Knobs: ``retire_after`` (consecutive all-correct visits before a prompt is retired, default 3),
    ``defer_after`` (consecutive all-wrong visits before it is deferred, default 3; 0 = never), and
    ``revisit_share`` (share of each batch drawn from retired and deferred prompts, default 0.1)."""

    wants_outcomes = True

    def __init__(self, num_prompts: int, seed: int, *, retire_after: int = 3, defer_after: int = 3,
                 revisit_share: float = 0.1):
        if num_prompts <= 0:
            raise StageError("difficulty_pools: the dataset has no prompts")
        if retire_after < 0 or defer_after < 0:
            raise StageError(f"difficulty_pools: retire_after and defer_after must be >= 0 (0 = never), got "
                             f"{retire_after} and {defer_after}")
        if not 0.0 <= revisit_share <= 1.0:
            raise StageError(f"difficulty_pools: revisit_share must be in [0, 1], got {revisit_share}")
        self.num_prompts, self.seed = num_prompts, seed
        self.retire_after, self.defer_after, self.revisit_share = retire_after, defer_after, revisit_share
        self.streak = [0] * num_prompts
        self.pool = [ACTIVE] * num_prompts
        self.walk = UniformSampler(num_prompts, seed)  # the shuffled epochs the active prompts are taken from
        self.batches = self.last_revisits = 0

    def next_indices(self, n: int) -> list[int]:
        self.batches += 1
        parked = [i for i, p in enumerate(self.pool) if p != ACTIVE]
        # with every prompt parked the whole batch revisits (the dataset is learned, or out of reach)
        revisits = n if len(parked) == self.num_prompts else min(len(parked), round(n * self.revisit_share))
        self.last_revisits = revisits
        return self._take_active(n - revisits) + self._draw_parked(parked, revisits)

    def _draw_parked(self, parked: list[int], k: int) -> list[int]:
        """``k`` retired or deferred prompts at random (seeded by the batch; repeats only when
        fewer than ``k`` are parked)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * self.batches)
        out: list[int] = []
        while len(out) < k:
            out += [parked[j] for j in torch.randperm(len(parked), generator=generator)[: k - len(out)].tolist()]
        return out

    def _take_active(self, n: int) -> list[int]:
        """The next ``n`` active prompts of the shuffled epochs (parked ones are skipped)."""
        out: list[int] = []
        while len(out) < n:
            (index,) = self.walk.next_indices(1)
            if self.pool[index] == ACTIVE:
                out.append(index)
        return out

    def observe(self, indices: list[int], correct: list[int], group_size: int) -> None:
        """Update the streaks and pools with each visited group's number of correct completions."""
        for index, count in zip(indices, correct):
            if count == group_size:
                self.streak[index] = max(self.streak[index], 0) + 1
            elif count == 0:
                self.streak[index] = min(self.streak[index], 0) - 1
            else:
                self.streak[index] = 0
            if self.retire_after and self.streak[index] >= self.retire_after:
                self.pool[index] = RETIRED
            elif self.defer_after and -self.streak[index] >= self.defer_after:
                self.pool[index] = DEFERRED
            else:
                self.pool[index] = ACTIVE

    def metrics(self) -> dict[str, float]:
        return {"pools/active": float(self.pool.count(ACTIVE)), "pools/retired": float(self.pool.count(RETIRED)),
                "pools/deferred": float(self.pool.count(DEFERRED)), "pools/revisits": float(self.last_revisits)}

    def state_dict(self) -> dict:
        return {**self.walk.state_dict(), "batches": self.batches, "streak": list(self.streak),
                "pool": list(self.pool)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["streak"]) != self.num_prompts:
            raise ValueError(f"difficulty_pools: the checkpoint tracks {len(state['streak'])} prompts, the data has "
                             f"{self.num_prompts}")
        self.walk.load_state_dict(state)
        self.batches = int(state["batches"])
        self.streak, self.pool = [int(s) for s in state["streak"]], [str(p) for p in state["pool"]]

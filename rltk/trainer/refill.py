"""Dynamic sampling with refill (DAPO, arXiv 2503.14476 §3.2, Eq. 11: keep sampling until the batch
holds only groups whose rewards are not all equal), ``rollout.dynamic_sampling``.

A group whose G rewards are all equal gets zero advantage from every group-centred estimator, so it
costs a full forward and backward and teaches nothing; ``zero_variance_filter`` drops such groups
and the step shrinks exactly when the model gets good (or bad). With refill the collector
generates further rounds of prompts until each process holds its quota of informative groups, or
``rollout.max_refill_rounds`` extra rounds were spent; then it fills what is missing with the
uninformative groups it has (so every step trains on as many groups), and counts them.

The unit kept or dropped is the sampler's: one group, or a (q⁺, q⁻) pair for a sampler that gives
roles (Weighted GRPO pairing), kept only when each of its groups is informative.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rltk.algos.types import flat_groups
from rltk.engines.base import Generation, concat_generations, select_rows


@dataclass
class ScoredGroups:
    """One process's generated, verified and rewarded groups, before any forward: ``indices[g]`` is
    the dataset index of group g, whose completions are rows g·G … g·G + G − 1."""

    indices: list[int]
    roles: list[str] | None
    generation: Generation
    verdicts: list
    rewards: torch.Tensor  # [N]
    per_reward: dict[str, torch.Tensor]  # [N] each, NaN where a function returned None
    timings: dict[str, float] = field(default_factory=dict)  # time/generate, time/score, summed over rounds
    reward_none: int = 0  # rewards that were None among all the completions generated for these groups

    def group_has_spread(self, group_size: int) -> torch.Tensor:
        """bool [groups]: the group's rewards are not all equal (the ``zero_variance_filter`` test)."""
        groups = len(self.rewards) // group_size
        return ~flat_groups(self.rewards, torch.arange(len(self.rewards)) // group_size, groups)

    def select(self, groups: list[int], group_size: int) -> "ScoredGroups":
        rows = [g * group_size + k for g in groups for k in range(group_size)]
        index = torch.tensor(rows, dtype=torch.long)
        return ScoredGroups([self.indices[g] for g in groups], None if self.roles is None else
                            [self.roles[g] for g in groups], select_rows(self.generation, rows),
                            [self.verdicts[r] for r in rows], self.rewards[index],
                            {k: v[index] for k, v in self.per_reward.items()}, dict(self.timings), self.reward_none)

    @staticmethod
    def concat(parts: list["ScoredGroups"], pad_id: int) -> "ScoredGroups":
        timings: dict[str, float] = {}
        for part in parts:
            for key, value in part.timings.items():
                timings[key] = timings.get(key, 0.0) + value
        return ScoredGroups([i for p in parts for i in p.indices],
                            None if parts[0].roles is None else [r for p in parts for r in p.roles],
                            concat_generations([p.generation for p in parts], pad_id),
                            [v for p in parts for v in p.verdicts], torch.cat([p.rewards for p in parts]),
                            {k: torch.cat([p.per_reward[k] for p in parts]) for k in parts[0].per_reward}, timings,
                            sum(p.reward_none for p in parts))


def unit_size(roles: list[str] | None) -> int:
    """Groups per unit of selection: 2 for a sampler's (q⁺, q⁻) pairs, else 1."""
    return 2 if roles is not None else 1


def informative_units(scored: ScoredGroups, group_size: int) -> list[bool]:
    """Per unit (group or pair): every one of its groups has rewards that are not all equal."""
    spread = scored.group_has_spread(group_size).view(-1, unit_size(scored.roles))
    return spread.all(dim=1).tolist()


class Refill:
    """Collects one process's quota of informative units over generation rounds (the caller runs the
    rounds; every process runs as many, since generation can be collective under ZeRO-3)."""

    def __init__(self, quota_groups: int, group_size: int):
        self.quota, self.group_size = quota_groups, group_size
        self.kept: list[ScoredGroups] = []
        self.spare: list[ScoredGroups] = []  # uninformative units, in the order generated
        self.kept_groups = self.spare_groups = self.generated_groups = self.rounds = 0
        self.reward_none = 0

    @property
    def missing(self) -> int:
        return self.quota - self.kept_groups

    def add(self, scored: ScoredGroups) -> None:
        """Keep the round's informative units up to the quota; remember the others as spares."""
        self.rounds += 1
        self.generated_groups += len(scored.indices)
        self.reward_none += scored.reward_none
        size = unit_size(scored.roles)
        good, bad = [], []
        for u, informative in enumerate(informative_units(scored, self.group_size)):
            groups = list(range(u * size, (u + 1) * size))
            if informative and len(good) + size <= self.missing:
                good += groups
            elif not informative:
                bad += groups
        if good:
            self.kept.append(scored.select(good, self.group_size))
            self.kept_groups += len(good)
        if bad and self.spare_groups < self.quota:
            self.spare.append(scored.select(bad, self.group_size))
            self.spare_groups += len(bad)

    def result(self, pad_id: int) -> tuple[ScoredGroups, dict[str, float]]:
        """The quota's groups (informative first, then spares for what is missing) and the metrics."""
        parts, filled = list(self.kept), 0
        for spare in self.spare:
            if filled >= self.missing:
                break
            take = min(len(spare.indices), self.missing - filled)
            parts.append(spare.select(list(range(take)), self.group_size) if take < len(spare.indices) else spare)
            filled += take
        metrics = {"dynamic/rounds": float(self.rounds),
                   "dynamic/generated_groups": float(self.generated_groups),
                   "dynamic/extra_generation": self.generated_groups / self.quota - 1.0,
                   "dynamic/unfilled_share": filled / self.quota}
        out = ScoredGroups.concat(parts, pad_id)
        out.reward_none = self.reward_none  # every round's, once (a round's kept and spare parts share it)
        return out, metrics

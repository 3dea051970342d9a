"""Pairing sampler for Weighted GRPO (Sheng et al. 2026, arXiv 2602.03452; docs/algorithms/reference.md §4a).

The sampler probes candidate prompts with G rollouts of the current policy, keeps *hard but
solvable* prompts q⁺ (1 ≤ successes ≤ c, from the hard pool) and *easy but brittle* prompts q⁻
(G − c ≤ successes ≤ G − 1, from the easy pool), and builds every rollout batch from (q⁺, q⁻)
pairs, tagging each group with its role ("pos", "neg") for the ``weighted_grpo`` estimator.

Probing needs the policy, so the trainer attaches a :class:`ProbeContext` before the first batch;
the sampler stays free of model code and I/O. Probe results are kept in the context's cache (a file in the
run directory) and reused on resume, and each probe logs the success-count histogram of both pools.
"""
from __future__ import annotations

import logging
import re
from collections import Counter

import torch

from rltk.algos.registry import StageError, register_sampler
from rltk.algos.samplers import ProbeContext, Sampler

log = logging.getLogger(__name__)


@register_sampler("pairing")
class PairingSampler(Sampler):
    """Batches of (q⁺, q⁻) pairs; ``next_indices(n)`` returns n/2 pairs, roles in ``last_roles``.

    Knobs: ``c`` (success-count threshold; default G/4), ``refresh_every`` (0 = probe once before
    training; N = re-probe every N rollout batches), ``probe_size`` (candidates probed per pool),
    ``hard_pool`` / ``easy_pool`` (regular expressions over example ids selecting each pool; the
    default ``.*`` makes both pools the whole training set; the built-in task's ids start with the
    level, e.g. ``^L3-``).
    """

    provides_roles = True  # the trainer passes ``last_roles`` to the stages as ``Rollouts.roles``

    def __init__(self, num_prompts: int, seed: int, *, c: int | None = None, refresh_every: int = 0,
                 probe_size: int = 512, hard_pool: str = ".*", easy_pool: str = ".*"):
        if refresh_every < 0 or probe_size < 1:
            raise StageError("pairing: refresh_every must be >= 0 and probe_size >= 1")
        if c is not None and c < 1:
            raise StageError(f"pairing: c must be >= 1, got {c}")
        for name, pattern in (("hard_pool", hard_pool), ("easy_pool", easy_pool)):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise StageError(f"pairing: {name} {pattern!r} is not a regular expression: {exc}") from None
        self.num_prompts, self.seed = num_prompts, seed
        self.c, self.refresh_every, self.probe_size = c, refresh_every, probe_size
        self.patterns = {"hard": hard_pool, "easy": easy_pool}
        self.context: ProbeContext | None = None
        self.pools: dict[str, list[int]] = {}
        self.batches = 0  # rollout batches served
        self.last_roles: list[str] = []
        self.histograms: dict[str, dict[int, int]] = {}

    def attach(self, context: ProbeContext) -> None:
        self.context = context

    # ------------------------------------------------------------------ probing
    def _candidates(self, pool: str) -> list[int]:
        pattern = re.compile(self.patterns[pool])
        ids = self.context.example_ids
        matching = [i for i in range(self.num_prompts) if pattern.search(ids[i])]
        if not matching:
            raise StageError(f"pairing: no training example id matches {pool}_pool {self.patterns[pool]!r}")
        order = torch.randperm(len(matching), generator=torch.Generator().manual_seed(self.seed + 17 * self.batches))
        return [matching[j] for j in order[: self.probe_size].tolist()]

    def _probe(self) -> None:
        """Probe both pools with the current policy (or reuse the cache for this refresh)."""
        key = str(self.batches)
        fingerprint = f"{self.context.fingerprint}|G={self.context.group_size}|probe_size={self.probe_size}|" \
                      f"pools={self.patterns}|seed={self.seed}"
        cache = self.context.cache.load(fingerprint)
        if key not in cache:
            candidates = {pool: self._candidates(pool) for pool in ("hard", "easy")}
            unique = sorted(set(candidates["hard"]) | set(candidates["easy"]))
            successes = dict(zip(unique, self.context.probe(unique)))
            cache[key] = {pool: [[i, successes[i]] for i in idx] for pool, idx in candidates.items()}
            self.context.cache.store(fingerprint, cache)
        g = self.context.group_size
        c = self.c if self.c is not None else max(1, g // 4)
        eligible = {"hard": lambda s: 1 <= s <= c, "easy": lambda s: g - c <= s <= g - 1}
        for pool in ("hard", "easy"):
            counts = cache[key][pool]
            self.histograms[pool] = dict(sorted(Counter(s for _, s in counts).items()))
            self.pools[pool] = [i for i, s in counts if eligible[pool](s)]
            log.info("pairing probe (batch %d) %s pool: success counts of %d samples %s; %d eligible",
                     self.batches, pool, g, self.histograms[pool], len(self.pools[pool]))
            if not self.pools[pool]:
                need = f"1 <= successes <= {c}" if pool == "hard" else f"{g - c} <= successes <= {g - 1}"
                raise StageError(f"pairing: no eligible prompt in the {pool} pool (need {need} of {g}); "
                                 f"observed success-count histogram {self.histograms[pool]}")

    # ------------------------------------------------------------------ batches
    def next_indices(self, n: int) -> list[int]:
        if self.context is None:
            raise StageError("pairing: the sampler needs the trainer's probe context (attach) before use")
        if n % 2:
            raise StageError(f"pairing: prompts_per_step must be even (pairs of q+ and q-), got {n}")
        if not self.pools or (self.refresh_every and self.batches % self.refresh_every == 0):
            self._probe()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches)
        pick = {pool: torch.randint(len(idx), (n // 2,), generator=generator).tolist()
                for pool, idx in self.pools.items()}
        out, roles = [], []
        for k in range(n // 2):
            out += [self.pools["hard"][pick["hard"][k]], self.pools["easy"][pick["easy"][k]]]
            roles += ["pos", "neg"]
        self.batches += 1
        self.last_roles = roles
        return out

    def metrics(self) -> dict[str, float]:
        return {f"pairing/{pool}_eligible": float(len(idx)) for pool, idx in self.pools.items()}

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Restore the batch counter; pools are rebuilt from the cached probe of the last refresh."""
        self.batches = int(state["batches"])
        if self.batches and self.context is not None:
            served = self.batches
            self.batches = (served - 1) // self.refresh_every * self.refresh_every if self.refresh_every else 0
            self._probe()
            self.batches = served

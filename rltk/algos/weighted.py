"""Weighted GRPO with positive–negative prompt pairing (docs/algorithms/reference.md §4b).

Sheng et al. 2026, "Beyond Variance: Prompt-Efficient RLVR via Rare-Event Amplification and
Bidirectional Pairing" (arXiv 2602.03452). No public code.

The pairing sampler (§4a) builds each batch from (q⁺, q⁻) pairs: q⁺ is hard but solvable (a rare
success), q⁻ easy but brittle (a rare failure). It tags every group with its role; the trainer
passes them as ``rollouts.roles`` — one role per group, in group order — and consecutive groups
(2k, 2k+1) form pair k with roles ("pos", "neg").

The paper's literal description ("map outcomes to +1/−λ, then group-normalise") is a no-op, since
z-scores ignore affine maps of binary rewards. Two readings are selectable:

- ``scope="pair"`` (default, the bidirectional reading): role-specific outcomes o — q⁺ success → +1,
  failure → 0; q⁻ success → 0, failure → −λ — divided by their unbiased std over the pair's 2G
  completions, **without centring**: A = o / (std_pair(o) + eps). The rare q⁺ success and the rare
  q⁻ failure carry the whole signal; the common outcomes (q⁺ failure, q⁻ success) get exactly 0.
  A pair whose outcomes are all equal (std 0; they are then all 0) gets 0 everywhere.

  Revised (docs/algorithms/reference.md §4b, 2026-12): the first reading also subtracted the pair mean, which gave
  the "0" outcomes −mean/std ≠ 0 — a q⁺ failure got a *positive* advantage when both prompts of a
  pair failed everywhere (+0.935 at G = 4), a q⁻ success a negative one when both succeeded
  everywhere. Without centring the sign of A is the sign of o, so a success never gets a negative
  advantage and a failure never a positive one, for every pair of outcome vectors (a test).
- ``scope="prompt"``: plain GRPO on the verifier outcomes of each prompt, then multiplied by a
  per-role, per-outcome multiplier (``pos_success``, ``pos_failure``, ``neg_success``,
  ``neg_failure``).

Outcomes are ``rollouts.correct`` (never shaped rewards) in both scopes.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from rltk.algos.estimators import grpo
from rltk.algos.registry import StageError, check_number, register_advantage
from rltk.algos.types import Advantages, Rollouts, group_stats

ROLES = ("pos", "neg")


def check_roles(rollouts: Rollouts, num_groups: int, *, paired: bool) -> tuple[str, ...]:
    """The validated per-group roles; raise a one-line ``StageError`` on anything malformed.

    ``paired`` additionally requires consecutive ("pos", "neg") groups.
    """
    roles = rollouts.roles
    if roles is None:
        raise StageError(
            "weighted_grpo needs per-group roles ('pos'/'neg') in rollouts.roles; "
            "use the 'pairing' sampler, which tags every group"
        )
    roles = tuple(roles)
    if len(roles) != num_groups:
        raise StageError(f"weighted_grpo: rollouts.roles has {len(roles)} entries for {num_groups} groups")
    bad = [(g, r) for g, r in enumerate(roles) if r not in ROLES]
    if bad:
        g, r = bad[0]
        raise StageError(f"weighted_grpo: group {g} has role {r!r}; roles must be 'pos' or 'neg'")
    if paired:
        if num_groups % 2:
            raise StageError(
                f"weighted_grpo (scope=pair): {num_groups} groups cannot form (pos, neg) pairs; "
                "the batch needs an even number of groups"
            )
        for g in range(0, num_groups, 2):
            if roles[g : g + 2] != ROLES:
                raise StageError(
                    f"weighted_grpo (scope=pair): groups {g} and {g + 1} have roles "
                    f"{roles[g]!r}, {roles[g + 1]!r}; each pair must be consecutive ('pos', 'neg')"
                )
    return roles


def role_outcome_values(correct: Tensor, is_pos: Tensor, lam: float) -> Tensor:
    """§4b outcome map: q⁺ success → 1, failure → 0; q⁻ success → 0, failure → −λ (float64)."""
    ok = correct.double()
    return torch.where(is_pos, ok, -lam * (1.0 - ok))


def pair_advantage(values: Tensor, std: Tensor, eps: float) -> Tensor:
    """A = o / (std + eps), uncentred; 0 where the pair's std is 0 (all its outcomes equal).

    Broadcasts, so it also serves a batch of pairs ``[P, 2G]`` with ``std`` ``[P, 1]``. The sign of
    A is the sign of o: successes (o ≥ 0) never get a negative advantage, failures (o ≤ 0) never a
    positive one.
    """
    return torch.where(std > 0, values / (std + eps), torch.zeros_like(values))


def _pair_scope(rollouts: Rollouts, group: Tensor, is_pos: Tensor, lam: float, eps: float) -> Tensor:
    """Role outcomes over each pair's unbiased std (uncentred; 0 for a pair of one row or std 0)."""
    pair = torch.div(group, 2, rounding_mode="floor")
    num_pairs = int(pair.max().item()) + 1 if pair.numel() else 0
    values = role_outcome_values(rollouts.correct, is_pos, lam)
    _, std, _ = group_stats(values, pair, num_pairs)  # std is 0 for a pair of one row
    return pair_advantage(values, std, eps)


def _prompt_scope(
    rollouts: Rollouts, is_pos: Tensor, eps: float, multipliers: dict[str, float]
) -> Tensor:
    """GRPO on the verifier outcomes of each prompt, times the per-role/per-outcome multiplier."""
    outcomes = replace(rollouts, rewards=rollouts.correct.double())
    adv = grpo(outcomes, eps=eps).values.double()
    ok = rollouts.correct
    scale = torch.where(
        is_pos,
        torch.where(ok, multipliers["pos_success"], multipliers["pos_failure"]),
        torch.where(ok, multipliers["neg_success"], multipliers["neg_failure"]),
    )
    return adv * scale.double()


def _metrics(rollouts: Rollouts, is_pos: Tensor, values: Tensor, roles: tuple[str, ...]) -> dict[str, float]:
    ok = rollouts.correct.double()

    def rate(rows: Tensor) -> float:
        return float(ok[rows].mean()) if bool(rows.any()) else 0.0

    pos_rows, neg_rows = is_pos, ~is_pos
    return {
        "pos_groups": float(roles.count("pos")),
        "neg_groups": float(roles.count("neg")),
        "pos_success_rate": rate(pos_rows),
        "neg_success_rate": rate(neg_rows),
        "pos_adv_mean": float(values[pos_rows].mean()) if bool(pos_rows.any()) else 0.0,
        "neg_adv_mean": float(values[neg_rows].mean()) if bool(neg_rows.any()) else 0.0,
        "zero_adv_share": float((values == 0).double().mean()) if values.numel() else 0.0,
    }


@register_advantage("weighted_grpo", needs={"roles"}, group_baseline=True)
def weighted_grpo(
    rollouts: Rollouts,
    *,
    scope: str = "pair",
    lam: float = 1.0,
    eps: float = 1e-6,
    pos_success: float = 1.0,
    pos_failure: float = 1.0,
    neg_success: float = 1.0,
    neg_failure: float = 1.0,
) -> Advantages:
    """Weighted GRPO advantage (Sheng et al. 2026, arXiv 2602.03452; docs/algorithms/reference.md §4b).

    ``scope="pair"``: A = o / (std_pair(o) + eps), the role outcomes o (q⁺: success 1, failure 0;
    q⁻: success 0, failure −``lam``) over their unbiased std across the (q⁺, q⁻) pair's 2G
    completions, not centred (0 when that std is 0). ``scope="prompt"``: per-prompt
    GRPO on correctness, times ``pos_success``/``pos_failure`` on q⁺ and ``neg_success``/
    ``neg_failure`` on q⁻ completions. ``lam`` is used by the pair scope only and the multipliers by
    the prompt scope only. Needs ``rollouts.roles`` (one "pos"/"neg" per group, in group order;
    the pair scope also needs consecutive ("pos", "neg") groups and whole pairs in the batch).
    """
    if scope not in ("pair", "prompt"):
        raise StageError(f"weighted_grpo: scope must be pair or prompt, got '{scope}'")
    for name, value in [("lam", lam), ("pos_success", pos_success), ("pos_failure", pos_failure),
                        ("neg_success", neg_success), ("neg_failure", neg_failure)]:
        check_number("weighted_grpo", name, value, "", lambda v: True)
    if scope == "pair" and lam < 0:
        raise StageError(f"weighted_grpo: lam must be >= 0, got {lam}")
    check_number("weighted_grpo", "eps", eps, "> 0", lambda v: v > 0)
    group, num_groups = rollouts.group_index()
    roles = check_roles(rollouts, num_groups, paired=scope == "pair")
    role_is_pos = torch.tensor([r == "pos" for r in roles], dtype=torch.bool, device=group.device)
    is_pos = role_is_pos[group] if num_groups else torch.zeros_like(group, dtype=torch.bool)
    if scope == "pair":
        values = _pair_scope(rollouts, group, is_pos, lam, eps)
    else:
        multipliers = dict(
            pos_success=pos_success, pos_failure=pos_failure, neg_success=neg_success, neg_failure=neg_failure
        )
        values = _prompt_scope(rollouts, is_pos, eps, multipliers)
    metrics = _metrics(rollouts, is_pos, values, roles)
    return Advantages(values.to(rollouts.rewards.dtype).detach(), metrics=metrics)

"""ResRL: negative-sample projection residual (ALGORITHMS.md §3).

Lin et al. 2026, "ResRL" (arXiv 2605.00380; authors' code on verl 0.5). A token-level modifier:
a wrong token whose hidden state lies inside the subspace spanned by the group's correct tokens
shares semantics with correct answers, so penalising it hard would also push the correct answers
down; its penalty is shrunk. For each group with ≥ 1 correct and ≥ 1 wrong completion and ≥ 4
valid correct-completion tokens:

1. h = hidden state predicting each completion token (``rollouts.hidden``, layer ``layer``),
   detached, then parameter-free LayerNorm (h − mean) / sqrt(var + 1e-5).
2. X = LN(h) of the group's correct tokens (a seeded random subset of at most ``max_pos_tokens``
   rows); μ = row mean; V_k = top-k right singular vectors of X − μ, k = min(rank, rows − 1, H).
3. Each wrong token: h̃ = LN(h) − μ, residual = h̃ − V_k V_kᵀ h̃, d = ‖residual‖² / H.
4. Over the group's wrong tokens: lo, hi = quantiles q_low, q_high of d (linear interpolation);
   u = clamp((d − lo)/(hi − lo), 0, 1), or ½ when hi − lo < 1e-5; w = min_weight + (1 − min_weight)·u.
5. Wrong tokens: Â = w·A. Correct completions (every group): Â = pos_weight·A. Wrong completions of
   groups that fail the condition keep A.

Choices this module makes (ALGORITHMS.md leaves them open):
- "Valid" tokens are completion-mask tokens of completions that enter the loss
  (``Advantages.keep``); dropped completions neither build the subspace nor set the quantiles.
- Groups are whole by the trainer's contract (the released code builds the subspace from
  micro-batch fragments; we deliberately do not).
- The basis is an exact ``torch.linalg.svd`` when rows·H ≤ ``EXACT_SVD_MAX_ELEMENTS`` (2**20, e.g.
  256 rows at H = 4096, or every row of a model with H ≤ 256 at the default 4096-row cap), else
  ``torch.pca_lowrank(niter=4)``. pca_lowrank draws from its device's global RNG, so it runs inside
  ``torch.random.fork_rng`` with a locally derived seed: the global stream is left untouched and
  the result is deterministic.
- The positive-row subset uses a local CPU ``torch.Generator`` seeded by (seed, group id), so a
  group's subset does not depend on what else is in the batch.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from rltk.algos.registry import StageError, register_modifier
from rltk.algos.types import Advantages, Rollouts

EXACT_SVD_MAX_ELEMENTS = 1 << 20
LN_EPS = 1e-5
FLAT_SPREAD = 1e-5  # hi − lo below this: every weight is the midpoint
MIN_POS_TOKENS = 4
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class _Knobs:
    rank: int
    max_pos_tokens: int
    q_low: float
    q_high: float
    min_weight: float
    seed: int


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_knobs(layer, rank, max_pos_tokens, q_low, q_high, min_weight, pos_weight, seed) -> None:
    ints = {"layer": layer, "rank": rank, "max_pos_tokens": max_pos_tokens, "seed": seed}
    for name, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise StageError(f"resrl: {name} must be an integer, got {value!r}")
    if rank < 1:
        raise StageError(f"resrl: rank must be >= 1, got {rank}")
    if max_pos_tokens < MIN_POS_TOKENS:
        raise StageError(f"resrl: max_pos_tokens must be >= {MIN_POS_TOKENS}, got {max_pos_tokens}")
    if not (_is_number(q_low) and _is_number(q_high) and 0 <= q_low < q_high <= 1):
        raise StageError(f"resrl: need 0 <= q_low < q_high <= 1, got q_low={q_low!r}, q_high={q_high!r}")
    if not (_is_number(min_weight) and 0 <= min_weight <= 1):
        raise StageError(f"resrl: min_weight must be in [0, 1], got {min_weight!r}")
    if not (_is_number(pos_weight) and pos_weight >= 0):
        raise StageError(f"resrl: pos_weight must be a number >= 0, got {pos_weight!r}")


def _check_hidden(rollouts: Rollouts, layer: int) -> Tensor:
    hidden = rollouts.hidden
    if hidden is None:
        raise StageError(f"resrl: rollouts lack hidden states; the trainer must compute hidden({layer})")
    n, t = rollouts.completion_mask.shape
    if hidden.dim() != 3 or hidden.shape[:2] != (n, t):
        raise StageError(f"resrl: hidden must be [N, T, H] = [{n}, {t}, H], got {list(hidden.shape)}")
    return hidden.detach()


def layer_norm(h: Tensor) -> Tensor:
    """Parameter-free LayerNorm over the hidden size (step 1), in at least float32."""
    h = h.float() if h.dtype not in (torch.float32, torch.float64) else h
    return F.layer_norm(h, (h.shape[-1],), eps=LN_EPS)


@contextlib.contextmanager
def _seeded_device_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Fork the global RNG of ``device`` and seed it, so a callee that draws from it (pca_lowrank)
    is deterministic and the caller's random stream is neither advanced nor changed."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    backend = getattr(torch, device.type)
    index = device.index if device.index is not None else backend.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type), backend.device(index):
        backend.manual_seed(seed)  # seeds the current (= this) device only
        yield


def positive_basis(x: Tensor, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """Row mean μ [H] and the top-k right singular vectors V_k [H, k] of x − μ (step 2)."""
    rows, size = x.shape
    mean = x.mean(0)
    centred = x - mean
    k = min(rank, rows - 1, size)
    if rows * size <= EXACT_SVD_MAX_ELEMENTS:
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        return mean, vh[:k].T
    with _seeded_device_rng(x.device, seed):
        _, _, v = torch.pca_lowrank(centred, q=k, center=False, niter=4)
    return mean, v[:, :k]


def residual_distance(h: Tensor, mean: Tensor, basis: Tensor) -> Tensor:
    """d = ‖h̃ − V Vᵀ h̃‖² / H with h̃ = h − μ (step 3), one value per row."""
    centred = h - mean
    residual = centred - (centred @ basis) @ basis.T
    return residual.pow(2).sum(-1) / h.shape[-1]


def quantile_weights(d: Tensor, q_low: float, q_high: float, min_weight: float) -> Tensor:
    """w = min_weight + (1 − min_weight)·clamp((d − lo)/(hi − lo), 0, 1) (step 4)."""
    lo = torch.quantile(d, q_low, interpolation="linear")
    hi = torch.quantile(d, q_high, interpolation="linear")
    if float(hi - lo) < FLAT_SPREAD:
        u = torch.full_like(d, 0.5)
    else:
        u = ((d - lo) / (hi - lo)).clamp(0.0, 1.0)
    return min_weight + (1.0 - min_weight) * u


def _subsample(num_rows: int, limit: int, seed: int) -> Tensor | None:
    """Sorted indices of a seeded random subset of ``limit`` rows, or None to keep all."""
    if num_rows <= limit:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_rows, generator=generator)[:limit].sort().values


def _group_weights(
    hidden: Tensor, valid: Tensor, pos_rows: Tensor, neg_rows: Tensor, group_id: int, knobs: _Knobs
) -> tuple[Tensor, Tensor] | None:
    """Weights and distances of the wrong tokens ``valid[neg_rows]`` of one group, or None when the
    group fails the condition (fewer than 4 valid correct tokens, or no valid wrong token)."""
    pos_valid, neg_valid = valid[pos_rows], valid[neg_rows]
    num_pos, num_neg = int(pos_valid.sum()), int(neg_valid.sum())
    if num_pos < MIN_POS_TOKENS or num_neg == 0:
        return None
    group_seed = knobs.seed * _SEED_STRIDE + group_id
    pos = hidden[pos_rows][pos_valid]  # [num_pos, H]
    index = _subsample(num_pos, knobs.max_pos_tokens, group_seed)
    if index is not None:
        pos = pos[index.to(pos.device)]
    mean, basis = positive_basis(layer_norm(pos), knobs.rank, group_seed)
    d = residual_distance(layer_norm(hidden[neg_rows][neg_valid]), mean, basis)
    return quantile_weights(d, knobs.q_low, knobs.q_high, knobs.min_weight), d


def _metrics(used: int, skipped: int, weights: list[Tensor], dists: list[Tensor], seconds: float) -> dict:
    metrics = {"groups_used": float(used), "groups_skipped": float(skipped), "seconds": seconds}
    if weights:
        w = torch.cat(weights).double()
        q = torch.quantile(w, torch.tensor([0.1, 0.5, 0.9], dtype=w.dtype, device=w.device))
        metrics.update(weight_p10=float(q[0]), weight_p50=float(q[1]), weight_p90=float(q[2]))
        metrics["residual_mean"] = float(torch.cat(dists).double().mean())
    else:  # no wrong token was reweighted: effective weight 1 everywhere
        metrics.update(weight_p10=1.0, weight_p50=1.0, weight_p90=1.0, residual_mean=0.0)
    return metrics


@register_modifier("resrl", needs=lambda p: {f"hidden({p.get('layer', -2)})"})
def resrl(
    rollouts: Rollouts,
    advantages: Advantages,
    *,
    layer: int = -2,
    rank: int = 64,
    max_pos_tokens: int = 4096,
    q_low: float = 0.2,
    q_high: float = 0.8,
    min_weight: float = 0.1,
    pos_weight: float = 0.1,
    seed: int = 0,
) -> Advantages:
    """ResRL (Lin et al. 2026, arXiv 2605.00380; ALGORITHMS.md §3, steps 1–5 in the module
    docstring): shrink the penalty of wrong tokens that lie in the correct tokens' subspace.

    Reads ``rollouts.hidden`` [N, T, H] (layer ``layer``, a Python index into ``hidden_states``;
    the trainer fills it from the stage's ``needs``). Takes ``[N]`` or ``[N, T]`` advantages and
    returns ``[N, T]``. Metrics: groups_used, groups_skipped, weight_p10/p50/p90 and residual_mean
    (over reweighted wrong tokens), seconds spent.
    """
    start = time.perf_counter()
    _check_knobs(layer, rank, max_pos_tokens, q_low, q_high, min_weight, pos_weight, seed)
    hidden = _check_hidden(rollouts, layer)
    knobs = _Knobs(rank, max_pos_tokens, float(q_low), float(q_high), float(min_weight), seed)

    mask = rollouts.completion_mask
    values = advantages.per_token(mask.shape[1]).detach()
    valid = (mask > 0) & advantages.kept().unsqueeze(-1)
    correct = rollouts.correct.bool()
    weight = torch.ones_like(values, dtype=torch.float64)
    weight[correct] = float(pos_weight)

    group_index, num_groups = rollouts.group_index()
    group_ids = rollouts.group_ids.tolist()
    used, weights, dists = 0, [], []
    for g in range(num_groups):
        rows = (group_index == g).nonzero(as_tuple=True)[0]
        pos_rows, neg_rows = rows[correct[rows]], rows[~correct[rows]]
        result = _group_weights(hidden, valid, pos_rows, neg_rows, int(group_ids[rows[0]]), knobs)
        if result is None:
            continue
        w, d = result
        block = weight[neg_rows]
        block[valid[neg_rows]] = w.to(block.dtype)
        weight[neg_rows] = block
        used += 1
        weights.append(w)
        dists.append(d)

    new = (values.double() * weight).to(values.dtype)
    metrics = _metrics(used, num_groups - used, weights, dists, time.perf_counter() - start)
    return Advantages(new.detach(), keep=advantages.keep, metrics=metrics)

"""ResRL: negative-sample projection residual (ALGORITHMS.md §3).

Lin et al. 2026, "ResRL" (arXiv 2605.00380; authors' code on verl 0.5). A token-level modifier:
a wrong token whose hidden state lies inside the subspace spanned by the group's correct tokens
shares semantics with correct answers, so penalising it hard would also push the correct answers
down; its penalty is shrunk. For each group with ≥ 1 correct and ≥ 1 wrong completion and ≥ 4
valid correct-completion tokens:

1. h = hidden state predicting each completion token (``rollouts.hidden``, layer ``layer``),
   detached, then parameter-free LayerNorm (h − mean) / sqrt(var + 1e-5).
2. X = LN(h) of the group's correct tokens (a seeded random subset of at most ``max_pos_tokens``
   rows); μ = row mean; V_k = top-k right singular vectors of X − μ, k = min(rank, rows − 1, H)
   (numerically null directions left out, see below).
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
- The basis is exact at every size: the top-k eigenvectors of the smaller Gram matrix in float64
  (XᵀX [H, H] when rows ≥ H, else XXᵀ [rows, rows] and V = XᵀU / σ), ``torch.linalg.eigh``.
  Directions with σ ≤ 1e-6·σ_max (numerically null: the centring removes one, repeated rows more)
  are dropped rather than divided by ~0, so a rank-deficient group gets fewer than k columns; exact
  SVD would fill them with arbitrary null-space directions. It is deterministic and draws no random
  numbers. It replaces an exact SVD below 2**20 elements and ``torch.pca_lowrank(q=k, niter=4)``
  above, which has no oversampling and departed from the exact subspace on slowly decaying
  spectra (smallest principal cosine 0.035 at 2,048 × 768), so the weights changed character with
  the group's size. Cost at 4,096 × 3,584 (7B hidden size, the default row cap), one CPU thread:
  see docs/algorithms/resrl.md.
- The positive-row subset uses a local CPU ``torch.Generator`` seeded by (seed, group id), so a
  group's subset does not depend on what else is in the batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rltk.algos.registry import StageError, register_modifier
from rltk.algos.types import Advantages, Rollouts

GRAM_RTOL = 1e-12  # eigenvalue σ² ≤ GRAM_RTOL·σ_max² (σ ≤ 1e-6·σ_max): a null direction, dropped
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


def positive_basis(x: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Row mean μ [H] and the top-k right singular vectors V_k [H, k'] of X = x − μ (step 2).

    Exact, from the eigendecomposition of the smaller Gram matrix in float64: XᵀX [H, H] when
    rows ≥ H (its eigenvectors are V), else XXᵀ [rows, rows] (eigenvectors U, then V = XᵀU / σ).
    k = min(rank, rows − 1, H); of those k directions only the ones with σ² > GRAM_RTOL·σ_max²
    are kept (k' ≤ k): below that a direction is numerically null (centring alone removes one,
    repeated rows more) and dividing by its σ would be dividing by rounding noise. In the XXᵀ path
    the columns are re-orthonormalised by a QR of the [H, k'] matrix (it keeps their nested spans).
    Deterministic; signs and order of the columns do not matter for the projection V Vᵀ.
    Returned in x's dtype.
    """
    rows, size = x.shape
    x64 = x.double()
    mean = x64.mean(0)
    centred = x64 - mean
    k = max(min(rank, rows - 1, size), 0)
    if rows >= size:
        evals, vecs = torch.linalg.eigh(centred.T @ centred)  # ascending
    else:
        evals, vecs = torch.linalg.eigh(centred @ centred.T)
    evals, vecs = evals.flip(0)[:k], vecs.flip(1)[:, :k]  # top k, descending
    top = evals[0] if k else evals.new_zeros(())
    kept = int(((evals > GRAM_RTOL * top) & (evals > 0)).sum())  # a prefix: evals are sorted
    evals, vecs = evals[:kept], vecs[:, :kept]
    if rows >= size:
        basis = vecs
    else:  # V = XᵀU / σ; re-orthonormalised, since columns of small σ lose orthogonality (~ε·σ_max²/σ²)
        basis = torch.linalg.qr((centred.T @ vecs) / evals.sqrt()).Q
    return mean.to(x.dtype), basis.to(x.dtype)


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
    mean, basis = positive_basis(layer_norm(pos), knobs.rank)
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

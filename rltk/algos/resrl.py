"""ResRL: negative-sample projection residual (docs/algorithms/reference.md §3).

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

Choices this module makes (docs/algorithms/reference.md §3 leaves them open):
- "Valid" tokens are completion-mask tokens of completions that enter the loss
  (``Advantages.keep``); dropped completions neither build the subspace nor set the quantiles.
- Groups are whole by the trainer's contract (the released code builds the subspace from
  micro-batch fragments; we deliberately do not).
- The basis: exact where that is cheap, a randomized subspace iteration with oversampling where
  it is not (``positive_basis`` dispatches, ``basis_method`` says which):
  * min(rows, H) ≤ EXACT_MAX_DIM (640): ``gram_basis``, the top-k eigenvectors of the smaller Gram
    matrix in float64 (XᵀX [H, H] when rows ≥ H, else XXᵀ [rows, rows] and V = XᵀU / σ),
    ``torch.linalg.eigh``; deterministic, no random numbers.
  * above: ``randomized_basis``, l = k + max(k, 16) Gaussian test vectors from a local generator
    seeded by (seed, group id), POWER_ITERS (5) power iterations re-orthonormalised after every
    product, float32 products, then a float64 SVD of QᵀX [l, H]. Principal cosines against the exact
    top 64 ≥ 0.999 on a slowly decaying spectrum (σ_i = 1/√(i+1)) at 2,048 × 768, 4,096 × 896 and
    4,096 × 3,584; deterministic given the input and seed; the global RNG is not touched. Where the
    spectrum has no gap at k (nearly isotropic rows) the top k directions are barely determined by
    the data and this path does not reproduce the exact ones.
  Directions with σ ≤ 1e-6·σ_max (1e-5·σ_max on the float32 randomized path, whose rounding leaves
  null directions at ~1e-7·σ_max) are numerically null (the centring removes one, repeated rows
  more) and are dropped, so a rank-deficient group gets fewer than k columns; exact SVD would fill
  them with arbitrary null-space directions.
  Why: rltk first used exact SVD below 2**20 elements and ``torch.pca_lowrank(q=k, niter=4)`` above;
  without oversampling that departed from the exact subspace on slowly decaying spectra (smallest
  principal cosine 0.035 at 2,048 × 768), so the weights changed character with the group's size.
  The exact Gram basis at every size fixed that but took 9.9 s per group at 4,096 × 3,584 (7B hidden
  size, the default row cap) on one CPU thread; the randomized path takes 0.82 s there (old
  pca_lowrank: 0.38 s). Measurements: docs/algorithms/resrl.md.
- The positive-row subset and the randomized basis's test vectors use local CPU
  ``torch.Generator``s seeded by (seed, group id), so a group's result does not depend on what else
  is in the batch, and the caller's random stream is untouched.
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
# Step 2's basis is exact (``gram_basis``) when min(rows, H) ≤ EXACT_MAX_DIM, else randomized
# (``randomized_basis``). EXACT_MAX_DIM is the measured crossover (one thread, float32 input,
# rank 64, medians of 5 interleaved runs of process CPU time): exact / randomized time was 1.0 at
# min(rows, H) ≈ 450 for rows < H = 896 (2.0 at 640), 1.0 at ≈ 590 for H = 1,536 (1.2 at 640), and
# 0.78 / 1.04 at 640 / 768 for H = 3,584; 0.68 / 0.97 at H = 640 / 768 with 4,096 rows ≥ H. 640
# keeps the exact path up to where it stops being cheaper at the hidden sizes of the recipes
# (2,560–3,584); at H = 896 exact costs ≤ 2× the randomized path below it (≤ 0.04 s extra a group).
# H = 768 (the accuracy test's size) is randomized.
EXACT_MAX_DIM = 640
# Randomized path: l = k + p columns, p = max(k, MIN_OVERSAMPLE), and POWER_ITERS power iterations.
# Smallest principal cosine against the exact top 64 on σ_i = 1/√(i+1), k = p = 64, worst of 2–3
# seeds, for 2 / 3 / 4 / 5 iterations: 0.93 / 0.989 / 0.998 / 0.9996 at 2,048 × 768,
# 0.92 / 0.991 / 0.9987 / 0.9997 at 4,096 × 896, 0.86 / 0.976 / 0.997 / 0.9996 at 4,096 × 3,584
# (over 24 draws per size: ≥ 0.9972 with 4, ≥ 0.9994 with 5, and one draw of 0.9944 with 4).
# 5 iterations cost ~10–15% more than 4 and cut 1 − cosine ~7× (worst 0.0006 vs 0.0056).
# (The old pca_lowrank, niter 4 and no oversampling: 0.02–0.12.) p = k keeps that rate at every
# rank, since σ_2k/σ_k of a power-law spectrum does not depend on k (k = 16…128 at four sizes:
# ≥ 0.9993); below k = 16, p = 16 costs nothing and lifts e.g. k = 2 from 0.9985 to 1.0000.
# float32 products gave the same cosines as float64 (±0.001).
POWER_ITERS = 5
MIN_OVERSAMPLE = 16
# σ ≤ RANDOM_RTOL·σ_max: a null direction of the randomized path in float32, dropped. Its float32
# products leave null directions at ~ε·σ_max (measured ≤ 2.2e-7 on repeated-row inputs up to
# 4,096 × 3,584, real directions down to 1.2e-4 recovered exactly), so 1e-5 keeps a ~45× margin. In
# float64 (float64 input) the threshold is the Gram path's, σ ≤ 1e-6·σ_max.
RANDOM_RTOL = 1e-5
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


def _oversample(k: int) -> int:
    """p, the sketch's extra columns beyond k: p = k, at least MIN_OVERSAMPLE."""
    return max(k, MIN_OVERSAMPLE)


def basis_method(rows: int, size: int, rank: int) -> str:
    """Which basis ``positive_basis`` computes for ``rows`` × ``size`` input: ``"exact"`` (the Gram
    eigendecomposition) when min(rows, size) ≤ EXACT_MAX_DIM, or when the sketch of l = k + p columns
    would not be smaller than min(rows, size); else ``"randomized"``."""
    k = max(min(rank, rows - 1, size), 0)
    smaller = min(rows, size)
    return "exact" if smaller <= EXACT_MAX_DIM or k + _oversample(k) >= smaller else "randomized"


def positive_basis(x: Tensor, rank: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Row mean μ [H] and the top-k right singular vectors V_k [H, k'] of X = x − μ (step 2),
    k = min(rank, rows − 1, H), k' ≤ k after numerically null directions are dropped.

    ``gram_basis`` (exact) when min(rows, H) ≤ EXACT_MAX_DIM, else ``randomized_basis`` seeded by
    ``seed`` (see ``basis_method`` and the module docstring). Returned in x's dtype; signs and order
    of the columns do not matter for the projection V Vᵀ.
    """
    rows, size = x.shape
    if basis_method(rows, size, rank) == "exact":
        return gram_basis(x, rank)
    return randomized_basis(x, rank, seed)


def gram_basis(x: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``positive_basis`` exactly, from the eigendecomposition of the smaller Gram matrix in float64.

    XᵀX [H, H] when rows ≥ H (its eigenvectors are V), else XXᵀ [rows, rows] (eigenvectors U, then
    V = XᵀU / σ). Of the top k directions only the ones with σ² > GRAM_RTOL·σ_max² are kept (k' ≤ k):
    below that a direction is numerically null (centring alone removes one, repeated rows more) and
    dividing by its σ would be dividing by rounding noise. In the XXᵀ path the columns are
    re-orthonormalised by a QR of the [H, k'] matrix (it keeps their nested spans). Deterministic,
    draws no random numbers. Returned in x's dtype.
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


def randomized_basis(
    x: Tensor, rank: int, seed: int = 0, oversample: int | None = None, niter: int = POWER_ITERS
) -> tuple[Tensor, Tensor]:
    """``positive_basis`` by randomized subspace iteration (a range finder with oversampling and
    power iterations, then a Rayleigh–Ritz step).

    With X = x − μ [rows, H], p = ``oversample`` (default max(k, MIN_OVERSAMPLE)) and
    l = min(k + p, rows, H): Ω [H, l] standard normal from a local CPU generator seeded by ``seed``
    (the global RNG is not touched; same input and seed, same basis); Q = orth(XΩ) [rows, l];
    ``niter`` times Q ← orth(X·orth(XᵀQ)) (re-orthonormalised after every product, so directions far
    below σ_max keep their digits); then B = QᵀX [l, H] and the top k right singular vectors of B
    (float64 SVD) are V_k. Directions with σ ≤ rtol·σ_max are dropped as in ``gram_basis`` (rtol
    RANDOM_RTOL in float32, sqrt(GRAM_RTOL) in float64). The large products run in float32 (float64
    when x is float64); orth is a Householder QR. Returned in x's dtype.
    """
    rows, size = x.shape
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = x.mean(0, dtype=torch.float64)
    k = max(min(rank, rows - 1, size), 0)
    if k == 0:
        return mean.to(x.dtype), x.new_zeros(size, 0)
    centred = x.to(work) - mean.to(work)
    width = min(k + (_oversample(k) if oversample is None else oversample), rows, size)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(size, width, generator=generator, dtype=work).to(x.device)
    q = torch.linalg.qr(centred @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(centred @ torch.linalg.qr(centred.T @ q).Q).Q
    _, sigma, vh = torch.linalg.svd((q.T @ centred).double(), full_matrices=False)
    rtol = RANDOM_RTOL if work == torch.float32 else GRAM_RTOL ** 0.5
    kept = int((sigma[:k] > rtol * sigma[0]).sum())  # a prefix: sigma is sorted
    return mean.to(x.dtype), vh[:kept].T.to(x.dtype)


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
    group_seed = (knobs.seed * _SEED_STRIDE + group_id) % 2**64  # manual_seed's range; as torch maps negatives
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
    """ResRL (Lin et al. 2026, arXiv 2605.00380; docs/algorithms/reference.md §3, steps 1–5 in the module
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

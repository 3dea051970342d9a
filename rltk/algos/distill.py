"""Distillation objectives: REDI (docs/algorithms/reference.md §6) and PACED (§7). Pure tensor functions.

- REDI: Xu et al. 2025, "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data
  for LLM Reasoning" (arXiv 2505.24850). Offline stage 2 on (prompt, correct trace y_w, wrong trace
  y_l): L = mean over pairs of [−log π(y_w|x)/|y_w| + α·log π(y_l|x)/|y_l|] — length-normalised
  sequence log-likelihoods, no reference model, no sigmoid.
- PACED: "distillation at the frontier of student competence", 2026 (arXiv 2603.11178). A problem's
  weight is w(p) = p^α·(1 − p)^β from the student's pass rate p; the loss is the token-level
  full-vocabulary KL between teacher and student next-token distributions, averaged over a
  sequence's tokens; the batch loss is Σ_i w_i·L_i / Σ_i w_i.

These are not registered RL stages: the distillation trainers call them directly. The chunked
full-vocabulary KL lives in :mod:`rltk.algos.chunked_kl` (re-exported here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rltk.algos.registry import StageError

SCHEDULES = ("forward", "reverse", "forward_then_reverse")


# --------------------------------------------------------------------------------------------
# REDI (§6)


def normalized_logp(logps: Tensor, mask: Tensor) -> Tensor:
    """Length-normalised sequence log-likelihood Σ_t logp·mask / |y| per row (0 for an empty row)."""
    mask = mask.to(logps.dtype)
    return (logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def redi_loss(
    pos_logps: Tensor, pos_mask: Tensor, neg_logps: Tensor, neg_mask: Tensor, alpha: float = 0.8
) -> tuple[Tensor, dict[str, float]]:
    """REDI stage-2 loss (Xu et al. 2025, arXiv 2505.24850, Eq. of §3.2; docs/algorithms/reference.md §6).

    ``pos_*`` / ``neg_*`` are per-token logps and masks ``[P, T]`` of the correct and the wrong
    trace of each of P pairs (same order). Returns the scalar
    mean_pairs[−log π(y_w)/|y_w| + α·log π(y_l)/|y_l|] and metrics ``pos_logp``, ``neg_logp``
    (mean length-normalised log-likelihoods) and ``gap`` (their difference). α = 0 is SFT on the
    positives, α = 1 the symmetric objective. The gradient w.r.t. a token logp is −1/(P·|y_w|) on
    positives and +α/(P·|y_l|) on negatives.
    """
    if pos_logps.shape[0] != neg_logps.shape[0]:
        raise StageError(f"redi: {pos_logps.shape[0]} positive but {neg_logps.shape[0]} negative traces")
    if pos_logps.shape[0] == 0:
        raise StageError("redi: the batch has no pairs")
    pos = normalized_logp(pos_logps, pos_mask)
    neg = normalized_logp(neg_logps, neg_mask)
    loss = (-pos + alpha * neg).mean()
    return loss, _redi_metrics(pos.detach(), neg.detach())


def _redi_metrics(pos: Tensor, neg: Tensor) -> dict[str, float]:
    pos_mean = float(pos.mean()) if pos.numel() else 0.0
    neg_mean = float(neg.mean()) if neg.numel() else 0.0
    return {"pos_logp": pos_mean, "neg_logp": neg_mean, "gap": pos_mean - neg_mean}


def redi_unpaired_loss(
    logps: Tensor, mask: Tensor, label: Tensor, alpha: float = 0.8, *, reduction: str = "pair"
) -> tuple[Tensor, dict[str, float]]:
    """REDI on unpaired (prompt, completion, label) traces; the loss decomposes per trace (§6).

    Trace i contributes −log π(y_i)/|y_i| if ``label[i]`` (correct) else +α·log π(y_i)/|y_i|.
    ``reduction``: ``pair`` (default) divides the sum by N/2, so a batch of P correct and P wrong
    traces gives exactly :func:`redi_loss` on those P pairs (and the authors' learning rate
    transfers); ``trace`` divides by N (the plain per-trace mean, half as large).
    """
    if reduction not in ("pair", "trace"):
        raise StageError(f"redi: reduction must be pair or trace, got '{reduction}'")
    if logps.shape[0] == 0:
        raise StageError("redi: the batch has no traces")
    label = label.to(torch.bool)
    norm = normalized_logp(logps, mask)
    per_trace = torch.where(label, -norm, alpha * norm)
    denominator = logps.shape[0] / 2 if reduction == "pair" else logps.shape[0]
    loss = per_trace.sum() / denominator
    return loss, _redi_metrics(norm.detach()[label], norm.detach()[~label])


# --------------------------------------------------------------------------------------------
# PACED (§7)


@dataclass(frozen=True)
class PacedWeights:
    """w(p) = p^α(1 − p)^β per problem, the Σw-normalised weights, and whether to skip the batch."""

    raw: Tensor
    normalized: Tensor
    skipped: bool


def paced_weights(pass_rates: Tensor, alpha: float = 1.0, beta: float = 1.0) -> PacedWeights:
    """PACED per-problem weights (arXiv 2603.11178; docs/algorithms/reference.md §7), detached.

    ``pass_rates`` ∈ [0, 1] are the student's own success rates (from its G rollouts). With the
    default α = β = 1 the weight peaks at p = 0.5 and mastered or hopeless problems get 0. When every
    weight is 0, ``normalized`` is all zeros and ``skipped`` is True (skip the batch and count it).
    """
    if alpha < 0 or beta < 0:
        raise StageError(f"paced: alpha and beta must be >= 0, got {alpha}, {beta}")
    p = pass_rates.detach().double()
    if bool(((p < 0) | (p > 1)).any()):
        raise StageError("paced: pass rates must lie in [0, 1]")
    raw = p**alpha * (1 - p) ** beta
    total = raw.sum()
    skipped = not bool(total > 0)
    normalized = torch.zeros_like(raw) if skipped else raw / total
    dtype = pass_rates.dtype if pass_rates.is_floating_point() else torch.float32
    return PacedWeights(raw.to(dtype), normalized.to(dtype), skipped)


def paced_loss(token_kl: Tensor, mask: Tensor, weights: Tensor, total: float) -> Tensor:
    """PACED's loss of a batch of sequences (arXiv 2603.11178; docs/algorithms/reference.md §7): Σ_i (w_i / total)·KL_i
    with KL_i the token mean of ``token_kl`` ``[N, T]`` over ``mask`` and ``weights`` ``[N]`` the raw
    w(p_i). ``total`` is Σ w over the whole optimizer step (every micro-batch, every rank), so the
    micro-batch losses add up to the step's; the caller skips a step whose total is 0."""
    mask = mask.to(token_kl.dtype)
    per_sequence = (token_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    coef = (weights / total).to(device=per_sequence.device, dtype=per_sequence.dtype)
    return (coef * per_sequence).sum()


def paced_schedule(step: int, schedule: str = "forward_then_reverse", switch_step: int | None = None) -> str:
    """The KL direction PACED uses at ``step``: ``forward``, ``reverse``, or ``forward_then_reverse``
    (forward before ``switch_step``, reverse from it on; the paper's best).
    """
    if schedule not in SCHEDULES:
        raise StageError(f"paced: schedule must be one of {', '.join(SCHEDULES)}, got '{schedule}'")
    if schedule != "forward_then_reverse":
        return schedule
    if switch_step is None or switch_step < 0:
        raise StageError("paced: schedule forward_then_reverse needs a switch_step >= 0")
    return "forward" if step < switch_step else "reverse"

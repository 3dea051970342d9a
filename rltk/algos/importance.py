"""Truncated importance sampling (TIS) between the sampler and the trainer.

A fast inference engine (vLLM) and the training forward compute slightly different probabilities
for the same weights (kernels, precision, batch shapes), so samples drawn by the engine are
off-policy for the trainer even right after a weight sync. Yao et al. 2025 ("Your Efficient RL
Framework Secretly Brings You Off-Policy RL Training", fengyao.notion.site/off-policy-rl) correct
the policy gradient by the importance ratio between the trainer's behaviour log-probs and the
sampler's, truncated at a cap C so a few tokens cannot blow up the variance:

    diff_t   = old_logp_t − sampling_logp_t              (0 where either is missing / NaN)
    token:     ratio_t = exp(diff_t)
    sequence:  ratio_t = exp(Σ_t diff_t · mask_t)         (one ratio broadcast over the sequence)
    truncate:  w_t = min(ratio_t, C)
    mask:      w_t = ratio_t if ratio_t <= C else 0       (the token / the whole sequence is masked)

``w`` is detached and multiplies the **per-token policy loss** of the loss stage, before the extra
terms (KL, entropy) are added and before aggregation — where TRL's GRPOTrainer applies its
``importance_sampling_ratio`` (``per_token_loss * inputs["importance_sampling_ratio"]``). A masked
token keeps its place in the aggregation normaliser (weight 0, as in TRL). Defaults follow TRL's
``vllm_importance_sampling_clip_max`` = 3.0; level token + mode truncate is the blog's TIS.

Pure tensor code (docs/design.md §4); the trainer computes ``old_logps`` when the correction is on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

LEVELS = ("token", "sequence")
MODES = ("truncate", "mask")


@dataclass(frozen=True)
class ImportanceWeights:
    weights: Tensor  # float [N, T], detached, 0 on padding
    metrics: dict[str, float] = field(default_factory=dict)


def importance_weights(old_logps: Tensor, sampling_logps: Tensor, mask: Tensor, *, level: str = "token",
                       mode: str = "truncate", cap: float = 3.0) -> ImportanceWeights:
    """Weights ``w`` [N, T] and metrics ``is/ratio_min``, ``is/ratio_mean``, ``is/ratio_max`` (of the
    raw ratio over completion tokens, or over sequences at sequence level) and ``is/masked_share``
    (share of tokens or sequences whose ratio exceeded ``cap``: masked in mask mode, capped in
    truncate mode)."""
    if level not in LEVELS:
        raise ValueError(f"importance sampling level must be one of {LEVELS}, got {level!r}")
    if mode not in MODES:
        raise ValueError(f"importance sampling mode must be one of {MODES}, got {mode!r}")
    if cap <= 0:
        raise ValueError(f"importance sampling cap must be > 0, got {cap}")
    mask = mask.float()
    diff = torch.nan_to_num((old_logps.detach().float() - sampling_logps.detach().float()) * mask, nan=0.0)
    if level == "sequence":
        seq_ratio = torch.exp(diff.sum(-1))
        units, unit_mask = seq_ratio, mask.sum(-1) > 0
        ratio = seq_ratio.unsqueeze(-1).expand_as(diff)
    else:
        ratio = torch.exp(diff)
        units, unit_mask = ratio, mask > 0
    over = ratio > cap
    weights = torch.clamp(ratio, max=cap) if mode == "truncate" else torch.where(over, torch.zeros_like(ratio), ratio)
    weights = weights * mask
    valid = units[unit_mask]
    count = max(int(valid.numel()), 1)
    metrics = {
        "is/ratio_min": float(valid.min()) if valid.numel() else 1.0,
        "is/ratio_mean": float(valid.sum()) / count if valid.numel() else 1.0,
        "is/ratio_max": float(valid.max()) if valid.numel() else 1.0,
        "is/masked_share": float((valid > cap).sum()) / count,
    }
    return ImportanceWeights(weights, metrics)


def apply_importance_weights(per_token_loss: Tensor, weights: Tensor | None) -> Tensor:
    """The policy loss reweighted by ``weights`` (``None``: unchanged)."""
    if weights is None:
        return per_token_loss
    return per_token_loss * weights.to(per_token_loss.device, per_token_loss.dtype)

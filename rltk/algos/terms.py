"""Extra per-token terms added to the policy loss before aggregation (docs/algorithms/reference.md §0.4)."""
from __future__ import annotations

import torch
from torch import Tensor

from rltk.algos.registry import StageError, check_number, register_term
from rltk.algos.types import Advantages, LossOutput, Rollouts


@register_term("kl", needs=lambda params: {"ref_logps"} if params.get("coef", 0.0) else set())
def kl(
    logps: Tensor, rollouts: Rollouts, advantages: Advantages, *, coef: float = 0.0, estimator: str = "k3"
) -> LossOutput:
    """β·KL(π‖π_ref) per token with Schulman's estimators (http://joschu.net/blog/kl-approx.html):
    k1 = logp − ref, k2 = ½(logp − ref)², k3 = exp(ref − logp) − (ref − logp) − 1.

    The difference ref − logp is masked to 0 on padding (``rollouts.completion_mask`` == 0) before
    any estimator sees it, so padded positions contribute exactly 0 with a zero gradient whatever
    the current log-probs hold there (unmasked, k3's exp overflows once logp < about −88.7 at a pad
    position, and inf × 0 is NaN in the loss and the gradient).
    """
    if estimator not in ("k1", "k2", "k3"):
        raise StageError(f"kl: estimator must be k1, k2 or k3, got '{estimator}'")
    check_number("kl", "coef", coef, ">= 0 (a negative coefficient pushes away from the reference)", lambda v: v >= 0)
    if coef == 0.0:
        zero = torch.zeros_like(logps)
        return LossOutput(zero, {"kl": zero})
    valid = rollouts.completion_mask.to(logps.device) > 0
    delta = torch.where(valid, rollouts.ref_logps - logps, torch.zeros_like(logps))
    if estimator == "k1":
        value = -delta
    elif estimator == "k2":
        value = 0.5 * delta**2
    else:
        value = torch.exp(delta) - delta - 1
    return LossOutput(coef * value, {"kl": value.detach()})


@register_term("entropy", needs=lambda params: {"entropy"} if params.get("coef", 0.0) else set())
def entropy(logps: Tensor, rollouts: Rollouts, advantages: Advantages, *, coef: float = 0.0) -> LossOutput:
    """Entropy bonus: −coef · H(π(·|context)) per token (Williams & Peng 1991); a negative ``coef``
    penalises entropy instead."""
    check_number("entropy", "coef", coef, "", lambda v: True)
    if coef == 0.0:
        return LossOutput(torch.zeros_like(logps))
    return LossOutput(-coef * rollouts.entropy, {"entropy": rollouts.entropy.detach()})

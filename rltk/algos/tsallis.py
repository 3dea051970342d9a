"""GARL and PAFT: training on the Tsallis loss continuum (docs/algorithms/reference.md §5).

Lin & Ie 2026, "How Fast Should a Model Commit to Supervision? Training Reasoning Models on the
Tsallis Loss Continuum" (arXiv 2604.25907). No public code.

The loss family is J_q = E[−log_q P] with log_q(u) = (u^{1−q} − 1)/(1 − q) and P the success
probability: q = 0 is RLVR, q = 1 the log marginal likelihood, and ∇J_q = P^{−q}·∇J_0 — the RL
gradient amplified most when success is rare. Per group of M completions with weights
w_m ∈ [0, 1]:

- ``mode="binary"``: w_m = correctness (``weights="correct"``) or the reward clipped to [0, 1]
  (``weights="reward"``).
- ``mode="likelihood"`` (the paper's): w_m = p_θ(y* | x, z_m) = exp(``rollouts.answer_logps``),
  the teacher-forced probability of the gold answer after completion m's rationale. It is never
  exactly 0, which is what lets GARL leave a cold start; binary mode cannot.

**GARL** (estimator ``garl``): with w̄ the group mean and w̄_¬m the leave-one-out mean,
c_m = w_m / w̄^q − (w̄_¬m)^{1−q} and A_m = c_m / M^q. An all-zero group has A = 0, and a group of
one completion has A = 0 (no leave-one-out baseline). In likelihood mode the estimator also returns
per-completion *pathwise* weights w_m / (w̄^q·M^q) (:func:`garl_pathwise_weights`) for an SFT term
on the gold-answer tokens written after each rationale.

**PAFT** (loss ``paft``): per group, draw K = M indices with replacement from Categorical(w/Σw) and
do SFT (sequence log-likelihood, summed over tokens, averaged over the K draws) on the drawn
completions with the per-prompt weight w̄^{1−q}/M^q. Its expected gradient equals GARL's score term;
it has higher variance and is more stable when GARL destabilises. Groups with Σw = 0 are skipped.

Aggregation: both objectives are defined on *sequence* log-likelihoods (sums over tokens), averaged
over a group's completions and then over prompts. Use the aggregation ``seq_mean_token_sum``
registered here (Σ loss over the step's tokens / number of the step's sequences) to get exactly that
(for equal group sizes); ``token_mean`` and ``seq_mean_token_mean`` re-weight by length.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from rltk.algos.registry import StageError, register_advantage, register_aggregation, register_loss
from rltk.algos.types import Advantages, LossOutput, Rollouts

MODES = ("binary", "likelihood")
BINARY_WEIGHTS = ("correct", "reward")


def _needs(params: dict) -> set[str]:
    return {"answer_logps"} if params.get("mode", "binary") == "likelihood" else set()


def _check(stage: str, q: float, mode: str, weights: str) -> None:
    if not 0.0 <= q <= 1.0:
        raise StageError(f"{stage}: q must be in [0, 1] (0 = RLVR, 1 = log-likelihood), got {q}")
    if mode not in MODES:
        raise StageError(f"{stage}: mode must be binary or likelihood, got '{mode}'")
    if weights not in BINARY_WEIGHTS:
        raise StageError(f"{stage}: weights must be correct or reward, got '{weights}'")
    if mode == "likelihood" and weights != "correct":
        raise StageError(f"{stage}: weights='{weights}' applies to mode=binary only")


def tsallis_weights(rollouts: Rollouts, *, mode: str = "binary", weights: str = "correct") -> Tensor:
    """Per-completion weights w_m ∈ [0, 1], float64 ``[N]`` (§5: binary or likelihood mode)."""
    if mode == "likelihood":
        if rollouts.answer_logps is None:
            raise StageError(
                "mode=likelihood needs rollouts.answer_logps (log p(gold answer | prompt, completion))"
            )
        return torch.exp(rollouts.answer_logps.detach().double()).clamp(max=1.0)
    if weights == "reward":
        return rollouts.rewards.detach().double().clamp(0.0, 1.0)
    return rollouts.correct.double()


@dataclass(frozen=True)
class GroupWeights:
    """The weights with their group sums: per group ``[G]`` and broadcast to rows ``[N]``."""

    w: Tensor  # float64 [N]
    group: Tensor  # long [N], dense group index
    group_total: Tensor  # float64 [num_groups], Σ_{m in group} w_m
    group_size: Tensor  # float64 [num_groups], M

    @classmethod
    def of(cls, w: Tensor, group: Tensor, num_groups: int) -> "GroupWeights":
        w = w.double()
        total = torch.zeros(num_groups, dtype=w.dtype, device=w.device).index_add_(0, group, w)
        size = torch.zeros_like(total).index_add_(0, group, torch.ones_like(w))
        return cls(w, group, total, size)

    @property
    def num_groups(self) -> int:
        return int(self.group_total.shape[0])

    @property
    def group_mean(self) -> Tensor:
        """w̄ per group."""
        return self.group_total / self.group_size.clamp(min=1)

    @property
    def total(self) -> Tensor:
        """Σw per row."""
        return self.group_total[self.group]

    @property
    def size(self) -> Tensor:
        """M per row."""
        return self.group_size[self.group]

    @property
    def mean(self) -> Tensor:
        """w̄ per row."""
        return self.group_mean[self.group]


def garl_advantage_values(gw: GroupWeights, q: float) -> Tensor:
    """A_m = (w_m/w̄^q − (w̄_¬m)^{1−q}) / M^q (§5), float64 ``[N]``; 0 for Σw = 0 or M = 1."""
    valid = (gw.total > 0) & (gw.size > 1)
    mean = torch.where(valid, gw.mean, torch.ones_like(gw.mean))
    loo = ((gw.total - gw.w) / (gw.size - 1).clamp(min=1)).clamp(min=0.0)
    c = gw.w / mean**q - loo ** (1.0 - q)
    values = c / gw.size**q
    return torch.where(valid, values, torch.zeros_like(values))


def pathwise_weight_values(gw: GroupWeights, q: float) -> Tensor:
    """w_m / (w̄^q·M^q) = w_m / (Σw)^q, float64 ``[N]``; 0 where Σw = 0."""
    valid = gw.total > 0
    total = torch.where(valid, gw.total, torch.ones_like(gw.total))
    return torch.where(valid, gw.w / total**q, torch.zeros_like(gw.w))


def garl_pathwise_weights(rollouts: Rollouts, *, q: float = 0.75) -> Tensor:
    """Detached per-completion weights w_m/(w̄^q·M^q) of GARL's pathwise SFT term (likelihood mode).

    The trainer adds Σ_m weight_m·(−log p_θ(y* | x, z_m)) — the gold answer's log-likelihood summed
    over its tokens, after completion m — aggregated per completion like the policy loss (mean over
    sequences; see ``seq_mean_token_sum``). Also the expectation of PAFT's per-sequence coefficient.
    """
    _check("garl", q, "likelihood", "correct")
    group, num_groups = rollouts.group_index()
    gw = GroupWeights.of(tsallis_weights(rollouts, mode="likelihood"), group, num_groups)
    return pathwise_weight_values(gw, q).to(rollouts.answer_logps.dtype).detach()


def _garl_metrics(gw: GroupWeights, values: Tensor, q: float) -> dict[str, float]:
    mean = gw.group_mean
    finite = mean > 0
    metrics = {
        "max_advantage": float(values.max()) if values.numel() else 0.0,
        "zero_weight_groups": float((~finite).double().mean()) if gw.num_groups else 0.0,
        "mean_weight": float(mean.mean()) if gw.num_groups else 0.0,
    }
    if bool(finite.any()):  # w̄^(−q) is infinite on an all-zero group: averaged over the others
        metrics["amplification"] = float((mean[finite] ** -q).mean())
    return metrics


@register_advantage("garl", needs=_needs, group_baseline=True)
def garl(
    rollouts: Rollouts, *, q: float = 0.75, mode: str = "binary", weights: str = "correct"
) -> Advantages:
    """GARL advantage (Lin & Ie 2026, arXiv 2604.25907; docs/algorithms/reference.md §5).

    A_m = (w_m/w̄^q − (w̄_¬m)^{1−q}) / M^q with w from ``mode`` (binary: correctness, or rewards
    clipped to [0, 1] with ``weights="reward"``; likelihood: exp(answer_logps)). q = 0 gives RLOO,
    q = 1 gives (w_m/w̄ − 1)/M. Likelihood mode also returns ``answer_sft_weights``
    (w_m/(w̄^q·M^q)) for the pathwise SFT term on the gold answer. Metrics: ``amplification``
    (mean w̄^{−q} over groups with w̄ > 0; absent when there is none), ``max_advantage``,
    ``zero_weight_groups`` (share of groups with Σw = 0), ``mean_weight``.
    """
    _check("garl", q, mode, weights)
    group, num_groups = rollouts.group_index()
    gw = GroupWeights.of(tsallis_weights(rollouts, mode=mode, weights=weights), group, num_groups)
    values = garl_advantage_values(gw, q)
    dtype = rollouts.rewards.dtype
    sft = pathwise_weight_values(gw, q).to(dtype).detach() if mode == "likelihood" else None
    metrics = _garl_metrics(gw, values, q)
    return Advantages(values.to(dtype).detach(), metrics=metrics, answer_sft_weights=sft)


# --------------------------------------------------------------------------------------------
# PAFT


def paft_group_weight(mean_weight: Tensor, size: Tensor, q: float) -> Tensor:
    """PAFT's per-prompt weight w̄^{1−q} / M^q (§5)."""
    return mean_weight.double() ** (1.0 - q) / size.double() ** q


def paft_draw_seed(seed: int, step: int, group_id: int, weights: Tensor) -> int:
    """A 63-bit generator seed from (seed, step, group id, the group's weight pattern).

    Hashed with BLAKE2b (not Python's salted ``hash``), so it is the same in every process, on every
    rank and however the step is cut into micro-batches.
    """
    pattern = ",".join(f"{x:.6e}" for x in weights.double().tolist())
    digest = hashlib.blake2b(f"{seed}|{step}|{group_id}|{pattern}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _step_of(rollouts: Rollouts) -> int:
    step = rollouts.step
    if isinstance(step, Tensor):
        step = int(step.item())
    if not isinstance(step, int) or isinstance(step, bool):
        raise StageError(f"paft: rollouts.step must be an int (the optimizer step), got {step!r}")
    return step


@dataclass(frozen=True)
class PaftDraw:
    """One PAFT resampling of a batch.

    ``counts`` [N]: how often each completion was drawn (K = M draws per group). ``coef`` [N]:
    the per-sequence SFT coefficient M·(count_m/K)·w̄^{1−q}/M^q = count_m·w̄^{1−q}/M^q (float64,
    detached). ``skipped`` [N]: rows of groups with Σw = 0 (no draw, coefficient 0).
    """

    counts: Tensor
    coef: Tensor
    skipped: Tensor
    skipped_groups: int
    num_groups: int


def paft_draw(
    rollouts: Rollouts,
    *,
    q: float = 0.75,
    mode: str = "binary",
    weights: str = "correct",
    seed: int = 0,
) -> PaftDraw:
    """Resample each group's completions from Categorical(w/Σw), K = M times with replacement.

    Each group gets its own ``torch.Generator`` seeded by :func:`paft_draw_seed` from ``seed``,
    ``rollouts.step``, the group's id in ``rollouts.group_ids`` and its weights: deterministic,
    independent of micro-batching and ranks, and fresh every step. In likelihood mode the loss's
    stage record declares this draw's coefficients as the gold-answer SFT weights
    (:func:`paft_answer_sft_weights`).
    """
    _check("paft", q, mode, weights)
    group, num_groups = rollouts.group_index()
    gw = GroupWeights.of(tsallis_weights(rollouts, mode=mode, weights=weights), group, num_groups)
    step = _step_of(rollouts)
    counts = torch.zeros_like(group)
    skipped_groups = 0
    for g in range(num_groups):
        rows = (group == g).nonzero(as_tuple=True)[0]
        w = gw.w[rows]
        total = float(w.sum())
        if total <= 0:
            skipped_groups += 1
            continue
        generator = torch.Generator().manual_seed(
            paft_draw_seed(seed, step, int(rollouts.group_ids[rows[0]]), w)
        )
        drawn = torch.multinomial((w / total).cpu(), len(rows), replacement=True, generator=generator)
        counts[rows] = torch.bincount(drawn, minlength=len(rows)).to(counts.device)
    skipped = gw.total <= 0
    group_weight = paft_group_weight(gw.mean, gw.size, q)
    coef = torch.where(skipped, torch.zeros_like(gw.w), counts.double() * group_weight)
    return PaftDraw(counts, coef.detach(), skipped, skipped_groups, num_groups)


def paft_answer_sft_weights(rollouts: Rollouts, *, q: float = 0.75, mode: str = "binary", weights: str = "correct",
                            seed: int = 0) -> Tensor | None:
    """PAFT's gold-answer SFT weights: in likelihood mode the coefficients of this step's draw
    (:func:`paft_draw`, the same draw the loss trains on); ``None`` in binary mode."""
    if mode != "likelihood":
        return None
    return paft_draw(rollouts, q=q, mode=mode, weights=weights, seed=seed).coef.float()


@register_loss("paft", needs=_needs, whole_groups=True, answer_sft_weights=paft_answer_sft_weights)
def paft(
    logps: Tensor,
    rollouts: Rollouts,
    advantages: Advantages,
    *,
    q: float = 0.75,
    mode: str = "binary",
    weights: str = "correct",
    seed: int = 0,
) -> LossOutput:
    """PAFT posterior-resampled SFT (Lin & Ie 2026, arXiv 2604.25907; docs/algorithms/reference.md §5).

    Per-token loss −coef_m·logp with coef_m = count_m·w̄^{1−q}/M^q from :func:`paft_draw` (K = M
    draws per group, so M·count_m/K = count_m). Under ``seq_mean_token_sum`` (Σ over tokens /
    number of sequences) the step loss is, for equal group sizes, the mean over prompts of
    −w̄^{1−q}/M^q · (1/K)·Σ_k log π(y_{m_k}|x) — the paper's objective; its expected gradient equals
    GARL's score term. ``advantages`` are ignored (any estimator may run alongside, e.g. ``garl``
    for its metrics). Token metrics: ``skipped_group`` (1 on every token of a Σw = 0 group),
    ``sampled`` (1 on drawn completions), ``coef``.
    """
    draw = paft_draw(rollouts, q=q, mode=mode, weights=weights, seed=seed)
    coef = draw.coef.to(device=logps.device, dtype=logps.dtype).unsqueeze(-1)
    per_token = -coef * logps
    shape = logps.shape

    def broadcast(row_values: Tensor) -> Tensor:
        return row_values.to(device=logps.device, dtype=logps.dtype).unsqueeze(-1).expand(shape)

    metrics = {
        "skipped_group": broadcast(draw.skipped.double()),
        "sampled": broadcast((draw.counts > 0).double()),
        "coef": broadcast(draw.coef),
    }
    return LossOutput(per_token, metrics)


def _sequence_count(mask: Tensor, max_completion_length: int) -> float:
    return float((mask.sum(-1) > 0).sum())


@register_aggregation("seq_mean_token_sum", normalizer=_sequence_count)
def seq_mean_token_sum(per_token_loss: Tensor, mask: Tensor, normalizer: float) -> Tensor:
    """Σ loss over the step's tokens / number of the step's sequences: the mean over completions of
    each sequence's *summed* loss — sequence log-likelihood objectives such as PAFT and GARL
    (Lin & Ie 2026, arXiv 2604.25907, §5). Additive normaliser, so micro-batch invariant.
    """
    return (per_token_loss * mask).sum() / normalizer

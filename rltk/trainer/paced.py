"""PACED distillation as a loss of the RL loop (arXiv 2603.11178; docs/algorithms/reference.md §7).

For each optimizer step, with p_g the pass rate of group g in this step's own rollouts and
w_i = p_g^α(1 − p_g)^β for every completion i of g (:func:`rltk.algos.distill.paced_weights`):

    L_PACED = coef · Σ_i w_i · KL_i / Σ_i w_i,    KL_i = (1/|y_i|) Σ_t KL_t(teacher ‖ student or reverse)

The sums run over every completion of the optimizer step on every rank: Σ_i w_i is computed once
per step and all-reduced before any backward, exactly as the token-mean normaliser is
(docs/algorithms/reference.md §0.3), so the loss and gradient do not depend on micro-batching or the number of
processes. A step whose weights are all 0 (every group at p = 0 or 1) contributes nothing and is
counted. The KL direction follows ``schedule`` by optimizer step (:func:`paced_schedule`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rltk.algos.chunked_kl import linear_kl
from rltk.algos.distill import paced_loss, paced_schedule, paced_weights
from rltk.algos.types import Rollouts
from rltk.schema import PacedConfig, Recipe
from rltk.trainer.distributed import gathered
from rltk.trainer.logprobs import TokenBatch
from rltk.trainer.teacher import Teacher, shared_vocabulary

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def pass_rates(rollouts: Rollouts) -> Tensor:
    """Each completion's group pass rate (share of correct completions in its group) ``[N]``."""
    index, groups = rollouts.group_index()
    solved = torch.zeros(groups, dtype=torch.float64).index_add_(0, index, rollouts.correct.double())
    sizes = torch.zeros(groups, dtype=torch.float64).index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
    return (solved / sizes)[index]


@dataclass(frozen=True)
class PacedPlan:
    """One optimizer step's PACED inputs: raw weights of every row, their global sum, the direction."""

    weights: Tensor  # [N] w(p) of each completion of the batch (rows outside the step unused)
    total: float  # Σ w over the step's rows on all ranks
    direction: str

    @property
    def skipped(self) -> bool:
        return not self.total > 0


class PacedObjective:
    """The PACED loss of one micro-batch, given the step's :class:`PacedPlan`."""

    def __init__(self, cfg: PacedConfig, teacher: Teacher):
        self.cfg = cfg
        self.teacher = teacher

    def teacher_tokens(self, tokens: TokenBatch, examples, prompts: list[str], group_size: int) -> TokenBatch:
        """The rollout batch's completions after the teacher's prompts (privileged or the student's)."""
        return self.teacher.tokens(tokens, self.teacher.prompts(examples, prompts), group_size)

    def plan(self, rollouts: Rollouts, rows: Tensor, step: int, reduce_sum) -> PacedPlan:
        """Weights for the optimizer step over ``rows`` (whole groups); ``reduce_sum`` sums a float
        over ranks."""
        weights = paced_weights(pass_rates(rollouts), self.cfg.alpha, self.cfg.beta).raw.double()
        total = reduce_sum(float(weights[rows].sum()))
        return PacedPlan(weights, total, paced_schedule(step, self.cfg.schedule, self.cfg.switch_step))

    def loss(self, student, student_hidden: Tensor, teacher_batch: TokenBatch, mask: Tensor, weights: Tensor,
             plan: PacedPlan) -> tuple[Tensor, Tensor]:
        """coef · Σ_{i ∈ micro-batch} w_i·KL_i / Σ_step w, and the per-token KL ``[n, T]`` (detached).

        ``student`` is the unwrapped student (its LM head, and the privileged teacher's forward);
        ``student_hidden`` its final hidden states at the completion positions, with gradient."""
        teacher_hidden, teacher_weight = self.teacher.hidden(student, teacher_batch)
        student_weight = student.get_output_embeddings().weight
        vocab = shared_vocabulary(student_weight, teacher_weight, len(self.teacher.tokenizer))
        mask = mask.to(student_hidden.device)
        token_kl = linear_kl(student_hidden, student_weight, teacher_hidden.to(student_hidden.device), teacher_weight,
                             mask, plan.direction, self.cfg.chunk_size, vocab=vocab,
                             gather=gathered(student_weight, teacher_weight))
        return self.cfg.coef * paced_loss(token_kl, mask, weights, plan.total), token_kl.detach()

    def batch_metrics(self, rollouts: Rollouts) -> dict[str, float]:
        """Per-prompt weight quantiles and the shares of prompts at p = 0 and p = 1 (this rank)."""
        _, sizes = torch.unique_consecutive(rollouts.group_ids, return_counts=True)
        p = pass_rates(rollouts)[sizes.cumsum(0) - sizes]  # one value per group (its first row)
        w = paced_weights(p, self.cfg.alpha, self.cfg.beta).raw.double()
        metrics = {f"paced/weight_q{int(q * 100)}": float(torch.quantile(w, q)) for q in QUANTILES}
        metrics.update({"paced/weight_mean": float(w.mean()), "paced/share_p0": float((p == 0).double().mean()),
                        "paced/share_p1": float((p == 1).double().mean())})
        return metrics


def make_paced(recipe: Recipe, student_tokenizer, accelerator) -> PacedObjective | None:
    """The recipe's PACED objective with its teacher loaded and placed by ``accelerator`` (call
    after the student is prepared), or ``None`` without ``algorithm.paced``."""
    if recipe.algorithm.paced is None:
        return None
    teacher = Teacher(recipe.teacher, student_tokenizer, accelerator, recipe.data.answer_template)
    return PacedObjective(recipe.algorithm.paced, teacher)

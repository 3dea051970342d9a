"""The loss of one optimizer step as a sum of components (docs/design.md §10): the policy loss with its
terms, the SFT term on the gold answer (GARL's pathwise term and PAFT in likelihood mode,
docs/algorithms/reference.md §5) and PACED distillation (docs/algorithms/reference.md §7).

Each component weighs its own tokens and divides by its own step-global normaliser, summed over
every micro-batch of the optimizer step and over all ranks *before* any backward
(docs/algorithms/reference.md §0.3), so the step's loss and gradient do not depend on how it is cut. Each
micro-batch loss is multiplied by the number of ranks, so DDP's gradient average yields the global
sum. A component has three calls, made by ``RLTrainer.accumulate_gradients``:

- ``begin(batch, rows, step) -> bool``: its normaliser for the optimizer step over ``rows`` (a
  collective: every rank calls it); False when it contributes nothing this step;
- ``loss(batch, mb, out) -> (scalar, per-token metrics)``: micro-batch ``mb``, given the policy
  forward ``out`` the loop runs once for every component (with entropy or final hidden states when
  a component ``wants`` them);
- ``metrics() -> dict``: the step's metrics (collectives again, after the last micro-batch).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Callable, Protocol

import torch
from torch import Tensor

from rltk.algos.pipeline import AlgorithmPipeline
from rltk.algos.types import Advantages
from rltk.trainer.batch import RolloutBatch
from rltk.trainer.logprobs import ForwardOptions, ForwardOutput, forward_logps

ReduceSum = Callable[[float], float]  # a float summed over ranks


class LossComponent(Protocol):
    wants_entropy: bool  # the shared policy forward must return token entropy (with gradient)
    wants_final_hidden: bool  # ... or the final hidden states

    def begin(self, batch: RolloutBatch, rows: Tensor, step: int) -> bool: ...

    def loss(self, batch: RolloutBatch, mb: Tensor, out: ForwardOutput) -> tuple[Tensor, dict[str, Tensor]]: ...

    def metrics(self) -> dict[str, float]: ...


def kept_token_mask(batch: RolloutBatch) -> Tensor:
    """``[N, T]``: completion tokens of the completions the advantage stages keep."""
    return batch.rollouts.completion_mask * batch.advantages.kept().float().unsqueeze(-1)


class PolicyLoss:
    """``pg_coef`` × the pipeline's aggregated policy loss plus terms. Normaliser: the aggregation's,
    over the step's kept completion tokens. Its per-token metrics are averaged over those tokens."""

    wants_final_hidden = False

    def __init__(self, pipeline: AlgorithmPipeline, pg_coef: float, max_new_tokens: int, ranks: int,
                 reduce_sum: ReduceSum, wants_entropy: bool):
        self.pipeline, self.pg_coef, self.max_new_tokens = pipeline, pg_coef, max_new_tokens
        self.ranks, self.reduce_sum, self.wants_entropy = ranks, reduce_sum, wants_entropy

    def begin(self, batch: RolloutBatch, rows: Tensor, step: int) -> bool:
        self.mask = kept_token_mask(batch)
        self.normalizer = self.reduce_sum(self.pipeline.normalizer(self.mask[rows], self.max_new_tokens))
        self.token_sums: dict[str, float] = defaultdict(float)
        self.token_count = 0.0
        self.active = self.pg_coef > 0 and self.normalizer > 0
        return self.active

    def loss(self, batch: RolloutBatch, mb: Tensor, out: ForwardOutput) -> tuple[Tensor, dict[str, Tensor]]:
        rollouts = batch.rollouts.select(mb)
        if out.entropy is not None:
            rollouts = replace(rollouts, entropy=out.entropy)
        adv = batch.advantages
        advantages = Advantages(adv.values[mb], None if adv.keep is None else adv.keep[mb])
        per_token, token_metrics = self.pipeline.per_token_loss(out.logps, rollouts, advantages)
        mask = self.mask[mb].to(out.logps.device)
        loss = self.pipeline.aggregate(per_token, mask, self.normalizer) * self.ranks
        for name, value in token_metrics.items():
            self.token_sums[name] += float((value.detach() * mask).sum())
        self.token_count += float(mask.sum())
        return self.pg_coef * loss, token_metrics

    def metrics(self) -> dict[str, float]:
        if not self.token_sums:
            return {}
        sums = [self.reduce_sum(value) for value in (self.token_count, *self.token_sums.values())]
        return {name: total / max(sums[0], 1.0) for name, total in zip(self.token_sums, sums[1:])}


class AnswerSFTLoss:
    """``pg_coef`` × −Σ weight_m · log p(gold answer | prompt, rationale_m), aggregated like the
    policy loss (its aggregation, over the policy's normaliser); the weights are the stages'
    declared ``answer_sft_weights`` (rltk.algos.pipeline.AlgorithmPipeline.answer_sft_weights). It
    runs its own forward over the answer tokens."""

    wants_entropy = wants_final_hidden = False

    def __init__(self, policy: PolicyLoss, model, temperature: float, options: ForwardOptions):
        self.policy, self.model, self.temperature, self.forward_options = policy, model, temperature, options

    def begin(self, batch: RolloutBatch, rows: Tensor, step: int) -> bool:
        return batch.answer_sft is not None and self.policy.active

    def loss(self, batch: RolloutBatch, mb: Tensor, out: ForwardOutput) -> tuple[Tensor, dict[str, Tensor]]:
        answer = forward_logps(self.model, batch.answer.tokens.rows(mb), self.temperature, options=self.forward_options)
        keep = batch.advantages.kept()[mb].float().unsqueeze(-1)
        mask = (batch.answer.answer_mask[mb] * keep).to(answer.logps.device)
        weights = batch.answer_sft[mb].to(answer.logps.device).unsqueeze(-1)
        pipeline = self.policy.pipeline
        loss = pipeline.aggregate(-weights * answer.logps, mask, self.policy.normalizer) * self.policy.ranks
        return self.policy.pg_coef * loss, {}

    def metrics(self) -> dict[str, float]:
        return {}


class PacedLoss:
    """PACED: coef · Σ_i w_i·KL_i / Σ_step w (rltk/trainer/paced.py), from the student's final hidden
    states through the LM head in chunks. Steps whose weights are all 0 are skipped and counted."""

    wants_entropy = False

    def __init__(self, paced, unwrap: Callable[[], torch.nn.Module], ranks: int, reduce_sum: ReduceSum,
                 counters: dict[str, int]):
        self.paced, self.unwrap, self.ranks, self.reduce_sum, self.counters = paced, unwrap, ranks, reduce_sum, counters
        self.wants_final_hidden = False

    def begin(self, batch: RolloutBatch, rows: Tensor, step: int) -> bool:
        self.plan = self.paced.plan(batch.rollouts, rows, step, self.reduce_sum)
        if self.plan.skipped:
            self.counters["paced_skipped_steps"] += 1
        self.step_tokens, self.kl_sum = batch.rollouts.completion_mask[rows], 0.0
        self.wants_final_hidden = not self.plan.skipped
        return self.wants_final_hidden

    def loss(self, batch: RolloutBatch, mb: Tensor, out: ForwardOutput) -> tuple[Tensor, dict[str, Tensor]]:
        paced, token_kl = self.paced.loss(self.unwrap(), out.final_hidden, batch.teacher_tokens.rows(mb),
                                          batch.rollouts.completion_mask[mb], self.plan.weights[mb], self.plan)
        self.kl_sum += float(token_kl.sum())
        return paced * self.ranks, {}

    def metrics(self) -> dict[str, float]:
        """The step's KL direction (0 forward, 1 reverse), whether it was skipped, skipped steps so far
        and, when it ran, the mean token KL over the step's completion tokens on all ranks."""
        plan = self.plan
        metrics = {"paced/reverse": float(plan.direction == "reverse"), "paced/skipped": float(plan.skipped),
                   "paced/skipped_steps": float(self.counters["paced_skipped_steps"])}
        if not plan.skipped:
            tokens = self.reduce_sum(float(self.step_tokens.sum()))
            metrics[f"paced/kl_{plan.direction}"] = self.reduce_sum(self.kl_sum) / max(tokens, 1.0)
        return metrics

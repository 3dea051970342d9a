"""The advantage/loss pipeline a recipe selects: estimator → modifiers → loss + terms → aggregation.

Built once from the recipe's ``algorithm`` section; the trainer calls it with tensors only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from rltk.algos.importance import apply_importance_weights
from rltk.algos.registry import Stage, StageError, get_stage, validate_params
from rltk.algos.types import Advantages, LossOutput, Rollouts


@dataclass(frozen=True)
class StageCall:
    """A resolved stage and the recipe parameters it is called with."""

    stage: Stage
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, kind: str, spec: str | dict[str, Any]) -> "StageCall":
        """``"name"`` or ``{name: ..., **params}`` -> a validated call."""
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise StageError(f"{kind} entry must be a name or a mapping with a 'name' key, got {spec!r}")
        params = {k: v for k, v in spec.items() if k != "name"}
        stage = get_stage(kind, spec["name"])
        validate_params(stage, params)
        return cls(stage, params)

    @property
    def name(self) -> str:
        return self.stage.name

    def needs(self) -> set[str]:
        return self.stage.needs(self.params)

    def __call__(self, *args: Any) -> Any:
        return self.stage.fn(*args, **self.params)


def _dummy_rollouts() -> Rollouts:
    """Two groups (roles pos, neg) of two completions with every optional field filled."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    return Rollouts(
        group_ids=torch.tensor([0, 0, 1, 1]),
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        correct=torch.tensor([True, False, True, False]),
        completion_mask=mask,
        truncated=torch.zeros(4, dtype=torch.bool),
        old_logps=-torch.rand(4, 2, generator=generator),
        ref_logps=-torch.rand(4, 2, generator=generator),
        hidden=torch.randn(4, 2, 4, generator=generator),
        answer_logps=-torch.rand(4, generator=generator),
        roles=("pos", "neg"),
        entropy=torch.rand(4, 2, generator=generator),
        extra={"step": 0},
    )


def _as_loss_output(value: Tensor | LossOutput) -> LossOutput:
    return value if isinstance(value, LossOutput) else LossOutput(value)


class AlgorithmPipeline:
    """One estimator, zero or more modifiers, one loss, extra terms and one aggregation."""

    def __init__(
        self,
        advantage: Sequence[str | dict[str, Any]],
        loss: str | dict[str, Any] = "ppo_clip",
        aggregation: str | dict[str, Any] = "token_mean",
        terms: Sequence[str | dict[str, Any]] = (),
    ):
        if not advantage:
            raise StageError("algorithm.advantage must list at least an estimator, e.g. [{name: grpo}]")
        self.estimator = StageCall.from_spec("advantage", advantage[0])
        self.modifiers = [StageCall.from_spec("modifier", spec) for spec in advantage[1:]]
        self.loss = StageCall.from_spec("loss", loss)
        self.aggregation = StageCall.from_spec("aggregation", aggregation)
        self.terms = [StageCall.from_spec("term", spec) for spec in terms]

    def stages(self) -> list[StageCall]:
        return [self.estimator, *self.modifiers, self.loss, *self.terms]

    def needs(self) -> set[str]:
        """Union of every selected stage's declared needs."""
        return set().union(*(call.needs() for call in self.stages()))

    def compute_advantages(self, rollouts: Rollouts) -> tuple[Advantages, dict[str, float]]:
        """Run the estimator then each modifier; metrics are prefixed by the stage name."""
        advantages = self.estimator(rollouts)
        metrics = {f"{self.estimator.name}/{k}": v for k, v in advantages.metrics.items()}
        for modifier in self.modifiers:
            previous, advantages = advantages, modifier(rollouts, advantages)
            if advantages.metrics is not previous.metrics:  # a stage that passes its input through adds none
                metrics.update({f"{modifier.name}/{k}": v for k, v in advantages.metrics.items()})
        return advantages, metrics

    def per_token_loss(
        self, logps: Tensor, rollouts: Rollouts, advantages: Advantages
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy loss plus every term, per token ``[N, T]``, and per-token metrics by name.

        ``rollouts.is_weights`` (sampler→trainer truncated importance sampling) reweights the policy
        loss only, before the terms are added (as TRL's GRPOTrainer does)."""
        out = _as_loss_output(self.loss(logps, rollouts, advantages))
        total = apply_importance_weights(out.per_token, rollouts.is_weights)
        metrics = {f"{self.loss.name}/{k}": v for k, v in out.token_metrics.items()}
        for term in self.terms:
            term_out = _as_loss_output(term(logps, rollouts, advantages))
            total = total + term_out.per_token
            metrics.update({f"{term.name}/{k}": v for k, v in term_out.token_metrics.items()})
        return total, metrics

    def dry_run(self) -> None:
        """Run every stage once on a tiny synthetic batch, so a bad knob value (``alpha: -1``,
        ``fn: tanh``) raises its StageError when the recipe loads instead of at the first step.

        Only StageError propagates: it is the stages' own parameter validation."""
        rollouts = _dummy_rollouts()
        advantages, _ = self.compute_advantages(rollouts)
        logps = torch.full(rollouts.completion_mask.shape, -1.0, requires_grad=True)
        per_token, _ = self.per_token_loss(logps, rollouts, advantages)
        self.aggregate(per_token, rollouts.completion_mask, max(self.normalizer(rollouts.completion_mask, 2), 1.0))

    def normalizer(self, mask: Tensor, max_completion_length: int) -> float:
        """This rank's share of the step normaliser (summed over micro-batches and ranks)."""
        return self.aggregation.stage.normalizer(mask, max_completion_length)

    def aggregate(self, per_token_loss: Tensor, mask: Tensor, normalizer: float) -> Tensor:
        return self.aggregation(per_token_loss, mask, normalizer)

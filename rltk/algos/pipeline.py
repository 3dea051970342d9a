"""The advantage/loss pipeline a recipe selects: reward shaping → estimator → modifiers → loss + terms →
aggregation,
and :class:`Algorithm`, the whole ``algorithm`` section (pipeline and sampler) resolved once when the
recipe loads (rltk.validate). The trainer calls them with tensors only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from rltk.algos.importance import apply_importance_weights
from rltk.algos.registry import Stage, StageError, get_stage, validate_params
from rltk.algos.samplers import Sampler
from rltk.algos.types import Advantages, LossOutput, Rollouts
from rltk.describe import describe_exception, function_name


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
        """Call the stage; any exception it raises becomes a one-line :class:`StageFailure`
        naming the stage and its function (the original is kept as ``__cause__``)."""
        try:
            return self.stage.fn(*args, **self.params)
        except StageFailure:
            raise
        except StageError as exc:  # the stage's own one-line message (e.g. a bad knob value)
            raise StageFailure(self.stage, str(exc), plain=True) from exc
        except Exception as exc:
            raise StageFailure(self.stage, f"raised {describe_exception(exc)}") from exc


class StageFailure(StageError):
    """A stage raised, or returned something of the wrong type or shape. ``where`` names the stage
    and its function, ``detail`` what went wrong; the trainer adds the step. When the stage raised
    a :class:`StageError` itself (``plain``), the message is that error's, unchanged."""

    def __init__(self, stage: Stage, detail: str, *, plain: bool = False):
        self.kind, self.name, self.function = stage.kind, stage.name, function_name(stage.fn)
        self.where = f"{stage.kind} '{stage.name}' ({self.function})"
        self.detail = f"failed: {detail}" if plain else detail
        self.plain = plain
        super().__init__(detail if plain else f"{self.where} {detail}")


def _type_name(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {list(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def _check_advantages(call: StageCall, value: Any, rollouts: Rollouts) -> Advantages:
    """An estimator's or modifier's output: ``Advantages`` with float values ``[N]`` or ``[N, T]``
    and ``keep`` None or bool ``[N]``."""
    n, t = rollouts.num_completions, rollouts.completion_mask.shape[-1]
    if not isinstance(value, Advantages):
        raise StageFailure(call.stage, f"returned {_type_name(value)}; expected rltk.algos.Advantages")
    values, keep = value.values, value.keep
    if not (torch.is_tensor(values) and values.is_floating_point()):
        what = f"{values.dtype} values" if torch.is_tensor(values) else f"values that are {_type_name(values)}"
        raise StageFailure(call.stage, f"returned Advantages with {what}; expected a float tensor")
    if tuple(values.shape) not in ((n,), (n, t)):
        raise StageFailure(call.stage, f"returned advantages of shape {list(values.shape)}; expected [N] = [{n}] "
                                       f"or [N, T] = [{n}, {t}]")
    if keep is not None and not (torch.is_tensor(keep) and keep.dtype == torch.bool and tuple(keep.shape) == (n,)):
        got = f"{keep.dtype} of shape {list(keep.shape)}" if torch.is_tensor(keep) else _type_name(keep)
        raise StageFailure(call.stage, f"returned Advantages.keep {got}; expected None or a bool tensor [N] = [{n}]")
    return value


def _check_shaping(call: StageCall, value: Any, rollouts: Rollouts) -> Tensor:
    """A shaping stage's output: a finite float tensor ``[N]``, one term per completion."""
    n = rollouts.num_completions
    if not (torch.is_tensor(value) and value.is_floating_point() and tuple(value.shape) == (n,)):
        got = f"{value.dtype} of shape {list(value.shape)}" if torch.is_tensor(value) else _type_name(value)
        raise StageFailure(call.stage, f"returned {got}; expected a float tensor [N] = [{n}] (one term per completion)")
    if not torch.isfinite(value).all():
        raise StageFailure(call.stage, "returned a non-finite reward term")
    return value.to(rollouts.rewards.dtype)


def _check_loss(call: StageCall, value: Any, logps: Tensor) -> LossOutput:
    """A loss's or term's output: a per-token ``[N, T]`` tensor or a ``LossOutput`` holding one,
    with per-token metrics that broadcast to ``[N, T]``. A scalar is refused: averaging is the
    aggregation's job."""
    shape = list(logps.shape)
    out = value if isinstance(value, LossOutput) else LossOutput(value) if torch.is_tensor(value) else None
    if out is None:
        raise StageFailure(call.stage, f"returned {_type_name(value)}; expected a per-token tensor {shape} "
                                       "or rltk.algos.LossOutput")
    per_token = out.per_token
    if not torch.is_tensor(per_token):
        raise StageFailure(call.stage, f"returned LossOutput.per_token that is {_type_name(per_token)}; "
                                       f"expected a tensor [N, T] = {shape}")
    if list(per_token.shape) != shape:
        scalar = " (a scalar: return per-token values and leave the averaging to algorithm.aggregation)" \
            if per_token.dim() == 0 else ""
        raise StageFailure(call.stage, f"returned a per-token loss of shape {list(per_token.shape)}; expected "
                                       f"[N, T] = {shape}{scalar}")
    if not isinstance(out.token_metrics, dict):
        raise StageFailure(call.stage, f"returned token_metrics that are {_type_name(out.token_metrics)}; "
                                       "expected a dict of per-token tensors")
    for key, metric in out.token_metrics.items():
        ok = torch.is_tensor(metric)
        if ok:
            try:
                ok = list(torch.broadcast_shapes(metric.shape, logps.shape)) == shape
            except RuntimeError:
                ok = False
        if not ok:
            raise StageFailure(call.stage, f"returned token metric '{key}' that is {_type_name(metric)}; "
                                           f"expected a tensor [N, T] = {shape}")
    return out


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


class AlgorithmPipeline:
    """Zero or more reward-shaping terms, one estimator, zero or more modifiers, one loss, extra terms
    and one aggregation."""

    def __init__(
        self,
        advantage: Sequence[str | dict[str, Any]],
        loss: str | dict[str, Any] = "ppo_clip",
        aggregation: str | dict[str, Any] = "token_mean",
        terms: Sequence[str | dict[str, Any]] = (),
        shaping: Sequence[str | dict[str, Any]] = (),
    ):
        if not advantage:
            raise StageError("algorithm.advantage must list at least an estimator, e.g. [{name: grpo}]")
        self.shaping = [StageCall.from_spec("shaping", spec) for spec in shaping]
        self.estimator = StageCall.from_spec("advantage", advantage[0])
        self.modifiers = [StageCall.from_spec("modifier", spec) for spec in advantage[1:]]
        self.loss = StageCall.from_spec("loss", loss)
        self.aggregation = StageCall.from_spec("aggregation", aggregation)
        self.terms = [StageCall.from_spec("term", spec) for spec in terms]

    def stages(self) -> list[StageCall]:
        return [*self.shaping, self.estimator, *self.modifiers, self.loss, *self.terms]

    def needs(self) -> set[str]:
        """Union of every selected stage's declared needs."""
        return set().union(*(call.needs() for call in self.stages()))

    def shape_rewards(self, rollouts: Rollouts) -> tuple[Rollouts, dict[str, float]]:
        """``rollouts`` with every shaping stage's term added to the rewards (each computed from the
        rewards before any shaping), and ``<stage>/mean``, ``/min``, ``/max`` of each term."""
        metrics: dict[str, float] = {}
        total = rollouts.rewards
        for call in self.shaping:
            term = _check_shaping(call, call(rollouts), rollouts)
            total = total + term
            metrics.update({f"{call.name}/mean": float(term.mean()), f"{call.name}/min": float(term.min()),
                            f"{call.name}/max": float(term.max())})
        return (replace(rollouts, rewards=total) if self.shaping else rollouts), metrics

    def compute_advantages(self, rollouts: Rollouts) -> tuple[Advantages, dict[str, float]]:
        """Shape the rewards, then run the estimator and each modifier; metrics are prefixed by the
        stage name. The estimator's ``answer_sft_weights`` survive a modifier that builds new
        Advantages without them."""
        rollouts, metrics = self.shape_rewards(rollouts)
        advantages = _check_advantages(self.estimator, self.estimator(rollouts), rollouts)
        metrics.update({f"{self.estimator.name}/{k}": v for k, v in advantages.metrics.items()})
        for modifier in self.modifiers:
            previous, advantages = advantages, _check_advantages(modifier, modifier(rollouts, advantages), rollouts)
            if advantages.metrics is not previous.metrics:  # a stage that passes its input through adds none
                metrics.update({f"{modifier.name}/{k}": v for k, v in advantages.metrics.items()})
            if advantages.answer_sft_weights is None and previous.answer_sft_weights is not None:
                advantages = replace(advantages, answer_sft_weights=previous.answer_sft_weights)
        return advantages, metrics

    def answer_sft_weights(self, rollouts: Rollouts, advantages: Advantages) -> Tensor | None:
        """Per-completion weights ``[N]`` of the SFT term on the gold answer after each completion, as
        the stages declare them: the estimator's ``Advantages.answer_sft_weights`` (GARL, likelihood
        mode), else the loss's ``answer_sft_weights`` hook (PAFT, likelihood mode); ``None``: no term."""
        if advantages.answer_sft_weights is not None:
            return advantages.answer_sft_weights
        hook = self.loss.stage.answer_sft_weights
        if hook is None:
            return None
        try:
            return hook(rollouts, **self.loss.params)
        except Exception as exc:
            raise StageFailure(self.loss.stage, f"answer_sft_weights raised {describe_exception(exc)}") from exc

    @property
    def whole_groups(self) -> bool:
        """Whether a selected loss or term reads whole groups in every micro-batch."""
        return any(call.stage.whole_groups for call in (self.loss, *self.terms))

    def per_token_loss(
        self, logps: Tensor, rollouts: Rollouts, advantages: Advantages
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy loss plus every term, per token ``[N, T]``, and per-token metrics by name.

        ``rollouts.is_weights`` (sampler→trainer truncated importance sampling) reweights the policy
        loss only, before the terms are added (as TRL's GRPOTrainer does)."""
        out = _check_loss(self.loss, self.loss(logps, rollouts, advantages), logps)
        total = apply_importance_weights(out.per_token, rollouts.is_weights)
        metrics = {f"{self.loss.name}/{k}": v for k, v in out.token_metrics.items()}
        for term in self.terms:
            term_out = _check_loss(term, term(logps, rollouts, advantages), logps)
            total = total + term_out.per_token
            metrics.update({f"{term.name}/{k}": v for k, v in term_out.token_metrics.items()})
        return total, metrics

    def dry_run(self) -> None:
        """Run every stage once on a tiny synthetic batch, so a bad knob value (``alpha: -1``,
        ``fn: tanh``) raises its StageError when the recipe loads instead of at the first step.

        Only StageError propagates: a stage's own parameter validation unchanged, anything else a
        stage raises or returns wrongly (:class:`StageFailure`) as one line naming the stage and
        its function."""
        rollouts = _dummy_rollouts()
        try:
            advantages, _ = self.compute_advantages(rollouts)
            logps = torch.full(rollouts.completion_mask.shape, -1.0, requires_grad=True)
            per_token, _ = self.per_token_loss(logps, rollouts, advantages)
            self.aggregate(per_token, rollouts.completion_mask, max(self.normalizer(rollouts.completion_mask, 2), 1.0))
        except StageFailure as exc:
            if exc.plain:
                raise
            raise StageError(f"{exc} (in the check run on a synthetic batch of 2 groups × 2 completions when "
                             "the recipe loads)") from exc

    def normalizer(self, mask: Tensor, max_completion_length: int) -> float:
        """This rank's share of the step normaliser (summed over micro-batches and ranks)."""
        stage = self.aggregation.stage
        try:
            value = stage.normalizer(mask, max_completion_length)
        except Exception as exc:
            raise StageFailure(stage, f"normalizer raised {describe_exception(exc)}") from exc
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            number = float("nan")
        if not (math.isfinite(number) and number >= 0) or (torch.is_tensor(value) and value.numel() != 1):
            got = repr(value) if isinstance(value, (int, float)) else _type_name(value)
            raise StageFailure(stage, f"normalizer returned {got}; expected a finite number >= 0")
        return number

    def aggregate(self, per_token_loss: Tensor, mask: Tensor, normalizer: float) -> Tensor:
        """The step loss of ``per_token_loss``: a scalar tensor."""
        value = self.aggregation(per_token_loss, mask, normalizer)
        if not (torch.is_tensor(value) and value.dim() == 0):
            raise StageFailure(self.aggregation.stage, f"returned {_type_name(value)}; expected a scalar tensor "
                                                       "(shape [])")
        return value


@dataclass(frozen=True)
class Algorithm:
    """A recipe's ``algorithm`` section resolved into typed stage calls: the advantage/loss
    pipeline and the prompt sampler, with the facts the trainer and the recipe checks act on."""

    pipeline: AlgorithmPipeline
    sampler: StageCall

    @classmethod
    def resolve(cls, advantage: Sequence[str | dict[str, Any]], loss: str | dict[str, Any],
                aggregation: str | dict[str, Any], terms: Sequence[str | dict[str, Any]],
                sampler: str | dict[str, Any], shaping: Sequence[str | dict[str, Any]] = ()) -> "Algorithm":
        """Every stage looked up and its parameters checked; a problem is one StageError line."""
        return cls(AlgorithmPipeline(advantage, loss, aggregation, terms, shaping),
                   StageCall.from_spec("sampler", sampler))

    def needs(self) -> set[str]:
        return self.pipeline.needs()

    @property
    def provides_roles(self) -> bool:
        return self.sampler.stage.provides_roles

    @property
    def group_baseline(self) -> bool:
        return self.pipeline.estimator.stage.group_baseline

    def make_sampler(self, num_prompts: int, seed: int) -> Sampler:
        """The sampler over ``num_prompts`` training prompts; anything but a :class:`Sampler` is refused."""
        sampler = self.sampler(num_prompts, seed)
        if not isinstance(sampler, Sampler):
            raise StageFailure(self.sampler.stage, f"built {_type_name(sampler)}; a sampler must subclass "
                                                   "rltk.algos.Sampler (next_indices, state_dict, load_state_dict)")
        return sampler

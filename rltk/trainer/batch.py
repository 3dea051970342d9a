"""Turn sampled completions into scored ``Rollouts`` with the extra forwards the stages need."""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rltk.algos.types import Advantages, Rollouts
from rltk.trainer.logprobs import ForwardOptions, TokenBatch, chunked_logps


@dataclass
class RolloutBatch:
    """One rollout batch on one rank: tokens, scored rollouts and their advantages."""

    tokens: TokenBatch
    rollouts: Rollouts
    advantages: Advantages | None = None
    texts: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    answer: Any = None  # AnswerBatch: gold answers after each rationale, when answer_logps is needed
    answer_sft: torch.Tensor | None = None  # [N] weights of the gold-answer SFT term (likelihood mode)
    teacher_tokens: TokenBatch | None = None  # the completions after the PACED teacher's prompts
    prompts: list[str] = field(default_factory=list)  # the prompt text of every completion
    rewards_by_function: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] each, NaN for None


def hidden_layers(needs: set[str]) -> tuple[int, ...]:
    """Layer indices requested as ``hidden(L)``."""
    return tuple(sorted(int(n[len("hidden(") : -1]) for n in needs if n.startswith("hidden(")))


@dataclass
class RewardCall:
    """What every reward function is called with (TRL's GRPOTrainer contract), one entry per
    completion: ``prompts`` (the rendered prompt text, or the row's message list when the prompt is
    conversational), ``completions`` (text, or ``[{"role": "assistant", "content": text}]`` after a
    conversational prompt), ``completion_ids`` (token ids without padding), every dataset column of
    the row, and ``trainer_state`` (``global_step``, ``max_steps``)."""

    prompts: list
    completions: list
    completion_ids: list[list[int]]
    columns: dict[str, list]
    trainer_state: Any

    def arguments(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "completions": self.completions, "completion_ids": self.completion_ids,
                "trainer_state": self.trainer_state, **self.columns}


def score_rewards(call: RewardCall, verdicts, reward_fns) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The weighted sum of the reward functions (``None`` counts as 0 and is counted, as TRL's nansum),
    each function's values ``[N]`` (NaN for None), and the number of Nones. ``math`` reuses the
    verifier's verdicts instead of verifying twice; ``async def`` functions are awaited together.
    A function that raises, or returns anything but one finite number (or None) per completion,
    raises :class:`rewards.registry.RewardError`: one line naming the reward and its function (the
    trainer adds the step)."""
    from rewards.registry import RewardError, check_reward_values
    from rltk.describe import describe_exception

    count = len(call.completions)
    arguments = call.arguments()

    def checked(reward, values):
        return check_reward_values(reward.label, reward.fn, values, count)

    def failed(reward, exc):
        return RewardError(reward.label, reward.fn, f"raised {describe_exception(exc)}")

    results: dict[str, list[float | None]] = {}
    waiting = [r for r in reward_fns if r.is_async]
    for reward in reward_fns:
        if reward.label == "math":
            results[reward.label] = [v.reward for v in verdicts]
        elif not reward.is_async:
            try:
                values = reward.fn(**arguments, **reward.kwargs)
            except Exception as exc:
                raise failed(reward, exc) from exc
            results[reward.label] = checked(reward, values)
    if waiting:
        async def gather():
            return await asyncio.gather(*(r.fn(**arguments, **r.kwargs) for r in waiting), return_exceptions=True)

        for reward, values in zip(waiting, asyncio.run(gather())):
            if isinstance(values, BaseException):
                raise failed(reward, values) from values
            results[reward.label] = checked(reward, values)
    total = torch.zeros(count, dtype=torch.float32)
    per_reward, missing = {}, 0
    for reward in reward_fns:
        values = results[reward.label]
        missing += sum(v is None for v in values)
        total += reward.weight * torch.tensor([0.0 if v is None else float(v) for v in values])
        per_reward[reward.label] = torch.tensor([math.nan if v is None else float(v) for v in values])
    return total, per_reward, missing


def add_requested_forwards(rollouts: Rollouts, tokens: TokenBatch, needs: set[str], *, policy,
                           reference: Callable[[], Any] | None, temperature: float, chunk_size: int,
                           options: ForwardOptions = ForwardOptions()) -> Rollouts:
    """Fill ``old_logps``, ``hidden`` and ``ref_logps`` when requested, each in one no-grad pass."""
    from dataclasses import replace

    updates: dict[str, Any] = {}
    layers = hidden_layers(needs)
    if "old_logps" in needs or layers:
        out = chunked_logps(policy, tokens, temperature, chunk_size, hidden_layers=layers, options=options)
        if "old_logps" in needs:
            updates["old_logps"] = out.logps.cpu()
        if layers:
            updates["hidden"] = out.hidden[layers[0]].float().cpu()
            if len(layers) > 1:
                updates["extra"] = {**rollouts.extra, "hidden_layers": {k: v.float().cpu() for k, v in out.hidden.items()}}
    if "ref_logps" in needs:
        with reference() as ref_model:
            ref = chunked_logps(ref_model, tokens, temperature, chunk_size, options=options)
            updates["ref_logps"] = ref.logps.cpu()
    return replace(rollouts, **updates)

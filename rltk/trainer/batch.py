"""Turn sampled completions into scored ``Rollouts`` with the extra forwards the stages need."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rltk.algos.types import Advantages, Rollouts
from rltk.trainer.logprobs import HeadOptions, TokenBatch, chunked_logps


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


def hidden_layers(needs: set[str]) -> tuple[int, ...]:
    """Layer indices requested as ``hidden(L)``."""
    return tuple(sorted(int(n[len("hidden(") : -1]) for n in needs if n.startswith("hidden(")))


def combine_rewards(texts: list[str], columns: dict[str, list[Any]], verdicts, reward_fns) -> tuple[torch.Tensor, int]:
    """Weighted sum of reward functions (TRL signature ``fn(completions, **columns)``).

    ``math`` reuses the verifier's verdicts instead of verifying twice. ``None`` rewards count as 0
    and are counted. A function that raises, or returns anything but one finite number (or None) per
    completion, raises :class:`rewards.registry.RewardError`: one line naming the reward and its
    function (the trainer adds the step).
    """
    from rewards.registry import RewardError, check_reward_values
    from rltk.describe import describe_exception

    total = torch.zeros(len(texts), dtype=torch.float32)
    missing = 0
    for name, fn, weight in reward_fns:
        if name == "math":
            values = [v.reward for v in verdicts]
        else:
            try:
                values = fn(texts, **columns)
            except Exception as exc:
                raise RewardError(name, fn, f"raised {describe_exception(exc)}") from exc
            values = check_reward_values(name, fn, values, len(texts))
        missing += sum(v is None for v in values)
        total += weight * torch.tensor([0.0 if v is None else float(v) for v in values])
    return total, missing


def add_requested_forwards(rollouts: Rollouts, tokens: TokenBatch, needs: set[str], *, policy,
                           reference: Callable[[], Any] | None, temperature: float, chunk_size: int,
                           head: HeadOptions = HeadOptions()) -> Rollouts:
    """Fill ``old_logps``, ``hidden`` and ``ref_logps`` when requested, each in one no-grad pass."""
    from dataclasses import replace

    updates: dict[str, Any] = {}
    layers = hidden_layers(needs)
    if "old_logps" in needs or layers:
        out = chunked_logps(policy, tokens, temperature, chunk_size, hidden_layers=layers, head=head)
        if "old_logps" in needs:
            updates["old_logps"] = out.logps.cpu()
        if layers:
            updates["hidden"] = out.hidden[layers[0]].float().cpu()
            if len(layers) > 1:
                updates["extra"] = {**rollouts.extra, "hidden_layers": {k: v.float().cpu() for k, v in out.hidden.items()}}
    if "ref_logps" in needs:
        with reference() as ref_model:
            updates["ref_logps"] = chunked_logps(ref_model, tokens, temperature, chunk_size, head=head).logps.cpu()
    return replace(rollouts, **updates)

"""The rollout engine interface (docs/design.md §3): prompts in, G completions per prompt out.

An engine returns one row per completion with the completions of a prompt contiguous, token ids
right-padded, a completion mask that covers the EOS token, and truncation flags. Engines are picked
by name (``rollout.engine``): ``hf`` (transformers ``generate``, any device) and ``vllm`` (GPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 32
    return_logps: bool = False  # also return the sampling distribution's per-token log-probs


@dataclass(frozen=True)
class Generation:
    """``len(prompts) × n`` completions, grouped by prompt."""

    prompt_ids: Tensor  # long [N, P], left-padded
    prompt_mask: Tensor  # long [N, P]
    completion_ids: Tensor  # long [N, T], right-padded with the pad id
    completion_mask: Tensor  # long [N, T], 1 up to and including EOS
    truncated: Tensor  # bool [N], no EOS within max_new_tokens
    texts: list[str]  # decoded completions without special tokens
    sampling_logps: Tensor | None = None  # float [N, T] from the sampler's processed distribution


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams) -> Generation:
        """Sample ``params.n`` completions for each prompt."""

    def sync_weights(self) -> None:
        """Called by the trainer after every applied optimizer step: from the next ``generate`` on,
        sample from the current policy weights (the hf engine samples from the training model
        itself; the vllm engine pushes the weights once before its next generation)."""


def completion_mask_from_ids(completion_ids: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """Mask up to and including the first EOS, and whether each row lacks an EOS (truncated)."""
    is_eos = completion_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).long()
    return mask, ~has_eos


def pad_right(rows: list[Tensor], value: float | int, length: int | None = None) -> Tensor:
    """Stack 2-D tensors with different widths, padding on the right."""
    width = length if length is not None else max(r.shape[1] for r in rows)
    out = [torch.nn.functional.pad(r, (0, width - r.shape[1]), value=value) for r in rows]
    return torch.cat(out, dim=0)


def pad_left(rows: list[Tensor], value: float | int) -> Tensor:
    """Stack 2-D tensors with different widths, padding on the left."""
    width = max(r.shape[1] for r in rows)
    out = [torch.nn.functional.pad(r, (width - r.shape[1], 0), value=value) for r in rows]
    return torch.cat(out, dim=0)


def rank_shard(engine, items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's share of ``items`` (every ``world``-th from ``rank``) and its padding: a
    collective engine (``engine.collective``: vLLM server mode or tensor parallel, which gather
    prompts over processes) needs every rank to make the same calls with as many prompts, so a
    short share is padded with repeats of its first item (of ``items[0]`` if it has none), and the
    caller drops the results of the last ``padding`` items before gathering."""
    shard = list(items[rank::world])
    if world == 1 or not getattr(engine, "collective", False) or not items:
        return shard, 0
    padding = -(-len(items) // world) - len(shard)
    return shard + [shard[0] if shard else items[0]] * padding, padding


def select_rows(generation: Generation, rows: list[int]) -> Generation:
    """The ``rows`` of ``generation`` (in that order), trimmed to their own widths: the prompt
    columns none of them uses (left) and the completion columns past their longest mask (right)."""
    index = torch.tensor(rows, dtype=torch.long)
    prompt_mask = generation.prompt_mask[index]
    completion_mask = generation.completion_mask[index]
    left = generation.prompt_ids.shape[1] - int(prompt_mask.sum(1).max()) if rows else 0
    width = max(1, int(completion_mask.sum(1).max())) if rows else 1
    logps = generation.sampling_logps
    return Generation(generation.prompt_ids[index, left:], prompt_mask[:, left:],
                      generation.completion_ids[index, :width], completion_mask[:, :width],
                      generation.truncated[index], [generation.texts[i] for i in rows],
                      None if logps is None else logps[index, :width])


def concat_generations(parts: list[Generation], pad_id: int) -> Generation:
    """One Generation of ``parts``' rows in order: prompts left-padded and completions right-padded
    to the widest part (``pad_id`` for ids, 0 for masks and log-probs)."""
    width = max(p.completion_ids.shape[1] for p in parts)
    logps = [p.sampling_logps for p in parts]
    return Generation(pad_left([p.prompt_ids for p in parts], pad_id), pad_left([p.prompt_mask for p in parts], 0),
                      pad_right([p.completion_ids for p in parts], pad_id, width),
                      pad_right([p.completion_mask for p in parts], 0, width),
                      torch.cat([p.truncated for p in parts]), [t for p in parts for t in p.texts],
                      None if any(x is None for x in logps) else pad_right(logps, 0.0, width))

"""Per-token log-probabilities of completions under a model (training and no-grad forwards).

Sequences are ``prompt (left-padded) ⊕ completion (right-padded)``; position ids are derived from
the attention mask (``cumsum − 1``), because a plain forward does not do so for left padding
(DESIGN.md §9). The logits that predict completion token t sit at position P − 1 + t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenBatch:
    """Token tensors of completions with their prompts: the input to every forward."""

    prompt_ids: Tensor  # [N, P]
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, T]
    completion_mask: Tensor  # [N, T]

    def rows(self, index: Tensor) -> "TokenBatch":
        return TokenBatch(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                          self.completion_mask[index])

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])


@dataclass(frozen=True)
class ForwardOutput:
    logps: Tensor  # [N, T]
    entropy: Tensor | None = None  # [N, T]
    hidden: dict[int, Tensor] | None = None  # layer -> [N, T, H]
    final_hidden: Tensor | None = None  # [N, T, H] last (post-norm) hidden states, with gradient


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log softmax(logits)[index] without materialising the full log-softmax tensor."""
    logits = logits.float()
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def forward_logps(
    model: torch.nn.Module,
    batch: TokenBatch,
    temperature: float = 1.0,
    *,
    hidden_layers: tuple[int, ...] = (),
    with_entropy: bool = False,
    with_final_hidden: bool = False,
) -> ForwardOutput:
    """One forward of ``batch`` through ``model``; logits are divided by ``temperature`` so the
    log-probs are those of the distribution the sampler drew from (as TRL's GRPOTrainer does).
    ``with_final_hidden`` also returns the final hidden states predicting each completion token."""
    device = next(model.parameters()).device
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1).to(device)
    attention = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1).to(device)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    prompt_len, completion_len = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    # the LM head runs only on the positions that predict completion tokens (and the last one)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                output_hidden_states=bool(hidden_layers) or with_final_hidden, use_cache=False, logits_to_keep=completion_len + 1)
    logits = out.logits[:, :-1] / temperature
    target = batch.completion_ids.to(device)
    logps = selective_log_softmax(logits, target)
    entropy = token_entropy(logits) if with_entropy else None
    hidden = None
    if hidden_layers:
        hidden = {
            layer: out.hidden_states[layer][:, prompt_len - 1 : prompt_len - 1 + completion_len].detach()
            for layer in hidden_layers
        }
    final = out.hidden_states[-1][:, prompt_len - 1 : prompt_len - 1 + completion_len] if with_final_hidden else None
    return ForwardOutput(logps, entropy, hidden, final)


@torch.no_grad()
def chunked_logps(
    model: torch.nn.Module,
    batch: TokenBatch,
    temperature: float,
    chunk_size: int,
    *,
    hidden_layers: tuple[int, ...] = (),
) -> ForwardOutput:
    """No-grad log-probs (and hidden states) of a whole batch, ``chunk_size`` rows at a time."""
    parts = []
    for start in range(0, len(batch), chunk_size):
        index = torch.arange(start, min(start + chunk_size, len(batch)))
        parts.append(forward_logps(model, batch.rows(index), temperature, hidden_layers=hidden_layers))
    logps = torch.cat([p.logps for p in parts]) * batch.completion_mask.to(parts[0].logps.device)
    hidden = None
    if hidden_layers:
        hidden = {layer: torch.cat([p.hidden[layer] for p in parts]) for layer in hidden_layers}
    return ForwardOutput(logps, None, hidden)

"""Per-token log-probabilities of completions under a model (training and no-grad forwards).

Sequences are ``prompt (left-padded) ⊕ completion (right-padded)``; position ids are derived from
the attention mask (``cumsum − 1``), because a plain forward does not do so for left padding
(docs/design.md §9). The logits that predict completion token t sit at position P − 1 + t.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from rltk.algos.linear_logps import DEFAULT_TOKEN_CHUNK, linear_logps
from rltk.trainer.distributed import gathered

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class HeadOptions:
    """How every log-prob forward runs the LM head: ``chunk`` positions at a time through
    :func:`rltk.algos.linear_logps.linear_logps` (0: the dense path, full logits), matmuls in
    ``compute_dtype`` (bf16 under mixed precision; default: the weights' dtype)."""

    chunk: int = DEFAULT_TOKEN_CHUNK
    compute_dtype: torch.dtype | None = None


class FinalHidden:
    """While entered, keeps the decoder's output (the final, post-norm hidden states) of its last
    call, with its gradient: the model runs whole (DDP's and ZeRO-3's hooks need that) while its LM
    head runs on one position only."""

    def __init__(self, decoder: torch.nn.Module):
        self.decoder = decoder
        self.value: Tensor | None = None

    def _record(self, _module, _inputs, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def __enter__(self) -> "FinalHidden":
        self.handle = self.decoder.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def chunkable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when the chunked path computes exactly its logits: a plain ``Linear``
    with no logit soft-capping or scaling after it; ``None`` otherwise (a LoRA-wrapped head, Gemma's
    soft-capping, Cohere's ``logit_scale``), for which the dense path runs."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    if type(head) is not torch.nn.Linear:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return head


_dense_fallbacks: set[str] = set()


def _warn_dense(model: torch.nn.Module) -> None:
    name = type(model).__name__
    if name not in _dense_fallbacks:
        _dense_fallbacks.add(name)
        log.warning("%s: its LM head is not a plain Linear (or it rescales logits), so log-probs use the dense "
                    "path, which holds [rows, T, vocab] logits", name)


def forward_logps(
    model: torch.nn.Module,
    batch: TokenBatch,
    temperature: float = 1.0,
    *,
    hidden_layers: tuple[int, ...] = (),
    with_entropy: bool = False,
    with_final_hidden: bool = False,
    head: HeadOptions = HeadOptions(),
) -> ForwardOutput:
    """One forward of ``batch`` through ``model`` (a DDP/DeepSpeed wrapper or the model itself).

    Log-probs are those of the distribution the sampler drew from, ``softmax(logits / temperature)``
    (as TRL's GRPOTrainer scores them). The LM head runs in chunks of ``head.chunk`` positions on the
    decoder's final hidden states (:func:`rltk.algos.linear_logps.linear_logps`), so the
    ``[rows, T, V]`` logits never exist; ``head.chunk=0``, or a head that is not a plain ``Linear``,
    takes the dense path (full logits, float32). ``with_final_hidden`` also returns the final hidden states predicting each
    completion token, with gradient; ``hidden_layers`` returns those layers' outputs, detached."""
    inner = getattr(model, "module", model)  # DDP and DeepSpeed engines keep the model as .module
    lm_head = chunkable_head(inner) if head.chunk > 0 else None
    if head.chunk > 0 and lm_head is None:
        _warn_dense(inner)
    device = next(inner.parameters()).device
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1).to(device)
    attention = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1).to(device)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    prompt_len, completion_len = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    target = batch.completion_ids.to(device)
    final = FinalHidden(inner.get_decoder())
    # the LM head runs only on the positions that predict completion tokens (dense), or on one (chunked)
    with final:
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                    output_hidden_states=bool(hidden_layers), use_cache=False,
                    logits_to_keep=1 if lm_head is not None else completion_len + 1)
    positions = slice(prompt_len - 1, prompt_len - 1 + completion_len)
    final_hidden = final.value[:, positions]
    if lm_head is not None:
        params = [p for p in (lm_head.weight, lm_head.bias) if p is not None]
        logps, entropy = linear_logps(final_hidden, lm_head.weight, target, bias=lm_head.bias, temperature=temperature,
                                      chunk_size=head.chunk, with_entropy=with_entropy,
                                      compute_dtype=head.compute_dtype, gather=gathered(*params))
    else:
        logits = out.logits[:, :-1] / temperature
        logps = selective_log_softmax(logits, target)
        entropy = token_entropy(logits) if with_entropy else None
    hidden = None
    if hidden_layers:
        hidden = {layer: out.hidden_states[layer][:, positions].detach() for layer in hidden_layers}
    return ForwardOutput(logps, entropy, hidden, final_hidden if with_final_hidden else None)


@torch.no_grad()
def chunked_logps(
    model: torch.nn.Module,
    batch: TokenBatch,
    temperature: float,
    chunk_size: int,
    *,
    hidden_layers: tuple[int, ...] = (),
    head: HeadOptions = HeadOptions(),
) -> ForwardOutput:
    """No-grad log-probs (and hidden states) of a whole batch, ``chunk_size`` rows at a time."""
    parts = []
    for start in range(0, len(batch), chunk_size):
        index = torch.arange(start, min(start + chunk_size, len(batch)))
        parts.append(forward_logps(model, batch.rows(index), temperature, hidden_layers=hidden_layers, head=head))
    logps = torch.cat([p.logps for p in parts]) * batch.completion_mask.to(parts[0].logps.device)
    hidden = None
    if hidden_layers:
        hidden = {layer: torch.cat([p.hidden[layer] for p in parts]) for layer in hidden_layers}
    return ForwardOutput(logps, None, hidden)

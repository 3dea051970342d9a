"""Per-token log-probabilities of completions under a model (training and no-grad forwards).

Sequences are ``prompt (left-padded) ⊕ completion (right-padded)``; position ids are derived from
the attention mask (``cumsum − 1``), because a plain forward does not do so for left padding
(docs/design.md §9). The logits that predict completion token t sit at position P − 1 + t.

A forward lays its rows out in one of three ways (:class:`ForwardOptions`): ``padded`` (every row to
the batch's widths), ``trimmed`` (to the widths of these rows only) or ``packed`` (padding-free: the
sequences concatenated, each with its own position ids from 0, no attention mask; transformers then
keeps the sequences apart, docs/distributed.md). Outputs always come back as ``[rows, T]`` of the
batch given, zero where a layout left a position out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from rltk.algos.linear_logps import DEFAULT_TOKEN_CHUNK, linear_logps
from rltk.batching import plan
from rltk.trainer.distributed import gathered
from rltk.trainer.packing import ONE_ROW_PACKING, attention_implementation, pack

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

    def lengths(self) -> tuple[Tensor, Tensor]:
        """Real (unpadded) prompt and completion tokens of every row, long ``[N]`` each."""
        return self.prompt_mask.sum(1), self.completion_mask.sum(1)

    def trimmed(self) -> "TokenBatch":
        """The same rows without the columns that are padding in every row (prompts are left-padded,
        completions right-padded)."""
        prompt, completion = self.lengths()
        keep_prompt = self.prompt_ids.shape[1] - int(prompt.max())
        width = max(1, int(completion.max()))
        return TokenBatch(self.prompt_ids[:, keep_prompt:], self.prompt_mask[:, keep_prompt:],
                          self.completion_ids[:, :width], self.completion_mask[:, :width])


@dataclass(frozen=True)
class ForwardOutput:
    logps: Tensor  # [N, T]
    entropy: Tensor | None = None  # [N, T]
    hidden: dict[int, Tensor] | None = None  # layer -> [N, T, H]
    final_hidden: Tensor | None = None  # [N, T, H] last (post-norm) hidden states, with gradient
    positions: int = 0  # token positions the model ran (padding included)

    def widened(self, width: int) -> "ForwardOutput":
        """The same outputs with zero columns appended up to ``width`` completion positions."""
        extra = width - self.logps.shape[1]
        if extra == 0:
            return self

        def pad(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            return torch.nn.functional.pad(x, (0, 0, 0, extra) if x.dim() == 3 else (0, extra))

        hidden = None if self.hidden is None else {k: pad(v) for k, v in self.hidden.items()}
        return ForwardOutput(pad(self.logps), pad(self.entropy), hidden, pad(self.final_hidden), self.positions)


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log softmax(logits)[index] without materialising the full log-softmax tensor."""
    logits = logits.float()
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


Layout = Literal["padded", "trimmed", "packed"]


def _same_count(count: int) -> int:
    return count


@dataclass(frozen=True)
class ForwardOptions:
    """How every log-prob forward runs. The LM head: ``chunk`` positions at a time through
    :func:`rltk.algos.linear_logps.linear_logps` (0: the dense path, full logits), matmuls in
    ``compute_dtype`` (bf16 under mixed precision; default: the weights' dtype). The rows:
    ``layout`` (module docstring); ``max_tokens`` the token budget of one forward (None: forwards
    of a fixed number of rows, rltk/batching.py); ``count_over_ranks`` turns this
    process's number of forwards into the largest over processes (ZeRO-3 gathers weights in every
    forward, so all processes must run as many)."""

    chunk: int = DEFAULT_TOKEN_CHUNK
    compute_dtype: torch.dtype | None = None
    layout: Layout = "padded"
    max_tokens: int | None = None
    count_over_ranks: Callable[[int], int] = _same_count


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
    options: ForwardOptions = ForwardOptions(),
) -> ForwardOutput:
    """One forward of ``batch`` through ``model`` (a DDP/DeepSpeed wrapper or the model itself).

    Log-probs are those of the distribution the sampler drew from, ``softmax(logits / temperature)``
    (as TRL's GRPOTrainer scores them). The LM head runs in chunks of ``options.chunk`` positions on
    the decoder's final hidden states (:func:`rltk.algos.linear_logps.linear_logps`), so the
    ``[rows, T, V]`` logits never exist; ``options.chunk=0``, or a head that is not a plain
    ``Linear``, takes the dense path (full logits, float32). ``with_final_hidden`` also returns the
    final hidden states predicting each completion token, with gradient; ``hidden_layers`` returns
    those layers' outputs, detached. The rows are laid out as ``options.layout`` says; a packed
    forward needs the chunked LM head (the trainer picks ``trimmed`` otherwise)."""
    inner = getattr(model, "module", model)  # DDP and DeepSpeed engines keep the model as .module
    lm_head = chunkable_head(inner) if options.chunk > 0 else None
    if options.chunk > 0 and lm_head is None:
        _warn_dense(inner)
    if options.layout == "padded":
        return _padded_forward(model, inner, lm_head, batch, temperature, hidden_layers, with_entropy,
                               with_final_hidden, options)
    width = batch.completion_ids.shape[1]
    if options.layout == "trimmed" or lm_head is None:
        out = _padded_forward(model, inner, lm_head, batch.trimmed(), temperature, hidden_layers, with_entropy,
                              with_final_hidden, options)
        return out.widened(width)
    return _packed_forward(model, inner, lm_head, batch, temperature, hidden_layers, with_entropy, with_final_hidden,
                           options)


def _padded_forward(model, inner, lm_head, batch: TokenBatch, temperature: float, hidden_layers: tuple[int, ...],
                    with_entropy: bool, with_final_hidden: bool, options: ForwardOptions) -> ForwardOutput:
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
        logps, entropy = _head_logps(lm_head, final_hidden, target, temperature, with_entropy, options)
    else:
        logits = out.logits[:, :-1] / temperature
        logps = selective_log_softmax(logits, target)
        entropy = token_entropy(logits) if with_entropy else None
    hidden = None
    if hidden_layers:
        hidden = {layer: out.hidden_states[layer][:, positions].detach() for layer in hidden_layers}
    return ForwardOutput(logps, entropy, hidden, final_hidden if with_final_hidden else None, input_ids.numel())


def _packed_forward(model, inner, lm_head, batch: TokenBatch, temperature: float, hidden_layers: tuple[int, ...],
                    with_entropy: bool, with_final_hidden: bool, options: ForwardOptions) -> ForwardOutput:
    """The padding-free forward (rltk/trainer/packing.py): the LM head runs on the real completion
    positions only, and the results are scattered back to ``[rows, T]``."""
    device = next(inner.parameters()).device
    prompt_len, completion_len = batch.lengths()
    packed = pack(batch.prompt_ids, prompt_len, batch.completion_ids, completion_len,
                  one_row=attention_implementation(inner) in ONE_ROW_PACKING)
    final = FinalHidden(inner.get_decoder())
    with final:
        out = model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                    output_hidden_states=bool(hidden_layers), use_cache=False, logits_to_keep=1)
    source = tuple(index.to(device) for index in packed.source)
    rows, cols = packed.target
    target = batch.completion_ids[rows, cols].to(device)
    real_hidden = final.value[source]  # [K, H]
    logps_real, entropy_real = _head_logps(lm_head, real_hidden, target, temperature, with_entropy, options)
    shape = tuple(batch.completion_ids.shape)
    where = (rows.to(device), cols.to(device))

    def scatter(values: Tensor) -> Tensor:
        return values.new_zeros(shape + tuple(values.shape[1:])).index_put(where, values)

    hidden = None
    if hidden_layers:
        hidden = {layer: scatter(out.hidden_states[layer][source].detach()) for layer in hidden_layers}
    return ForwardOutput(scatter(logps_real), None if entropy_real is None else scatter(entropy_real), hidden,
                         scatter(real_hidden) if with_final_hidden else None, packed.positions)


def _head_logps(lm_head: torch.nn.Linear, hidden: Tensor, target: Tensor, temperature: float, with_entropy: bool,
                options: ForwardOptions) -> tuple[Tensor, Tensor | None]:
    params = [p for p in (lm_head.weight, lm_head.bias) if p is not None]
    return linear_logps(hidden, lm_head.weight, target, bias=lm_head.bias, temperature=temperature,
                        chunk_size=options.chunk, with_entropy=with_entropy, compute_dtype=options.compute_dtype,
                        gather=gathered(*params))


@torch.no_grad()
def chunked_logps(
    model: torch.nn.Module,
    batch: TokenBatch,
    temperature: float,
    chunk_size: int,
    *,
    hidden_layers: tuple[int, ...] = (),
    options: ForwardOptions = ForwardOptions(),
) -> ForwardOutput:
    """No-grad log-probs (and hidden states) of a whole batch: ``chunk_size`` rows per forward, or
    forwards of at most ``options.max_tokens`` tokens (rltk/batching.py)."""
    prompt_len, completion_len = batch.lengths()
    forwards = plan(torch.arange(len(batch)), prompt_len, completion_len, max_rows=chunk_size,
                    max_tokens=options.max_tokens, packed=options.layout == "packed",
                    count_over_ranks=options.count_over_ranks)
    parts = [forward_logps(model, batch.rows(index), temperature, hidden_layers=hidden_layers, options=options)
             for index in forwards]
    order = torch.cat(forwards)
    logps = _in_row_order(torch.cat([p.logps for p in parts]), order)
    logps = logps * batch.completion_mask.to(logps.device)
    hidden = None
    if hidden_layers:
        hidden = {layer: _in_row_order(torch.cat([p.hidden[layer] for p in parts]), order) for layer in hidden_layers}
    return ForwardOutput(logps, None, hidden, positions=sum(p.positions for p in parts))


def _in_row_order(values: Tensor, order: Tensor) -> Tensor:
    """``values`` of the rows ``order`` (a permutation) put back in row order."""
    out = torch.empty_like(values)
    out[order.to(values.device)] = values
    return out

"""Sampling that drops finished rows: the hf engine's own decode loop (``rollout.drop_finished``).

transformers' ``generate`` runs every row of a call until the last row ends: with heavy-tailed
completion lengths (many short answers, a few long chains) most of its work is on rows that have
already emitted EOS. This loop samples as ``generate`` does — the model's logits processors for
the same generation config (temperature, top-k, top-p, and whatever the model's
``generation_config`` adds, a repetition penalty say), softmax, ``torch.multinomial`` — but removes
the finished rows from the batch and from the KV cache whenever they are at least ``compact_share``
of it, so the cost follows the tokens generated rather than rows × the longest completion.

Until the first removal it consumes the random stream exactly as ``generate`` does (the same
tokens for the same seed, tests/test_decode.py); afterwards the draws fall on fewer rows, so the
tokens differ while every row still samples from its own processed distribution.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

# a processor called with the original row index of each batch row: (input_ids, scores, rows) -> scores
RowProcessor = Callable[[Tensor, Tensor, Tensor], Tensor]


def prompt_positions(mask: Tensor) -> Tensor:
    """Position ids of left-padded prompts: 0 at each row's first real token (padding gets 1, as
    transformers' ``prepare_inputs_for_generation`` gives it)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def cache_keyword(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers ≥ 5.25, where
    ``past_key_values`` is deprecated) or ``past_key_values``; a misspelt one would be swallowed by
    ``**kwargs`` and the model would decode without its cache."""
    parameters = inspect.signature(type(model).forward).parameters  # the class's: accelerate may wrap the instance's
    return "cache" if "cache" in parameters else "past_key_values"


@torch.no_grad()
def sample_dropping_finished(model, prompt_ids: Tensor, prompt_mask: Tensor, *,
                             processors_for: Callable[[Tensor, Tensor], Callable[[Tensor, Tensor], Tensor]],
                             max_new_tokens: int, eos_token_id: int, pad_token_id: int, return_logps: bool = False,
                             compact_share: float = 0.25,
                             row_processor: RowProcessor | None = None) -> tuple[Tensor, Tensor | None]:
    """Completion ids ``[rows, steps]`` (``steps`` ≤ ``max_new_tokens``: the longest row's length),
    right-padded with ``pad_token_id`` after each row's EOS, and, with ``return_logps``, each
    sampled token's log-probability under the processed distribution it was drawn from (0 after EOS).

    ``processors_for(prompt_ids, prompt_mask)`` builds ``generate``'s logits processors for those
    rows (:func:`rltk.engines.hf.logits_processors`); it is called again for the rows kept after
    each drop, since a processor may hold per-row state (the repetition penalty holds each row's
    padding length). The processors see the running rows' full sequences.
    ``row_processor`` (tests, benchmarks) is applied after it with the original index of each running
    row. ``compact_share``: drop the finished rows once they are at least this share of the batch
    (each drop copies the KV cache of the rows kept, so dropping at every step would cost more than
    it saves); 1.0 drops only when every row has finished, i.e. never, as ``generate``."""
    from transformers import DynamicCache

    rows, device = prompt_ids.shape[0], prompt_ids.device
    completion = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(rows, max_new_tokens, device=device) if return_logps else None
    running = torch.arange(rows, device=device)  # original row of each batch row
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    sequences, mask = prompt_ids, prompt_mask
    step_ids, positions = prompt_ids, prompt_positions(prompt_mask)
    cache = DynamicCache(config=model.config)
    logits_processor = processors_for(prompt_ids, prompt_mask)
    with_cache = {cache_keyword(model): cache}
    steps = 0
    for t in range(max_new_tokens):
        steps = t + 1
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, return_dict=True, **with_cache)
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        del out
        scores = logits_processor(sequences, logits)
        if row_processor is not None:
            scores = row_processor(sequences, scores, running)
        token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        completion[running, t] = token
        if logps is not None:
            chosen = torch.log_softmax(scores, dim=-1).gather(1, token.unsqueeze(1)).squeeze(1)
            logps[running, t] = torch.where(finished, torch.zeros_like(chosen), chosen)
        finished = finished | (token == eos_token_id)
        if bool(finished.all()):
            break
        sequences = torch.cat([sequences, token.unsqueeze(1)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions, step_ids = positions[:, -1:] + 1, token.unsqueeze(1)
        if int(finished.sum()) >= compact_share * finished.numel():
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            sequences, mask, positions, step_ids = sequences[keep], mask[keep], positions[keep], step_ids[keep]
            running, finished = running[keep], finished[keep]
            logits_processor = processors_for(prompt_ids[running], prompt_mask[running])
    return completion[:, :steps], None if logps is None else logps[:, :steps]

"""The gold answer written after each completion's rationale (GARL / PAFT likelihood mode).

Lin & Ie 2026 (arXiv 2604.25907) weight completion m by p_θ(y* | x, z_m): the teacher-forced
probability of the gold answer y* written, in the task's answer template, after the rationale z_m.
The rationale is the completion up to its last ``\\boxed{`` (the whole completion when it has no
box); the answer is ``data.answer_template`` filled with the gold answer (default ``\\boxed{y*}``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rewards.extract import last_outer_box
from rltk.engines.base import pad_right
from rltk.trainer.logprobs import ForwardOptions, TokenBatch, chunked_logps


@dataclass(frozen=True)
class AnswerBatch:
    tokens: TokenBatch  # prompt ⊕ (rationale ⊕ gold answer); completion_mask covers both
    answer_mask: Tensor  # float [N, T']: 1 on the gold-answer tokens only


def rationale(completion: str) -> str:
    """The completion up to its last outermost balanced ``\\boxed{...}``."""
    box = last_outer_box(completion)
    return completion[: box.start] if box is not None else completion


def build_answer_batch(tokens: TokenBatch, texts: list[str], answers: list[str], tokenizer,
                       template: str) -> AnswerBatch:
    """Token batch of every completion's rationale followed by its gold answer."""
    rows, masks = [], []
    for text, answer in zip(texts, answers):
        head = tokenizer(rationale(text), add_special_tokens=False)["input_ids"]
        tail = tokenizer(template.format(answer=answer), add_special_tokens=False)["input_ids"]
        rows.append(torch.tensor([head + tail]))
        masks.append(torch.tensor([[0.0] * len(head) + [1.0] * len(tail)]))
    completion_ids = pad_right(rows, tokenizer.pad_token_id)
    answer_mask = pad_right(masks, 0.0)
    attention = pad_right([torch.ones_like(r) for r in rows], 0)
    return AnswerBatch(TokenBatch(tokens.prompt_ids, tokens.prompt_mask, completion_ids, attention), answer_mask)


@torch.no_grad()
def answer_logps(model, batch: AnswerBatch, temperature: float, chunk_size: int,
                 options: ForwardOptions = ForwardOptions()) -> Tensor:
    """log p(gold answer | prompt, rationale) per completion, float [N]."""
    logps = chunked_logps(model, batch.tokens, temperature, chunk_size, options=options).logps.cpu()
    return (logps * batch.answer_mask).sum(-1)

"""Builders shared by the tests: small Rollouts for the stage tests, a scripted generation engine."""
from __future__ import annotations

import torch

from rltk.algos.types import Rollouts
from rltk.engines.base import Generation, completion_mask_from_ids, pad_left, pad_right


def make_rollouts(rewards, lengths=None, correct=None, group_ids=None, truncated=None, width=None,
                  dtype=torch.float64, **extra) -> Rollouts:
    """Rollouts of len(rewards) completions with the given token lengths (default 1 each).

    ``correct`` defaults to reward > 0, ``group_ids`` to one group, ``truncated`` to none;
    ``extra`` sets optional fields (old_logps, ref_logps, hidden, roles, ...).
    """
    rewards = torch.tensor(rewards, dtype=dtype)
    n = rewards.shape[0]
    lengths = lengths if lengths is not None else [1] * n
    width = width or max(max(lengths), 1)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(dtype)
    return Rollouts(
        group_ids=torch.tensor(group_ids if group_ids is not None else [0] * n),
        rewards=rewards,
        correct=torch.tensor(correct) if correct is not None else rewards > 0,
        completion_mask=mask,
        truncated=torch.tensor(truncated) if truncated is not None else torch.zeros(n, dtype=torch.bool),
        **extra,
    )


class ScriptedEngine:
    """An engine that returns fixed completion texts (``None`` = truncated, no EOS); ``completions``
    may also be a function of the prompts (one text per completion). The texts are the decoded
    tokens, or with ``decoded=False`` the scripted texts themselves (characters the tiny tokenizer
    lacks, such as ``<``, then still reach the reward functions)."""

    def __init__(self, tokenizer, completions, decoded: bool = True):
        self.tokenizer, self.completions, self.decoded = tokenizer, completions, decoded

    def sync_weights(self):
        pass

    def generate(self, prompts, params):
        tok = self.tokenizer
        prompt_rows = [tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"] for p in prompts
                       for _ in range(params.n)]
        texts = self.completions(prompts) if callable(self.completions) else self.completions
        rows = []
        for text in texts:
            ids = tok(text or "", add_special_tokens=False)["input_ids"]
            ids = (ids + [tok.eos_token_id]) if text is not None else [tok.convert_tokens_to_ids("7")] * params.max_new_tokens
            rows.append(torch.tensor([ids[: params.max_new_tokens]]))
        completion_ids = pad_right(rows, tok.pad_token_id)
        decoded = tok.batch_decode(completion_ids, skip_special_tokens=True)
        mask, truncated = completion_mask_from_ids(completion_ids, tok.eos_token_id)
        return Generation(pad_left(prompt_rows, tok.pad_token_id), pad_left([torch.ones_like(r) for r in prompt_rows], 0),
                          completion_ids, mask, truncated,
                          [d if self.decoded or s is None else s for s, d in zip(texts, decoded)])

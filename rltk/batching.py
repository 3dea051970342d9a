"""Which rows go into each forward (or generate call): a fixed number of rows in order, or a token budget.

With a token budget (``trainer.max_tokens_per_micro_batch``) the rows are sorted by length, longest
first, and taken while the forward stays within the budget: ``rows × (longest prompt + longest
completion)`` when the forward pads its rows to their own widths, the sum of the rows' real tokens
when it packs them without padding. Rows of similar length share a forward, so short completions no
longer pay for the longest one of the step. ``unit`` consecutive rows (a prompt's whole group, for a
loss that reads groups) always share a forward. A unit longer than the budget on its own gets a
forward of its own (the recipe check refuses budgets below the longest possible sequence, so this
happens only for the gold-answer and teacher forwards, whose sequences are longer).

The step's loss does not depend on the cut: every loss component divides by a step-global
normaliser (docs/algorithms/reference.md §2), so the micro-batches only change the order of a sum.
Under ZeRO-3 each forward gathers the weights collectively, so every process must run as many
forwards: ``count_over_ranks`` gives the largest count over processes and the planner splits its own
largest micro-batches until it has as many.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def fixed_rows(rows: Tensor, size: int) -> list[Tensor]:
    """``rows`` in order, ``size`` at a time."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def token_budget(rows: Tensor, prompt_len: Tensor, completion_len: Tensor, max_tokens: int, *, unit: int = 1,
                 packed: bool = False, max_rows: int | None = None,
                 count_over_ranks: Callable[[int], int] | None = None) -> list[Tensor]:
    """``rows`` (their real prompt and completion lengths alongside) cut into forwards of at most
    ``max_tokens`` tokens, counted as the forward will run them (padded to the micro-batch's own
    widths, or ``packed``), and at most ``max_rows`` rows; ``unit`` consecutive rows stay together.
    The hf engine cuts its generate calls with it too (completion length = ``max_new_tokens``)."""
    if len(rows) % unit:
        raise ValueError(f"{len(rows)} rows do not split into whole units of {unit}")
    units = rows.reshape(-1, unit)
    prompt, completion = prompt_len.reshape(-1, unit), completion_len.reshape(-1, unit)
    order = torch.argsort(prompt.max(1).values + completion.max(1).values, descending=True, stable=True).tolist()
    batches: list[list[int]] = []
    count = longest_prompt = longest_completion = tokens = 0
    for u in order:
        p, c = int(prompt[u].max()), int(completion[u].max())
        grown_tokens = tokens + int((prompt[u] + completion[u]).sum())
        grown_padded = (count + unit) * (max(longest_prompt, p) + max(longest_completion, c))
        fits_rows = max_rows is None or count + unit <= max_rows
        if batches and fits_rows and (grown_tokens if packed else grown_padded) <= max_tokens:
            batches[-1].append(u)
            count, tokens = count + unit, grown_tokens
            longest_prompt, longest_completion = max(longest_prompt, p), max(longest_completion, c)
        else:
            batches.append([u])
            count, tokens, longest_prompt, longest_completion = unit, int((prompt[u] + completion[u]).sum()), p, c
    if count_over_ranks is not None:
        batches = _split_to(batches, count_over_ranks(len(batches)))
    return [units[members].reshape(-1) for members in batches]


def _split_to(batches: list[list[int]], count: int) -> list[list[int]]:
    """Split the micro-batch with the most units in two (its longer half first) until there are
    ``count``; every process holds as many units, so the largest count over processes is reachable."""
    batches = [list(b) for b in batches]
    while len(batches) < count:
        i = max(range(len(batches)), key=lambda k: len(batches[k]))
        if len(batches[i]) < 2:
            raise RuntimeError(f"cannot split {len(batches)} micro-batches of one unit each into {count}")
        half = len(batches[i]) // 2
        batches[i : i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


def plan(rows: Tensor, prompt_len: Tensor, completion_len: Tensor, *, max_rows: int, max_tokens: int | None,
         unit: int = 1, packed: bool = False, count_over_ranks: Callable[[int], int] | None = None) -> list[Tensor]:
    """The forwards over ``rows``: ``max_rows`` at a time in order without a token budget, else
    :func:`token_budget`."""
    if max_tokens is None:
        return fixed_rows(rows, max_rows)
    return token_budget(rows, prompt_len, completion_len, max_tokens, unit=unit, packed=packed,
                        count_over_ranks=count_over_ranks)


def token_metrics(tokens, positions: int, reduce_sum) -> dict[str, float]:
    """``tokens/forward``: token positions the step's training forwards ran, padding included, and
    ``tokens/padding_share``: the share of them that was padding (summed over processes)."""
    real = reduce_sum(float(sum(length.sum() for length in tokens.lengths())))
    positions = reduce_sum(float(positions))
    return {"tokens/forward": positions, "tokens/padding_share": 1.0 - real / positions if positions else 0.0}

"""Padding-free packing: the sequences of a forward concatenated without padding.

Each sequence (its real prompt tokens, then its real completion tokens) gets position ids from 0,
and the forward runs without an attention mask: transformers reads a restart of the position ids as
the start of a new sequence and keeps the sequences apart (flash-attention's variable-length kernel
when the whole forward is one row; a block-diagonal causal mask for sdpa and eager attention).
For the mask-based implementations the sequences are placed first-fit-decreasing into rows of 1, 2
or 4 times the longest sequence (the first whose filler is at most 5% of the positions, else the
least filler), so attention costs rows × row length² instead of (Σ lengths)²; the end of each row is
filled with a short dummy sequence whose outputs are never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# attention implementations whose masks follow packed position ids (transformers.masking_utils), and
# those that take the whole forward as one row (flash-attention's variable-length path)
MASKED_PACKING = ("sdpa", "eager")
ONE_ROW_PACKING = ("flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class PackedInputs:
    """A forward's packed rows and where each completion token's prediction sits in them."""

    input_ids: Tensor  # long [B, L]
    position_ids: Tensor  # long [B, L]
    source: tuple[Tensor, Tensor]  # (packed row, position) of the hidden state predicting each completion token
    target: tuple[Tensor, Tensor]  # (batch row, completion position) of that token

    @property
    def positions(self) -> int:
        return self.input_ids.numel()


def attention_implementation(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def packing_unavailable(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run packed sequences, or None when it can."""
    implementation = attention_implementation(model)
    if implementation not in MASKED_PACKING + ONE_ROW_PACKING:
        return (f"its attention implementation '{implementation}' is not one that keeps packed sequences apart "
                f"({', '.join(MASKED_PACKING + ONE_ROW_PACKING)})")
    return None


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` placed into bins of ``capacity`` (longest first, each into the first bin
    with room); every length must be at most ``capacity``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


ROW_LENGTHS = (1, 2, 4)  # row lengths tried for mask-based packing, in multiples of the longest sequence
MAX_FILLER = 0.05


def row_layout(lengths: list[int]) -> tuple[int, list[list[int]]]:
    """Row length and bins for mask-based packing (module docstring)."""
    longest, total = max(lengths), sum(lengths)
    best = None
    for multiple in ROW_LENGTHS:
        capacity = longest * multiple
        bins = first_fit_decreasing(lengths, capacity)
        filler = 1 - total / (capacity * len(bins))
        if best is None or filler < best[0]:
            best = (filler, capacity, bins)
        if filler <= MAX_FILLER:
            break
    return best[1], best[2]


def pack(prompt_ids: Tensor, prompt_len: Tensor, completion_ids: Tensor, completion_len: Tensor, *,
         one_row: bool) -> PackedInputs:
    """Pack rows of left-padded prompts (``prompt_len`` real tokens each, at least 1) and right-padded
    completions (``completion_len`` real tokens each)."""
    if bool((prompt_len < 1).any()):
        raise ValueError("packing needs at least one prompt token per row (its last one predicts the first "
                         "completion token)")
    lengths = (prompt_len + completion_len).tolist()
    capacity, bins = (sum(lengths), [list(range(len(lengths)))]) if one_row else row_layout(lengths)
    width = prompt_ids.shape[1]
    input_ids = torch.zeros(len(bins), capacity, dtype=prompt_ids.dtype)
    position_ids = torch.zeros(len(bins), capacity, dtype=torch.long)
    source_row, source_pos, target_row, target_pos = [], [], [], []
    for b, members in enumerate(bins):
        offset = 0
        for i in members:
            p, c = int(prompt_len[i]), int(completion_len[i])
            sequence = torch.cat([prompt_ids[i, width - p:], completion_ids[i, :c]])
            input_ids[b, offset : offset + p + c] = sequence
            position_ids[b, offset : offset + p + c] = torch.arange(p + c)
            source_row.append(torch.full((c,), b))
            source_pos.append(torch.arange(offset + p - 1, offset + p - 1 + c))
            target_row.append(torch.full((c,), i))
            target_pos.append(torch.arange(c))
            offset += p + c
        position_ids[b, offset:] = torch.arange(capacity - offset)  # the filler: a sequence of its own
    return PackedInputs(input_ids, position_ids, (torch.cat(source_row), torch.cat(source_pos)),
                        (torch.cat(target_row), torch.cat(target_pos)))

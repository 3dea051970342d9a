"""The ``hf`` engine: batched sampling with transformers ``generate`` (the CPU path).

Sampling runs under ``torch.no_grad()`` (not ``inference_mode``: its tensors cannot enter a later
backward, docs/design.md §9) on the unwrapped policy, so it always sees the current weights.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from rltk.engines.base import Generation, SamplingParams, completion_mask_from_ids, pad_left, pad_right


class HFEngine:
    """Samples from ``get_model()`` (a callable, so a DDP/DeepSpeed wrapper can be unwrapped lazily)."""

    def __init__(self, get_model: Callable[[], torch.nn.Module], tokenizer, batch_size: int = 256,
                 max_prompt_length: int | None = None):
        self.get_model = get_model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        # set under ZeRO-3 (rltk.trainer.distributed.attach_generation): a context manager that
        # yields the model with its parameters gathered; generate then runs without collectives
        self.model_context: Callable[[], ContextManager[torch.nn.Module]] | None = None
        self._held: torch.nn.Module | None = None

    @contextlib.contextmanager
    def hold(self):
        """Enter ``model_context`` once for several ``generate`` calls (a no-op without one)."""
        if self.model_context is None or self._held is not None:
            yield
            return
        with self.model_context() as model:
            self._held = model
            try:
                yield
            finally:
                self._held = None

    def sync_weights(self) -> None:
        """Nothing to do: generation uses the training model's own weights."""

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> Generation:
        with self.hold():
            return self._generate(self._held if self._held is not None else self.get_model(), prompts, params)

    def _generate(self, model, prompts: list[str], params: SamplingParams) -> Generation:
        device = next(model.parameters()).device
        encoded = [self.tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"] for p in prompts]
        rows = [ids for ids in encoded for _ in range(params.n)]
        was_training = model.training
        model.eval()
        parts = []
        try:
            for start in range(0, len(rows), self.batch_size):
                parts.append(self._generate_batch(model, rows[start : start + self.batch_size], params, device))
        finally:
            model.train(was_training)
        return self._merge(parts, params)

    def _generate_batch(self, model, rows, params: SamplingParams, device):
        pad_id = self.tokenizer.pad_token_id
        prompt_ids = pad_left(rows, pad_id).to(device)
        prompt_mask = pad_left([torch.ones_like(r) for r in rows], 0).to(device)
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else None,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            output_scores=params.return_logps,
            # with gathered ZeRO-3 weights each rank generates on its own, not in lock-step
            synced_gpus=False if self.model_context is not None else None,
        )
        completion_ids = out.sequences[:, prompt_ids.shape[1] :]
        logps = None
        if params.return_logps:
            scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)
            logps = scores.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        return prompt_ids.cpu(), prompt_mask.cpu(), completion_ids.cpu(), None if logps is None else logps.cpu()

    def _merge(self, parts, params: SamplingParams) -> Generation:
        pad_id = self.tokenizer.pad_token_id
        prompt_ids = pad_left([p[0] for p in parts], pad_id)
        prompt_mask = pad_left([p[1] for p in parts], 0)
        completion_ids = pad_right([p[2] for p in parts], pad_id, length=max(1, max(p[2].shape[1] for p in parts)))
        mask, truncated = completion_mask_from_ids(completion_ids, self.tokenizer.eos_token_id)
        completion_ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, pad_id))
        logps = None
        if params.return_logps:
            logps = pad_right([p[3] for p in parts], 0.0, length=completion_ids.shape[1]) * mask
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Generation(prompt_ids, prompt_mask, completion_ids, mask, truncated, texts, logps)

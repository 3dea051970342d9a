"""The ``hf`` engine: batched sampling with transformers ``generate`` (the CPU path).

Sampling runs under ``torch.no_grad()`` (not ``inference_mode``: its tensors cannot enter a later
backward, docs/design.md §9) on the unwrapped policy, so it always sees the current weights.

Three ways to cut the rows (prompt × n completions) into work, docs/distributed.md "Generation
batching (hf engine)":

* default: ``batch_size`` rows per ``generate`` call, in order;
* ``max_tokens_per_batch``: rows sorted by prompt length (longest first) and cut into ``generate``
  calls of at most that many tokens, counted as rows × (longest prompt of the call +
  ``max_new_tokens``), and at most ``batch_size`` rows; results come back in the original order;
* ``continuous_batching``: transformers' continuous batching (``model.generate_batch``, a paged KV
  cache; a finished row frees its slot for the next one), at most ``batch_size`` rows at once and,
  with ``max_tokens_per_batch``, a KV cache of that many tokens.

``drop_finished`` replaces each ``generate`` call (either of the first two ways) by rltk's own decode
loop, which removes rows that emitted EOS from the batch and the KV cache
(:mod:`rltk.engines.decode`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, ContextManager

import torch

from rltk.batching import token_budget
from rltk.engines.base import Generation, SamplingParams, completion_mask_from_ids, pad_left, pad_right
from rltk.engines.decode import sample_dropping_finished
from rltk.schema import ConfigError

# page size of the continuous-batching KV cache (tokens per block): small, so that short rows of a
# CPU run waste little of it; transformers' default (256) is sized for GPUs and long sequences
CB_PAGE_SIZE = 32


def plan_token_batches(lengths: list[int], max_new_tokens: int, max_tokens: int, max_rows: int) -> list[list[int]]:
    """Row indices of each ``generate`` call: rows sorted by prompt length, longest first (a stable
    sort, so the completions of one prompt stay together and in order), cut greedily so that each
    call holds at most ``max_rows`` rows and rows × (its longest prompt + ``max_new_tokens``) ≤
    ``max_tokens`` (:func:`rltk.batching.token_budget`). A row longer than the budget on its own is
    a call of its own (validate.py refuses such a recipe; prompts longer than
    ``data.max_prompt_length`` can still reach an engine)."""
    n = len(lengths)
    calls = token_budget(torch.arange(n), torch.tensor(lengths), torch.full((n,), max_new_tokens), max_tokens,
                         max_rows=max_rows)
    return [call.tolist() for call in calls]


def require_continuous_batching() -> None:
    """One line when this transformers has no continuous batching (``ContinuousBatchingConfig`` and
    ``GenerationMixin.generate_batch``; rltk uses the API of transformers 5.25)."""
    import transformers

    if not (hasattr(transformers, "ContinuousBatchingConfig") and hasattr(transformers.GenerationMixin, "generate_batch")):
        raise ConfigError(f"rollout.continuous_batching: transformers {transformers.__version__} has no continuous "
                          f"batching (ContinuousBatchingConfig, GenerationMixin.generate_batch); set "
                          f"rollout.continuous_batching: false")


def logits_processors(model, gen, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """The logits processors ``generate`` builds for ``gen`` (temperature, top-k, top-p and whatever
    the model's generation config adds), for rltk's own decode loop (transformers' private
    ``_prepare_special_tokens`` / ``_get_logits_processor``, as ``generate`` calls them)."""
    model._prepare_special_tokens(gen, kwargs_has_attention_mask=True, device=prompt_ids.device)
    return model._get_logits_processor(generation_config=gen, input_ids_seq_length=prompt_ids.shape[1],
                                       encoder_input_ids=prompt_ids, device=prompt_ids.device,
                                       model_kwargs={"attention_mask": prompt_mask})


class HFEngine:
    """Samples from ``get_model()`` (a callable, so a DDP/DeepSpeed wrapper can be unwrapped lazily)."""

    def __init__(self, get_model: Callable[[], torch.nn.Module], tokenizer, batch_size: int = 256,
                 max_prompt_length: int | None = None, max_tokens_per_batch: int | None = None,
                 continuous_batching: bool = False, drop_finished: bool = False):
        if drop_finished and continuous_batching:
            raise ConfigError("rollout.drop_finished and rollout.continuous_batching: pick one (continuous batching "
                              "already frees a finished row's slot)")
        self.get_model = get_model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.max_tokens_per_batch = max_tokens_per_batch
        self.continuous_batching = continuous_batching
        self.drop_finished = drop_finished
        if continuous_batching:
            require_continuous_batching()
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
            if self.continuous_batching:
                return self._generate_continuous(model, rows, params)
            if self.max_tokens_per_batch is None:
                for start in range(0, len(rows), self.batch_size):
                    parts.append(self._generate_batch(model, rows[start : start + self.batch_size], params, device))
                order = None
            else:
                calls = plan_token_batches([r.shape[1] for r in rows], params.max_new_tokens,
                                           self.max_tokens_per_batch, self.batch_size)
                for call in calls:
                    parts.append(self._generate_batch(model, [rows[i] for i in call], params, device))
                order = [i for call in calls for i in call]
        finally:
            model.train(was_training)
        return self._merge(parts, params, order)

    def _generate_batch(self, model, rows, params: SamplingParams, device):
        pad_id = self.tokenizer.pad_token_id
        prompt_ids = pad_left(rows, pad_id).to(device)
        prompt_mask = pad_left([torch.ones_like(r) for r in rows], 0).to(device)
        if self.drop_finished:
            gen = self.generation_config(model, params)
            completion_ids, logps = sample_dropping_finished(
                model, prompt_ids, prompt_mask,
                processors_for=lambda ids, mask: logits_processors(model, gen, ids, mask),
                max_new_tokens=params.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad_id,
                return_logps=params.return_logps)
            return prompt_ids.cpu(), prompt_mask.cpu(), completion_ids.cpu(), None if logps is None else logps.cpu()
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

    def _merge(self, parts, params: SamplingParams, order: list[int] | None = None) -> Generation:
        """One Generation from the calls' outputs; ``order[j]`` is the original row of merged row ``j``."""
        pad_id = self.tokenizer.pad_token_id
        prompt_ids = pad_left([p[0] for p in parts], pad_id)
        prompt_mask = pad_left([p[1] for p in parts], 0)
        completion_ids = pad_right([p[2] for p in parts], pad_id, length=max(1, max(p[2].shape[1] for p in parts)))
        logps = pad_right([p[3] for p in parts], 0.0, length=completion_ids.shape[1]) if params.return_logps else None
        if order is not None:
            back = torch.empty(len(order), dtype=torch.long)
            back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
            prompt_ids, prompt_mask, completion_ids = prompt_ids[back], prompt_mask[back], completion_ids[back]
            logps = None if logps is None else logps[back]
        mask, truncated = completion_mask_from_ids(completion_ids, self.tokenizer.eos_token_id)
        completion_ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, pad_id))
        if logps is not None:  # not logps * mask: a filtered token's -inf after EOS would make NaN
            logps = torch.where(mask.bool(), logps, torch.zeros_like(logps))
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Generation(prompt_ids, prompt_mask, completion_ids, mask, truncated, texts, logps)

    # ------------------------------------------------------------------ continuous batching
    def continuous_batching_config(self, rows: list[torch.Tensor], params: SamplingParams):
        """Sizes of the paged KV cache: at most ``batch_size`` rows at once, each up to the longest
        prompt + ``max_new_tokens``; with ``max_tokens_per_batch`` the cache holds that many tokens
        (and a forward step at most that many new tokens)."""
        from transformers import ContinuousBatchingConfig

        longest = max(r.shape[1] for r in rows) + params.max_new_tokens
        blocks_per_row = math.ceil(longest / CB_PAGE_SIZE) + 1
        concurrent = min(self.batch_size, len(rows))
        if self.max_tokens_per_batch is None:
            num_blocks = concurrent * blocks_per_row
            step_tokens = sum(r.shape[1] for r in rows[:concurrent])
        else:
            num_blocks = max(blocks_per_row, self.max_tokens_per_batch // CB_PAGE_SIZE)
            step_tokens = self.max_tokens_per_batch
        # a seed drawn from the caller's generator: seeded runs stay reproducible (transformers
        # re-seeds torch's global generator with it before sampling)
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        return ContinuousBatchingConfig(
            page_size=CB_PAGE_SIZE, num_blocks=num_blocks, max_batch_tokens=max(longest, step_tokens),
            max_requests_per_batch=concurrent,
            return_logprobs=params.return_logps, seed=seed,
            # the model's own attention (model.attn_implementation): no silent switch to a flash kernel
            # (which transformers may fetch from the Hub); on a GPU name a flash implementation yourself
            auto_switch_to_flash=False)

    def generation_config(self, model, params: SamplingParams):
        """What ``generate`` samples with: the model's generation config updated with the same
        arguments as ``_generate_batch`` passes to ``generate``."""
        gen = copy.deepcopy(model.generation_config)
        gen.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                   top_k=params.top_k if params.top_k > 0 else None, max_new_tokens=params.max_new_tokens,
                   pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                   num_return_sequences=1)
        return gen

    def _generation_config(self, model, params: SamplingParams):
        """``generation_config``, checked for continuous batching: a logits processor it cannot apply
        per request (a repetition penalty from the model's generation_config, say) is one line."""
        gen = self.generation_config(model, params)
        unsupported = [type(p).__name__ for p in model._get_logits_processor(gen)
                       if getattr(p, "supports_continuous_batching", None) is False]
        if unsupported:
            raise ConfigError(f"rollout.continuous_batching: the model's generation_config asks for "
                              f"{', '.join(unsupported)}, which transformers' continuous batching does not apply; "
                              f"set rollout.continuous_batching: false")
        return gen

    def _generate_continuous(self, model, rows: list[torch.Tensor], params: SamplingParams) -> Generation:
        if self.model_context is not None:
            raise ConfigError("rollout.continuous_batching: not supported under DeepSpeed ZeRO-3 (transformers runs the "
                              "forward of the gathered model in a background thread, untested with ZeRO-3's parameter "
                              "hooks); set rollout.continuous_batching: false or use ZeRO-2/DDP")
        if model.dtype == torch.float32 and (torch.is_autocast_enabled(model.device.type)
                                            or getattr(model, "_original_forward", None) is not None):
            # accelerate's mixed precision wraps forward in autocast (``_original_forward`` is its mark)
            raise ConfigError("rollout.continuous_batching: the policy computes in bf16/fp16 by autocast over float32 "
                              "weights, and transformers allocates its paged KV cache in the weights' dtype (float32), "
                              "so it refuses the half-precision keys (index_copy_: Float and BFloat16); use "
                              "model.dtype float32, model.pure_bf16, DeepSpeed (half-precision weights), or set "
                              "rollout.continuous_batching: false")
        if not callable(getattr(model, "generate_batch", None)):
            raise ConfigError(f"rollout.continuous_batching: {type(model).__name__} has no generate_batch "
                              f"(transformers' continuous batching); set rollout.continuous_batching: false")
        gen = self._generation_config(model, params)
        cb = self.continuous_batching_config(rows, params)
        inputs = [r[0].tolist() for r in rows]
        # transformers logs, not raises, a failed or missing request: a missing row is an error here
        results = list(model.generate_batch(inputs, generation_config=gen, continuous_batching_config=cb,
                                            max_new_tokens=params.max_new_tokens, progress_bar=False,
                                            warmup=False).values())
        bad = [r for r in results if r.error is not None]
        if len(results) != len(rows) or bad:
            reason = bad[0].error if bad else f"{len(rows) - len(results)} of {len(rows)} rows came back empty"
            raise RuntimeError(f"continuous batching failed: {reason}")
        pad_id = self.tokenizer.pad_token_id
        width = max(1, max(len(r.generated_tokens) for r in results))
        completion_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        logps = torch.zeros(len(rows), width) if params.return_logps else None
        for j, r in enumerate(results):
            completion_ids[j, : len(r.generated_tokens)] = torch.tensor(r.generated_tokens, dtype=torch.long)
            if logps is not None:
                logps[j, : len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
        parts = [(pad_left(rows, pad_id), pad_left([torch.ones_like(r) for r in rows], 0), completion_ids, logps)]
        return self._merge(parts, params)

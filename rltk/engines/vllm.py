"""The ``vllm`` engine (GPU only): rltk's engine interface over trl's ``VLLMGeneration``.

trl 1.16's ``trl.generation.vllm_generation.VLLMGeneration`` owns everything vLLM-specific: the
colocated ``vllm.LLM`` per process (tensor parallel groups, sleep mode) or the client of a
``trl vllm-serve`` server, and the weight push (DeepSpeed ZeRO-3 gather, PEFT merge, FSDP). This
module only maps rltk's recipe onto its arguments and its outputs onto :class:`Generation`
(docs/vllm.md):

- **arguments** (:func:`generation_kwargs`): ``rollout.vllm.*`` → mode, server host/port/timeout,
  NCCL group port, tensor_parallel_size, gpu_memory_utilization, max_model_length,
  max_num_seqs, enable_sleep_mode; ``model.trust_remote_code``; sampling knobs are set per call
  from :class:`SamplingParams` (training and evaluation sample differently).
- **weights**: the trainer calls :meth:`VLLMEngine.sync_weights` after every optimizer step; it
  marks vLLM's copy stale and the next :meth:`generate` pushes the current policy once before
  sampling. So vLLM never samples from old weights, and ``mini_batches`` optimizer steps between
  two rollout batches cost one push, not ``mini_batches`` (TRL's GRPOTrainer syncs the same way:
  before generating, when the step changed). The first generate always pushes, so a server
  started from another checkpoint is brought to the policy.
- **sleep mode** (colocate): ``VLLMGeneration`` wakes the weights to load them, wakes the KV cache
  before sampling and puts the engine back to sleep (level 2) after it, so training steps run
  with vLLM's memory freed.
- **outputs**: prompt ids left-padded, completion ids right-padded with a mask over the sampled
  tokens (vLLM keeps the stop token), truncated = hit ``max_new_tokens`` without a stop token,
  and vLLM's processed (post-temperature) sampling log-probs for the importance-sampling
  correction.

vLLM is never imported at module load: :func:`require_vllm` checks that it is installed (before
any model loads) and only :meth:`VLLMEngine.create` imports trl's vLLM module.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any, Callable

import torch

from rltk.schema import ConfigError, ModelConfig, RolloutConfig
from rltk.engines.base import Generation, SamplingParams, pad_left, pad_right

MISSING_VLLM = ("rollout.engine=vllm needs vLLM, which is not installed: from the rltk checkout, "
                'pip install -e ".[vllm]" (CUDA machines only); or use rollout.engine=hf')


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """A one-line ConfigError naming the extra when vLLM is missing."""
    if not vllm_available():
        raise ConfigError(MISSING_VLLM)


def generation_class():
    """trl's ``VLLMGeneration`` (imported here, never at module load)."""
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration


def generation_kwargs(cfg: RolloutConfig, *, max_prompt_length: int | None, max_new_tokens: int | None = None,
                      trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``VLLMGeneration`` (besides model, accelerator, processing_class).

    ``max_model_length`` defaults to the longest prompt plus the longest generation the run asks
    for (``max_new_tokens``: training or evaluation, whichever is longer)."""
    v = cfg.vllm
    longest = max(cfg.max_new_tokens, max_new_tokens or 0)
    max_model_length = v.max_model_length or (max_prompt_length + longest if max_prompt_length else None)
    return {
        "mode": v.mode,
        "server_host": v.server_host,
        "server_port": v.server_port,
        "server_timeout": v.server_timeout,
        "group_port": v.group_port,
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "max_model_length": max_model_length,
        "max_num_seqs": v.max_num_seqs,
        "enable_sleep_mode": v.enable_sleep_mode,
        "trust_remote_code": trust_remote_code,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "max_completion_length": cfg.max_new_tokens,
        "logprobs": 0,  # the sampled token's log-prob only
    }


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Tokens that end a completion: the tokenizer's EOS and the model's generation-config EOS ids
    (vLLM stops on both, e.g. Qwen's <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return ids


class VLLMEngine:
    """Samples with a ``VLLMGeneration``-like ``generator`` (see the module docstring)."""

    # Every process must call generate equally often with equally many prompts (server mode
    # gathers prompts over processes; tensor parallel groups gather within the group).
    collective = True

    def __init__(self, generator, tokenizer, stop_ids: set[int]):
        self.generator = generator
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.stale = True  # push before the first generate
        self.pushes = 0

    @classmethod
    def create(cls, cfg: RolloutConfig, get_model: Callable, tokenizer, *, accelerator=None,
               max_prompt_length: int | None = None, max_new_tokens: int | None = None,
               model_cfg: ModelConfig | None = None) -> "VLLMEngine":
        require_vllm()
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator()
        model = get_model()  # unwrapped: VLLMGeneration gathers ZeRO-3 shards and merges PEFT adapters itself
        kwargs = generation_kwargs(cfg, max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens,
                                   trust_remote_code=bool(model_cfg and model_cfg.trust_remote_code))
        generator = generation_class()(model=model, accelerator=accelerator, processing_class=tokenizer, **kwargs)
        return cls(generator, tokenizer, stop_token_ids(tokenizer, model))

    # ------------------------------------------------------------------ weights
    def sync_weights(self) -> None:
        """Called by the trainer after every optimizer step: vLLM's weights are now stale."""
        self.stale = True

    def push_weights(self) -> None:
        """Send the current policy weights to vLLM now (a collective over all processes)."""
        self.generator.sync_weights()
        self.stale = False
        self.pushes += 1

    # ------------------------------------------------------------------ sampling
    def generate(self, prompts: list[str], params: SamplingParams) -> Generation:
        if self.stale:
            self.push_weights()
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        rows = [list(ids) for ids in encoded for _ in range(params.n)]  # duplicates contiguous, as trl expects
        g = self.generator
        g.temperature, g.top_p, g.top_k = params.temperature, params.top_p, params.top_k
        g.max_completion_length = params.max_new_tokens
        prompt_ids, completion_ids, logprobs, _ = g.generate(prompts=rows, images=None, num_generations=params.n)
        if len(completion_ids) != len(rows):
            raise RuntimeError(f"vLLM returned {len(completion_ids)} completions for {len(rows)} requested")
        return self.to_generation(prompt_ids, completion_ids, logprobs, params)

    def to_generation(self, prompt_ids, completion_ids, logprobs, params: SamplingParams) -> Generation:
        """trl's lists → rltk's padded tensors (module docstring, **outputs**)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(1, max(len(c) for c in completion_ids))
        prompts = pad_left([torch.tensor([list(p)], dtype=torch.long) for p in prompt_ids], pad)
        prompt_mask = pad_left([torch.ones(1, len(p), dtype=torch.long) for p in prompt_ids], 0)
        ids = pad_right([torch.tensor([list(c)], dtype=torch.long).reshape(1, -1) for c in completion_ids], pad, width)
        mask = pad_right([torch.ones(1, len(c), dtype=torch.long) for c in completion_ids], 0, width)
        truncated = torch.tensor([len(c) >= params.max_new_tokens and (not c or c[-1] not in self.stop_ids)
                                  for c in completion_ids], dtype=torch.bool)
        sampling = None
        if params.return_logps:
            if logprobs is None:
                raise RuntimeError("vLLM returned no log-probs; the importance-sampling correction needs them")
            rows = [torch.tensor([[_first(lp) for lp in seq]], dtype=torch.float32).reshape(1, -1) for seq in logprobs]
            sampling = pad_right(rows, 0.0, width) * mask
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return Generation(prompts, prompt_mask, ids, mask, truncated, texts, sampling)


def _first(values) -> float:
    """The sampled token's log-prob (trl: a list per token, sampled token first); NaN when missing."""
    value = values[0] if isinstance(values, (list, tuple)) else values
    return math.nan if value is None else float(value)

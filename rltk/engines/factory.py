"""Pick the rollout engine named by ``rollout.engine``."""
from __future__ import annotations

from typing import Callable

from rltk.schema import ConfigError, ModelConfig, RolloutConfig
from rltk.engines.hf import HFEngine, require_continuous_batching


def require_engine(cfg: RolloutConfig) -> None:
    """Fail with one line when the engine's extra is not installed; call before loading any model.
    (Keys of the other engine are refused when the recipe loads: rltk.validate.)"""
    if cfg.engine == "vllm":
        from rltk.engines.vllm import require_vllm

        require_vllm()
    elif cfg.continuous_batching:
        require_continuous_batching()


def hf_settings(cfg: RolloutConfig, max_prompt_length: int | None) -> dict:
    """The :class:`~rltk.engines.hf.HFEngine` keyword arguments ``cfg`` sets."""
    return dict(batch_size=cfg.batch_size, max_prompt_length=max_prompt_length,
                max_tokens_per_batch=cfg.max_tokens_per_batch, continuous_batching=cfg.continuous_batching,
                drop_finished=cfg.drop_finished)


def make_engine(cfg: RolloutConfig, get_model: Callable, tokenizer, max_prompt_length: int | None = None, *,
                accelerator=None, model_cfg: ModelConfig | None = None, max_new_tokens: int | None = None):
    """``hf`` runs anywhere (with ``rollout.max_tokens_per_batch``, ``rollout.continuous_batching``
    and ``rollout.drop_finished``, rltk.engines.hf); ``vllm`` needs the ``vllm`` extra on a CUDA machine (rltk.engines.vllm).

    ``max_new_tokens`` is the longest generation the run will ask for (sizes vLLM's context)."""
    if cfg.engine == "hf":
        return HFEngine(get_model, tokenizer, **hf_settings(cfg, max_prompt_length))
    from rltk.engines.vllm import VLLMEngine

    return VLLMEngine.create(cfg, get_model, tokenizer, accelerator=accelerator, max_prompt_length=max_prompt_length,
                             max_new_tokens=max_new_tokens, model_cfg=model_cfg)


__all__ = ["hf_settings", "make_engine", "require_engine", "ConfigError"]

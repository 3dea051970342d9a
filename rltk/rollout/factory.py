"""Pick the rollout engine named by ``rollout.engine``."""
from __future__ import annotations

from typing import Callable

from rltk.config import ConfigError, RolloutConfig
from rltk.rollout.hf import HFEngine


def make_engine(cfg: RolloutConfig, get_model: Callable, tokenizer, max_prompt_length: int | None = None):
    """``hf`` runs anywhere; ``vllm`` needs the ``vllm`` extra on a CUDA machine."""
    if cfg.engine == "hf":
        return HFEngine(get_model, tokenizer, batch_size=cfg.batch_size, max_prompt_length=max_prompt_length)
    from rltk.rollout.vllm import VLLMEngine

    return VLLMEngine.create(cfg, get_model, tokenizer)


__all__ = ["make_engine", "ConfigError"]

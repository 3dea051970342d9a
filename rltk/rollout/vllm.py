"""The ``vllm`` engine slot (GPU only). vLLM is imported lazily, never at module load.

Sampling with vLLM (colocate or server mode, weight sync after each optimizer step) follows trl's
``trl.generation.VLLMGeneration``; the engine itself lands with the scale-out work (issue 7). Until
then selecting it fails early with a clear message rather than deep inside a step.
"""
from __future__ import annotations

import importlib.util

from rltk.config import ConfigError, RolloutConfig


class VLLMEngine:
    @classmethod
    def create(cls, cfg: RolloutConfig, get_model, tokenizer):
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("rollout.engine: 'vllm' needs vLLM on a CUDA machine: pip install 'rltk[vllm]'; "
                              "use rollout.engine=hf on CPU")
        raise ConfigError("rollout.engine: the vllm engine is not available in this version of rltk yet; "
                          "use rollout.engine=hf")

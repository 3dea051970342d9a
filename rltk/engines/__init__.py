"""Rollout engines behind one interface: ``hf`` (transformers) and ``vllm`` (GPU, lazily imported)."""
from rltk.engines.base import Generation, RolloutEngine, SamplingParams

__all__ = ["Generation", "RolloutEngine", "SamplingParams"]

"""The trainer side of the sampler→trainer importance-sampling correction (rltk.algos.importance).

When on (``rollout.importance_sampling.enabled``; default: with the vllm engine, and with
asynchronous generation, ``rollout.max_staleness`` > 0), the engine is
asked for its sampling log-probs, the trainer computes ``old_logps`` (one no-grad forward of the
policy that sampled), and every rollout batch carries the detached weights in
``Rollouts.is_weights``, which the pipeline multiplies into the per-token policy loss.
"""
from __future__ import annotations

from dataclasses import replace

from rltk.algos.importance import importance_weights
from rltk.algos.types import Rollouts
from rltk.schema import RolloutConfig


def correction_enabled(cfg: RolloutConfig) -> bool:
    """``enabled`` if set, else on exactly when the engine is vllm or the producer may lag
    (``max_staleness`` > 0: the weights are those of decoupled PPO's behaviour policy)."""
    flag = cfg.importance_sampling.enabled
    return (cfg.engine == "vllm" or cfg.max_staleness > 0) if flag is None else bool(flag)


class SamplerCorrection:
    """What the correction needs from the trainer, and the step that fills ``is_weights``."""

    def __init__(self, cfg: RolloutConfig):
        self.cfg = cfg.importance_sampling
        self.enabled = correction_enabled(cfg)

    def needs(self) -> set[str]:
        return {"old_logps"} if self.enabled else set()

    def apply(self, rollouts: Rollouts, sampling_logps) -> tuple[Rollouts, dict[str, float]]:
        """``rollouts`` with ``is_weights`` set, and the ``is/*`` metrics (nothing when off)."""
        if not self.enabled:
            return rollouts, {}
        if sampling_logps is None or rollouts.old_logps is None:
            raise RuntimeError("importance sampling is on but the engine returned no sampling log-probs "
                               "(or old_logps were not computed); set rollout.importance_sampling.enabled=false")
        out = importance_weights(rollouts.old_logps, sampling_logps, rollouts.completion_mask,
                                 level=self.cfg.level, mode=self.cfg.mode, cap=self.cfg.cap)
        return replace(rollouts, is_weights=out.weights), out.metrics

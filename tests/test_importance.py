"""Truncated importance sampling between sampler and trainer (rltk.algos.importance): hand vectors,
where it applies in the pipeline, and the trainer glue (old_logps requested, weights and metrics)."""
from __future__ import annotations

import math

import pytest
import torch

from rltk.algos.importance import apply_importance_weights, importance_weights
from rltk.algos.pipeline import AlgorithmPipeline
from rltk.algos.types import Advantages, Rollouts
from rltk.validate import build_recipe
from rltk.trainer.sampler_correction import SamplerCorrection, correction_enabled

# diff = old - sampling = [[0.5, -1.0, 0.0], [1.5, 0.0, (pad)]]
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
SAMPLING = torch.tensor([[-1.5, -1.0, -0.5], [-2.5, -1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
E = math.exp


def _close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=0)


def test_token_truncate_by_hand():
    out = importance_weights(OLD, SAMPLING, MASK, level="token", mode="truncate", cap=3.0)
    _close(out.weights, [[E(0.5), E(-1.0), 1.0], [3.0, 1.0, 0.0]])  # e^1.5 = 4.48 capped at 3
    assert out.metrics["is/ratio_min"] == pytest.approx(E(-1.0), abs=1e-6)
    assert out.metrics["is/ratio_max"] == pytest.approx(E(1.5), abs=1e-5)
    assert out.metrics["is/ratio_mean"] == pytest.approx((E(0.5) + E(-1.0) + 1 + E(1.5) + 1) / 5, abs=1e-6)
    assert out.metrics["is/masked_share"] == pytest.approx(1 / 5)


def test_token_mask_by_hand():
    out = importance_weights(OLD, SAMPLING, MASK, level="token", mode="mask", cap=3.0)
    _close(out.weights, [[E(0.5), E(-1.0), 1.0], [0.0, 1.0, 0.0]])  # the 4.48 token is dropped
    assert out.metrics["is/masked_share"] == pytest.approx(0.2)


@pytest.mark.parametrize("mode, second", [("truncate", 3.0), ("mask", 0.0)])
def test_sequence_level_by_hand(mode, second):
    out = importance_weights(OLD, SAMPLING, MASK, level="sequence", mode=mode, cap=3.0)
    # sequence ratios exp(0.5 - 1 + 0) = e^-0.5 and exp(1.5 + 0) = e^1.5 > cap
    _close(out.weights, [[E(-0.5)] * 3, [second, second, 0.0]])
    assert out.metrics["is/ratio_min"] == pytest.approx(E(-0.5), abs=1e-6)
    assert out.metrics["is/ratio_max"] == pytest.approx(E(1.5), abs=1e-5)
    assert out.metrics["is/ratio_mean"] == pytest.approx((E(-0.5) + E(1.5)) / 2, abs=1e-5)
    assert out.metrics["is/masked_share"] == pytest.approx(0.5)


def test_on_policy_is_exactly_one_and_missing_logps_count_as_on_policy():
    same = importance_weights(OLD, OLD, MASK)
    _close(same.weights, MASK.tolist())
    assert same.metrics == {"is/ratio_min": 1.0, "is/ratio_mean": 1.0, "is/ratio_max": 1.0, "is/masked_share": 0.0}
    nan = SAMPLING.clone()
    nan[0, 0] = float("nan")  # vLLM could not score a token: ratio 1 (TRL's nan_to_num)
    assert importance_weights(OLD, nan, MASK).weights[0, 0] == 1.0


def test_weights_are_detached_and_bad_knobs_fail():
    old = OLD.clone().requires_grad_(True)
    assert not importance_weights(old, SAMPLING, MASK).weights.requires_grad
    with pytest.raises(ValueError, match="level"):
        importance_weights(OLD, SAMPLING, MASK, level="group")
    with pytest.raises(ValueError, match="mode"):
        importance_weights(OLD, SAMPLING, MASK, mode="clip")
    assert apply_importance_weights(torch.ones(2, 3), None).sum() == 6


def _rollouts(**extra) -> Rollouts:
    return Rollouts(group_ids=torch.tensor([0, 0]), rewards=torch.tensor([1.0, 0.0]),
                    correct=torch.tensor([True, False]), completion_mask=MASK, truncated=torch.zeros(2, dtype=torch.bool),
                    ref_logps=torch.full((2, 3), -1.5), **extra)


def test_pipeline_weights_the_policy_loss_only_not_the_terms():
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    adv = Advantages(torch.tensor([0.7, -0.7]))
    plain = AlgorithmPipeline([{"name": "grpo"}], "reinforce")
    with_kl = AlgorithmPipeline([{"name": "grpo"}], "reinforce", terms=[{"name": "kl", "coef": 0.5}])
    weights = importance_weights(OLD, SAMPLING, MASK).weights
    policy, _ = plain.per_token_loss(logps, _rollouts(), adv)
    total, _ = with_kl.per_token_loss(logps, _rollouts(), adv)
    kl = total - policy
    weighted, _ = with_kl.per_token_loss(logps, _rollouts(is_weights=weights), adv)
    torch.testing.assert_close(weighted, weights * policy + kl)
    # gradient of the weighted policy loss w.r.t. logp is -w·A (weights are constants)
    grad, = torch.autograd.grad(plain.per_token_loss(logps, _rollouts(is_weights=weights), adv)[0].sum(), logps)
    torch.testing.assert_close(grad, -weights * adv.per_token(3))


def test_defaults_on_with_vllm_off_with_hf_and_overridable():
    assert correction_enabled(build_recipe({"rollout": {"engine": "vllm"}}).rollout)
    assert not correction_enabled(build_recipe({}).rollout)
    assert correction_enabled(build_recipe({"rollout": {"importance_sampling": {"enabled": True}}}).rollout)
    off = build_recipe({"rollout": {"engine": "vllm", "importance_sampling": {"enabled": False}}}).rollout
    assert not correction_enabled(off) and SamplerCorrection(off).needs() == set()
    cfg = build_recipe({}).rollout.importance_sampling
    assert (cfg.level, cfg.mode, cfg.cap) == ("token", "truncate", 3.0)


@pytest.mark.parametrize("override, message", [
    ("rollout.importance_sampling.cap=1.0", "rollout.importance_sampling.cap: must be > 1"),
    ("rollout.importance_sampling.level=group", "rollout.importance_sampling.level: 'group' is not one of"),
    ("rollout.importance_sampling.mode=clip", "rollout.importance_sampling.mode: 'clip' is not one of"),
])
def test_bad_importance_sampling_config_is_one_line(override, message):
    from rltk.schema import ConfigError

    with pytest.raises(ConfigError) as info:
        build_recipe({}, [override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_trainer_requests_old_logps_and_logs_ratios_with_the_hf_engine(tmp_path, tiny_model_dir):
    """The hf engine's sampling log-probs and the trainer's forward agree at the same weights: the
    ratios are 1 to float precision, and the batch carries weights and metrics."""
    from rltk.trainer.rl import RLTrainer
    from tests.conftest import small_recipe_data

    data = small_recipe_data(tiny_model_dir, tmp_path, rollout={"importance_sampling": {"enabled": True}},
                             trainer={"steps": 1})
    trainer = RLTrainer(build_recipe(data))
    try:
        assert "old_logps" in trainer.needs
        batch = trainer.collect()
        assert batch.rollouts.is_weights is not None and batch.rollouts.old_logps is not None
        assert batch.metrics["is/ratio_min"] == pytest.approx(1.0, abs=1e-3)
        assert batch.metrics["is/ratio_max"] == pytest.approx(1.0, abs=1e-3)
        assert batch.metrics["is/masked_share"] == 0.0
        mask = batch.rollouts.completion_mask
        torch.testing.assert_close(batch.rollouts.is_weights, mask, atol=1e-3, rtol=0)
    finally:
        trainer.close()

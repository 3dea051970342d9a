"""Reward shaping (``algorithm.shaping``): Kimi k1.5's length penalty against hand-computed vectors
(docs/algorithms/reference.md §0.5), the shaped rewards reaching the estimator, and bad output or
knobs as one line."""
from __future__ import annotations

import pytest
import torch

from rltk.algos import AlgorithmPipeline, Rollouts, StageError, register_shaping
from rltk.algos.shaping import length_penalty
from rltk.schema import ConfigError
from rltk.validate import build_recipe


def rollouts(lengths, correct, groups, rewards=None):
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    n = len(lengths)
    return Rollouts(group_ids=torch.tensor(groups), rewards=torch.tensor(rewards or [float(c) for c in correct]),
                    correct=torch.tensor(correct, dtype=torch.bool), completion_mask=mask,
                    truncated=torch.zeros(n, dtype=torch.bool))


def test_length_penalty_vectors():
    # group 0: lengths 10, 20, 30, 40 (min 10, max 40): λ = 0.5, 1/6, -1/6, -0.5; correct, correct, wrong, wrong
    # group 1: lengths 5, 5 (flat): 0; group 2: lengths 8, 2, correct both: λ = -0.5, 0.5
    r = rollouts([10, 20, 30, 40, 5, 5, 8, 2], [True, True, False, False, True, False, True, True],
                 [0, 0, 0, 0, 1, 1, 2, 2])
    expected = torch.tensor([0.5, 1 / 6, -1 / 6, -0.5, 0.0, 0.0, -0.5, 0.5])
    assert torch.allclose(length_penalty(r), expected, atol=1e-6)
    assert torch.allclose(length_penalty(r, coef=0.2), 0.2 * expected, atol=1e-6)
    # a wrong answer shorter than the middle is not rewarded: λ > 0 is clipped to 0
    r = rollouts([10, 40], [False, True], [0, 0])
    assert torch.allclose(length_penalty(r), torch.tensor([0.0, -0.5]))


def test_shaped_rewards_reach_the_estimator():
    """grpo on rewards 1, 1, 0, 0 + the length terms 0.5, 1/6, -1/6, -0.5: the z-score of the sums."""
    r = rollouts([10, 20, 30, 40], [True, True, False, False], [0, 0, 0, 0])
    pipe = AlgorithmPipeline(["grpo"], shaping=[{"name": "length_penalty", "coef": 1.0}])
    advantages, metrics = pipe.compute_advantages(r)
    shaped = torch.tensor([1.5, 1 + 1 / 6, -1 / 6, -0.5])
    z = (shaped - shaped.mean()) / (shaped.std() + 1e-6)
    assert torch.allclose(advantages.values, z, atol=1e-5)
    assert metrics["length_penalty/mean"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["length_penalty/max"] == pytest.approx(0.5) and metrics["length_penalty/min"] == pytest.approx(-0.5)
    plain, _ = AlgorithmPipeline(["grpo"]).compute_advantages(r)
    assert not torch.allclose(plain.values, advantages.values)


def test_recipe_key_and_bad_shaping(tiny_model_dir):
    model = {"name_or_path": tiny_model_dir}
    recipe = build_recipe({"model": model, "algorithm": {"shaping": [{"name": "length_penalty", "coef": 0.1}]}})
    assert [c.name for c in recipe.algorithm_stages.pipeline.shaping] == ["length_penalty"]
    with pytest.raises(ConfigError, match="length_penalty: coef must be >= 0"):
        build_recipe({"model": model, "algorithm": {"shaping": [{"name": "length_penalty", "coef": -1}]}})
    with pytest.raises(ConfigError, match="unknown shaping 'length_penalt'.*did you mean 'length_penalty'"):
        build_recipe({"model": model, "algorithm": {"shaping": ["length_penalt"]}})

    @register_shaping("test_wrong_shape")
    def wrong_shape(rollouts):
        return torch.zeros(3)

    with pytest.raises(StageError, match=r"shaping 'test_wrong_shape' .*returned torch.float32 of shape \[3\]; "
                                         r"expected a float tensor \[N\] = \[4\]"):
        AlgorithmPipeline(["grpo"], shaping=["test_wrong_shape"]).dry_run()

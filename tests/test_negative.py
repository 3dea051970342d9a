"""PSR / NSR / W-REINFORCE (docs/algorithms/reference.md §1; Zhu et al. 2025, arXiv 2506.01347)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests import factories

from rltk.algos import AlgorithmPipeline, StageError, get_stage
from rltk.algos.negative import nsr, psr, w_reinforce
from rltk.algos.types import Rollouts

TOL = 1e-6


def make_rollouts(rewards, lengths, **kwargs):
    return factories.make_rollouts(rewards, lengths, dtype=torch.float32, **kwargs)


def step(pipeline: AlgorithmPipeline, rollouts: Rollouts, logps: torch.Tensor):
    """One optimizer step the way the trainer runs it: kept mask, step normaliser, aggregate."""
    adv, metrics = pipeline.compute_advantages(rollouts)
    mask = rollouts.completion_mask * adv.kept().unsqueeze(-1)
    normalizer = pipeline.normalizer(mask, mask.shape[1])
    per_token, _ = pipeline.per_token_loss(logps, rollouts, adv)
    return pipeline.aggregate(per_token, mask, normalizer), adv, metrics


def spec_rollouts():
    """The §1 vector: rewards [1,0,0,1], T = [3,2,4,1]."""
    return make_rollouts([1.0, 0.0, 0.0, 1.0], [3, 2, 4, 1])


def leaf_logps(rollouts, value=None):
    shape = rollouts.completion_mask.shape
    base = torch.full(shape, value) if value is not None else -torch.rand(shape, generator=torch.Generator().manual_seed(0))
    return base.clone().requires_grad_(True)


# ---------------------------------------------------------------- §1 vectors


def test_w_reinforce_vector_loss_and_gradient_ppo_on_policy():
    rollouts = spec_rollouts()
    pipe = AlgorithmPipeline([{"name": "w_reinforce"}], loss="ppo_clip", aggregation="token_mean")
    logps = leaf_logps(rollouts)
    loss, adv, _ = step(pipe, rollouts, logps)
    assert torch.allclose(adv.values, torch.tensor([0.1, -1.0, -1.0, 0.1]))
    assert adv.keep is None
    assert loss.item() == pytest.approx(0.56, abs=TOL)
    loss.backward()
    expected = torch.tensor([0.1, -1.0, -1.0, 0.1]).unsqueeze(-1) * -0.1 * rollouts.completion_mask
    assert torch.allclose(logps.grad, expected, atol=TOL)
    assert logps.grad[0, 0].item() == pytest.approx(-0.01, abs=TOL)
    assert logps.grad[1, 0].item() == pytest.approx(0.1, abs=TOL)


def test_w_reinforce_vector_reinforce_loss():
    """−A·logp at logp = 1 is the ρ = 1 surrogate value; its gradient is −A/10 at any logp."""
    rollouts = spec_rollouts()
    pipe = AlgorithmPipeline([{"name": "w_reinforce", "lam": 0.1}], loss="reinforce", aggregation="token_mean")
    loss, _, _ = step(pipe, rollouts, leaf_logps(rollouts, 1.0))
    assert loss.item() == pytest.approx(0.56, abs=TOL)
    logps = leaf_logps(rollouts)
    loss, _, _ = step(pipe, rollouts, logps)
    loss.backward()
    mask = rollouts.completion_mask
    correct, wrong = rollouts.correct.unsqueeze(-1) & (mask > 0), ~rollouts.correct.unsqueeze(-1) & (mask > 0)
    assert torch.allclose(logps.grad[correct], torch.full((4,), -0.01), atol=TOL)
    assert torch.allclose(logps.grad[wrong], torch.full((6,), 0.1), atol=TOL)
    assert torch.all(logps.grad[mask == 0] == 0)


@pytest.mark.parametrize("name, expected_loss, kept", [("psr", -1.0, [True, False, False, True]), ("nsr", 1.0, [False, True, True, False])])
def test_psr_nsr_vectors(name, expected_loss, kept):
    rollouts = spec_rollouts()
    pipe = AlgorithmPipeline([name], loss="ppo_clip", aggregation="token_mean")
    logps = leaf_logps(rollouts)
    loss, adv, metrics = step(pipe, rollouts, logps)
    assert adv.keep.tolist() == kept
    assert loss.item() == pytest.approx(expected_loss, abs=TOL)
    assert metrics[f"{name}/kept_share"] == pytest.approx(0.5)
    # gradient: −A / (kept tokens) on kept tokens, nothing on dropped completions
    loss.backward()
    tokens = 4 if name == "psr" else 6
    sign = 1.0 if name == "psr" else -1.0
    keep = torch.tensor(kept).unsqueeze(-1) * rollouts.completion_mask
    assert torch.allclose(logps.grad, -sign / tokens * keep, atol=TOL)


def test_drop_false_zeroes_instead_and_changes_token_mean():
    rollouts = spec_rollouts()
    pipe = AlgorithmPipeline([{"name": "nsr", "drop": False}], loss="ppo_clip")
    loss, adv, metrics = step(pipe, rollouts, leaf_logps(rollouts))
    assert adv.keep is None
    assert adv.values.tolist() == [0.0, -1.0, -1.0, 0.0]
    assert loss.item() == pytest.approx(6 / 10, abs=TOL)  # zeroed rows still count in the normaliser
    assert metrics["nsr/kept_share"] == 1.0
    assert psr(rollouts, drop=False).values.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_all_wrong_group_still_penalised():
    rollouts = make_rollouts([0.0] * 4, [3, 2, 4, 1])
    assert nsr(rollouts).values.tolist() == [-1.0] * 4
    assert nsr(rollouts).keep.tolist() == [True] * 4
    assert w_reinforce(rollouts).values.tolist() == [-1.0] * 4
    assert get_stage("advantage", "grpo").fn(rollouts).values.tolist() == [0.0] * 4
    assert psr(rollouts).keep.tolist() == [False] * 4


def test_all_correct_group():
    rollouts = make_rollouts([1.0] * 4, [3, 2, 4, 1])
    assert w_reinforce(rollouts, lam=0.5).values.tolist() == [0.5] * 4
    out = nsr(rollouts)
    assert out.keep.tolist() == [False] * 4 and out.metrics["kept_share"] == 0.0
    assert psr(rollouts).values.tolist() == [1.0] * 4


def test_group_of_one_keeps_its_sign():
    """No baseline, so a lone completion is not zeroed (unlike grpo)."""
    rollouts = make_rollouts([1.0, 0.0, 1.0], [2, 2, 2], group_ids=[0, 1, 2])
    assert torch.allclose(w_reinforce(rollouts).values, torch.tensor([0.1, -1.0, 0.1]))
    assert nsr(rollouts).values.tolist() == [0.0, -1.0, 0.0]


def test_correctness_not_rewards_sets_the_sign():
    shaped = make_rollouts([0.9, 0.2, -0.5, 1.3], [3, 2, 4, 1], correct=[True, False, False, True])
    assert torch.allclose(w_reinforce(shaped).values, torch.tensor([0.1, -1.0, -1.0, 0.1]))
    assert psr(shaped).keep.tolist() == [True, False, False, True]
    # a positive shaped reward on a wrong answer is still negative reinforcement
    odd = make_rollouts([1.0, 1.0], [1, 1], correct=[False, True])
    assert nsr(odd).values.tolist() == [-1.0, 0.0]


def test_empty_completion_adds_no_tokens():
    base = spec_rollouts()
    with_empty = make_rollouts([1.0, 0.0, 0.0, 1.0, 0.0], [3, 2, 4, 1, 0])
    pipe = AlgorithmPipeline(["w_reinforce"], loss="ppo_clip")
    loss_base, _, _ = step(pipe, base, leaf_logps(base))
    loss_empty, adv, _ = step(pipe, with_empty, leaf_logps(with_empty))
    assert adv.values[-1].item() == -1.0
    assert loss_empty.item() == pytest.approx(loss_base.item(), abs=TOL)


def test_truncated_completion_is_judged_by_correctness_and_droppable():
    rollouts = make_rollouts([1.0, 0.0, 0.0, 1.0], [3, 2, 4, 1], truncated=[False, False, True, False])
    assert nsr(rollouts).keep.tolist() == [False, True, True, False]
    pipe = AlgorithmPipeline(["nsr", "mask_truncated"], loss="ppo_clip")
    loss, adv, _ = step(pipe, rollouts, leaf_logps(rollouts))
    assert adv.keep.tolist() == [False, True, False, False]
    assert loss.item() == pytest.approx(1.0, abs=TOL)  # only the 2 tokens of completion 1


def test_seq_mean_token_mean_gradient_matches_analytic():
    rollouts = spec_rollouts()
    pipe = AlgorithmPipeline([{"name": "w_reinforce", "lam": 0.25}], loss="reinforce", aggregation="seq_mean_token_mean")
    logps = leaf_logps(rollouts)
    loss, adv, _ = step(pipe, rollouts, logps)
    loss.backward()
    lengths = rollouts.lengths.unsqueeze(-1)
    expected = -adv.values.unsqueeze(-1) / lengths / 4 * rollouts.completion_mask
    assert torch.allclose(logps.grad, expected, atol=TOL)


def test_advantages_are_detached_and_keep_dtype():
    rollouts = make_rollouts([1.0, 0.0], [1, 1])
    rollouts = replace(rollouts, rewards=rollouts.rewards.double())
    for out in (psr(rollouts), nsr(rollouts), w_reinforce(rollouts)):
        assert out.values.dtype == torch.float64 and not out.values.requires_grad


def test_parameter_errors_are_one_line():
    rollouts = spec_rollouts()
    for call in (lambda: psr(rollouts, drop="yes"), lambda: nsr(rollouts, drop=1), lambda: w_reinforce(rollouts, lam=-0.1),
                 lambda: w_reinforce(rollouts, lam=float("nan")), lambda: w_reinforce(rollouts, lam="0.1")):
        with pytest.raises(StageError) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(StageError, match="did you mean 'lam'"):
        AlgorithmPipeline([{"name": "w_reinforce", "lambda": 0.1}])
    with pytest.raises(StageError, match="did you mean 'drop'"):
        AlgorithmPipeline([{"name": "nsr", "dorp": True}])


def test_registered_and_need_nothing_extra():
    pipe = AlgorithmPipeline(["w_reinforce"], loss="ppo_clip")
    assert pipe.needs() == set()
    for name in ("psr", "nsr", "w_reinforce"):
        assert get_stage("advantage", name).needs({}) == set()

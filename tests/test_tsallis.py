"""GARL and PAFT on the Tsallis loss continuum (docs/algorithms/reference.md §5; Lin & Ie 2026, arXiv 2604.25907)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from rltk.algos import AlgorithmPipeline, StageError, get_stage
from rltk.algos.estimators import rloo
from rltk.algos.tsallis import (
    garl,
    garl_pathwise_weights,
    paft,
    paft_draw,
    paft_group_weight,
    seq_mean_token_sum,
)
from rltk.algos.types import Advantages, Rollouts

TOL = 1e-4


def make_rollouts(weights, group_size=4, lengths=None, answer_logps=None, rewards=None, step=0):
    """Binary weights → correctness; fractional → rewards (use ``weights='reward'``)."""
    w = torch.tensor(weights, dtype=torch.float32)
    n = w.shape[0]
    lengths = lengths or [3] * n
    mask = (torch.arange(max(lengths)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()
    return Rollouts(
        group_ids=torch.arange(n) // group_size,
        rewards=torch.tensor(rewards, dtype=torch.float32) if rewards is not None else w,
        correct=w > 0.5,
        completion_mask=mask,
        truncated=torch.zeros(n, dtype=torch.bool),
        answer_logps=answer_logps,
        step=step,
    )


def likelihood_rollouts(weights, **kw):
    answer_logps = torch.tensor(weights, dtype=torch.float64).log().float()
    return make_rollouts([0.0] * len(weights), answer_logps=answer_logps, **kw)


def close(actual, want, tol=TOL):
    return torch.allclose(actual.double(), torch.tensor(want, dtype=torch.float64), atol=tol)


# ---------------------------------------------------------------- §5 vectors


def test_one_success_vector_and_amplification():
    adv = garl(make_rollouts([1, 0, 0, 0]))
    assert close(adv.values, [1.0, -0.268642, -0.268642, -0.268642])
    assert adv.metrics["amplification"] == pytest.approx(2.828427, abs=TOL)
    assert adv.metrics["max_advantage"] == pytest.approx(1.0, abs=TOL)
    assert adv.metrics["zero_weight_groups"] == 0.0


def test_two_successes_vector():
    adv = garl(make_rollouts([1, 1, 0, 0]))
    assert close(adv.values, [0.325961, 0.325961, -0.319472, -0.319472])


def test_fractional_weights_vector_binary_reward_mode():
    adv = garl(make_rollouts([0.6, 0.2, 0.1, 0.1]), weights="reward")
    assert close(adv.values, [0.386356, -0.054066, -0.161659, -0.161659])


def test_fractional_weights_vector_likelihood_mode():
    adv = garl(likelihood_rollouts([0.6, 0.2, 0.1, 0.1]), mode="likelihood")
    assert close(adv.values, [0.386356, -0.054066, -0.161659, -0.161659])


def test_q0_is_rloo_and_q1_vector():
    rollouts = make_rollouts([1, 0, 0, 0])
    q0 = garl(rollouts, q=0.0)
    assert close(q0.values, [1.0, -1 / 3, -1 / 3, -1 / 3])
    assert torch.allclose(q0.values, rloo(rollouts).values, atol=1e-6)
    assert close(garl(rollouts, q=1.0).values, [0.75, -0.25, -0.25, -0.25])


def test_paft_group_weights():
    weights = paft_group_weight(torch.tensor([0.25, 0.5]), torch.tensor([4.0, 4.0]), 0.75)
    assert close(weights, [0.25, 0.297302])


# ---------------------------------------------------------------- GARL edge cases


def test_all_zero_group_is_zero_and_counted():
    adv = garl(make_rollouts([0, 0, 0, 0, 1, 0, 0, 0]))
    assert torch.equal(adv.values[:4], torch.zeros(4))
    assert close(adv.values[4:], [1.0, -0.268642, -0.268642, -0.268642])
    assert adv.metrics["zero_weight_groups"] == 0.5
    assert adv.metrics["amplification"] == pytest.approx(2.828427, abs=TOL)  # finite groups only


def test_batch_of_only_zero_groups_has_no_amplification():
    adv = garl(make_rollouts([0, 0, 0, 0]))
    assert torch.equal(adv.values, torch.zeros(4))
    assert "amplification" not in adv.metrics
    assert adv.metrics["zero_weight_groups"] == 1.0
    assert all(math.isfinite(v) for v in adv.metrics.values())


def test_all_correct_group_is_zero():
    assert torch.allclose(garl(make_rollouts([1, 1, 1, 1])).values, torch.zeros(4), atol=1e-6)


def test_group_size_one_is_zero():
    adv = garl(make_rollouts([1, 0], group_size=1))
    assert torch.equal(adv.values, torch.zeros(2))


def test_reward_weights_are_clipped_to_unit_interval():
    clipped = garl(make_rollouts([0, 0, 0, 0], rewards=[1.5, -0.2, 0.6, 0.2]), weights="reward")
    direct = garl(make_rollouts([0, 0, 0, 0], rewards=[1.0, 0.0, 0.6, 0.2]), weights="reward")
    assert torch.allclose(clipped.values, direct.values)


def test_likelihood_mode_escapes_cold_start():
    """No completion is correct, but the gold answer is likelier after some rationales."""
    rollouts = likelihood_rollouts([1e-6, 4e-6, 1e-6, 1e-6])
    assert torch.equal(garl(rollouts).values, torch.zeros(4))  # binary: stuck
    adv = garl(rollouts, mode="likelihood")
    assert adv.values[1] > 0 and (adv.values[[0, 2, 3]] < 0).all()
    assert math.isfinite(adv.metrics["amplification"]) and adv.metrics["amplification"] > 1e3


def test_likelihood_mode_pathwise_weights():
    w = [0.6, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.3]
    rollouts = likelihood_rollouts(w)
    adv = garl(rollouts, mode="likelihood")
    assert isinstance(adv, Advantages) and adv.answer_sft_weights is not None
    wt = torch.tensor(w, dtype=torch.float64).view(2, 4)
    want = (wt / (wt.mean(-1, keepdim=True) ** 0.75 * 4**0.75)).flatten()
    assert torch.allclose(adv.answer_sft_weights.double(), want, atol=1e-6)
    assert torch.allclose(garl_pathwise_weights(rollouts), adv.answer_sft_weights)
    assert not adv.answer_sft_weights.requires_grad
    # a filter that uses dataclasses.replace keeps them
    kept = replace(adv, keep=torch.ones(8, dtype=torch.bool))
    assert kept.answer_sft_weights is adv.answer_sft_weights


def test_binary_mode_has_no_pathwise_weights():
    assert garl(make_rollouts([1, 0, 0, 0])).answer_sft_weights is None


def test_advantages_are_detached_float32():
    rollouts = replace(make_rollouts([1, 0, 0, 0]), rewards=torch.tensor([1.0, 0, 0, 0], requires_grad=True))
    adv = garl(rollouts, weights="reward")
    assert not adv.values.requires_grad and adv.values.dtype == torch.float32


def test_bad_parameters_are_clear_errors():
    rollouts = make_rollouts([1, 0, 0, 0])
    with pytest.raises(StageError, match=r"q must be in \[0, 1\]"):
        garl(rollouts, q=1.5)
    with pytest.raises(StageError, match="mode must be binary or likelihood"):
        garl(rollouts, mode="soft")
    with pytest.raises(StageError, match="weights must be correct or reward"):
        garl(rollouts, weights="score")
    with pytest.raises(StageError, match="needs rollouts.answer_logps"):
        garl(rollouts, mode="likelihood")
    with pytest.raises(StageError, match="needs rollouts.answer_logps"):
        paft(torch.zeros(4, 3), rollouts, Advantages(torch.zeros(4)), mode="likelihood")


def test_needs_depend_on_mode():
    for kind, name in (("advantage", "garl"), ("loss", "paft")):
        stage = get_stage(kind, name)
        assert stage.needs({}) == set()
        assert stage.needs({"mode": "binary"}) == set()
        assert stage.needs({"mode": "likelihood"}) == {"answer_logps"}


def test_garl_gradient_through_reinforce_loss():
    """reinforce loss + seq_mean_token_sum: ∂L/∂logp = −A_m / N on every completion token."""
    rollouts = make_rollouts([1, 0, 0, 0, 1, 1, 0, 0], lengths=[3, 2, 4, 1, 2, 3, 1, 4])
    pipe = AlgorithmPipeline([{"name": "garl"}], loss="reinforce", aggregation="seq_mean_token_sum")
    adv, metrics = pipe.compute_advantages(rollouts)
    assert metrics["garl/amplification"] == pytest.approx((2.828427 + 0.5**-0.75) / 2, abs=TOL)
    mask = rollouts.completion_mask
    logps = (-torch.rand(mask.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    per_token, _ = pipe.per_token_loss(logps, rollouts, adv)
    pipe.aggregate(per_token, mask, pipe.normalizer(mask, mask.shape[1])).backward()
    assert torch.allclose(logps.grad, -adv.values.unsqueeze(-1) * mask / 8, atol=1e-7)


# ---------------------------------------------------------------- PAFT


def test_paft_deterministic_single_success():
    """w = [1,0,0,0]: every draw is completion 0, K = 4; coefficient 4·0.25 = 1."""
    rollouts = make_rollouts([1, 0, 0, 0])
    draw = paft_draw(rollouts)
    assert torch.equal(draw.counts, torch.tensor([4, 0, 0, 0]))
    assert close(draw.coef, [1.0, 0.0, 0.0, 0.0], tol=1e-6)
    assert draw.skipped_groups == 0 and draw.num_groups == 1


def test_paft_counts_sum_to_group_size_and_skip_zero_groups():
    rollouts = make_rollouts([1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    draw = paft_draw(rollouts, seed=3)
    assert draw.counts.view(3, 4).sum(-1).tolist() == [4, 0, 4]
    assert (draw.counts[[2, 3, 8]] == 0).all()  # zero-weight completions are never drawn
    assert draw.skipped.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert draw.skipped_groups == 1
    assert torch.equal(draw.coef[4:8], torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(draw.coef[:4], draw.counts[:4].double() * 0.297302, atol=1e-5)


def test_paft_loss_value_gradient_and_metrics():
    """Under seq_mean_token_sum the step loss is mean_prompts −weight·(1/K)·Σ_k seq-logp."""
    rollouts = make_rollouts([1, 1, 0, 0, 0, 0, 0, 0], lengths=[3, 2, 4, 1, 2, 3, 1, 4], step=7)
    draw = paft_draw(rollouts, seed=11)
    mask = rollouts.completion_mask
    logps = (-torch.rand(mask.shape, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    out = paft(logps, rollouts, Advantages(torch.zeros(8)), seed=11)
    loss = seq_mean_token_sum(out.per_token, mask, float((mask.sum(-1) > 0).sum()))
    loss.backward()
    seq = (logps.detach() * mask).sum(-1).double()
    prompt0 = -0.297302 * (draw.counts[:4].double() * seq[:4]).sum() / 4  # K = M = 4
    assert loss.item() == pytest.approx(float(prompt0 + 0.0) / 2, abs=1e-5)  # prompt 1 skipped
    assert torch.allclose(logps.grad, -draw.coef.float().unsqueeze(-1) * mask / 8, atol=1e-7)
    assert torch.equal(out.token_metrics["skipped_group"][:, 0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert torch.equal(out.token_metrics["sampled"][:, 0], (draw.counts > 0).float())


def test_paft_draw_is_deterministic_and_fresh_per_step_and_seed():
    rollouts = make_rollouts([1, 1, 1, 0] * 16)
    first = paft_draw(rollouts, seed=5).counts
    assert torch.equal(first, paft_draw(rollouts, seed=5).counts)
    assert not torch.equal(first, paft_draw(rollouts, seed=6).counts)
    stepped = replace(rollouts, step=1)
    assert not torch.equal(first, paft_draw(stepped, seed=5).counts)
    assert torch.equal(first, paft_draw(replace(rollouts, step=0), seed=5).counts)


def test_paft_draw_is_micro_batch_invariant():
    """The draw depends on (seed, step, group id, weights) only: splitting the step changes nothing."""
    rollouts = make_rollouts([1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0], step=3)
    whole = paft_draw(rollouts, seed=1).counts
    halves = [paft_draw(rollouts.select(torch.arange(i, i + 8)), seed=1).counts for i in (0, 8)]
    assert torch.equal(whole, torch.cat(halves))


def test_paft_bad_step_is_a_clear_error():
    rollouts = make_rollouts([1, 0, 0, 0], step="three")
    with pytest.raises(StageError, match=r"rollouts.step must be an int"):
        paft_draw(rollouts)


@pytest.mark.parametrize("w", [[0.6, 0.2, 0.1, 0.1], [1.0, 1.0, 0.0, 0.0]])
def test_paft_expectation_matches_garl_score_weights(w):
    """E[count_m/K] = w_m/Σw, so E[coef_m] = w_m/(w̄^q·M^q), the weight of GARL's score term
    (= A_m + (w̄_¬m)^{1−q}/M^q): PAFT and GARL have the same expected gradient."""
    groups, seeds = 400, 10  # 4000 independent draws per completion
    rollouts = likelihood_rollouts(w * groups)
    mean_coef = torch.zeros(4, dtype=torch.float64)
    mean_frac = torch.zeros(4, dtype=torch.float64)
    for seed in range(seeds):
        draw = paft_draw(rollouts, mode="likelihood", seed=seed)
        mean_coef += draw.coef.view(groups, 4).mean(0) / seeds
        mean_frac += draw.counts.view(groups, 4).double().mean(0) / 4 / seeds
    wt = torch.tensor(w, dtype=torch.float64)
    assert torch.allclose(mean_frac, wt / wt.sum(), atol=0.02)
    analytic = garl_pathwise_weights(likelihood_rollouts(w)).double()
    assert torch.allclose(mean_coef, analytic, atol=0.03)
    adv = garl(likelihood_rollouts(w), mode="likelihood").values.double()
    loo = ((wt.sum() - wt) / 3) ** 0.25 / 4**0.75
    assert torch.allclose(analytic, adv + loo, atol=1e-5)


def test_paft_group_size_one():
    draw = paft_draw(likelihood_rollouts([0.25, 0.0], group_size=1), mode="likelihood")
    assert draw.counts.tolist() == [1, 0]
    assert draw.coef[0].item() == pytest.approx(0.25**0.25, abs=1e-6)
    assert draw.skipped_groups == 1


def test_paft_in_a_pipeline():
    pipe = AlgorithmPipeline(
        [{"name": "garl", "mode": "likelihood"}], loss={"name": "paft", "mode": "likelihood", "seed": 4},
        aggregation="seq_mean_token_sum",
    )
    assert pipe.needs() == {"answer_logps"}
    rollouts = likelihood_rollouts([0.6, 0.2, 0.1, 0.1])
    adv, _ = pipe.compute_advantages(rollouts)
    logps = torch.full((4, 3), -0.5, requires_grad=True)
    per_token, token_metrics = pipe.per_token_loss(logps, rollouts, adv)
    assert set(token_metrics) == {"paft/skipped_group", "paft/sampled", "paft/coef"}
    mask = rollouts.completion_mask
    loss = pipe.aggregate(per_token, mask, pipe.normalizer(mask, 3))
    weight = 0.25**0.25 / 4**0.75
    assert loss.item() == pytest.approx(-weight * (-1.5), abs=1e-6)  # every drawn seq-logp is −1.5


def test_seq_mean_token_sum_is_micro_batch_invariant():
    stage = get_stage("aggregation", "seq_mean_token_sum")
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(8, 5, generator=gen)
    mask = (torch.rand(8, 5, generator=gen) > 0.3).float()
    mask[3] = 0  # an empty completion is not a sequence
    normalizer = stage.normalizer(mask, 5)
    assert normalizer == 7.0
    whole = stage.fn(loss, mask, normalizer)
    for parts in (2, 8):
        chunks = zip(loss.chunk(parts), mask.chunk(parts))
        assert sum(stage.fn(l, m, normalizer) for l, m in chunks).item() == pytest.approx(whole.item(), abs=1e-6)
    assert whole.item() == pytest.approx(float((loss * mask).sum() / 7), abs=1e-6)

"""Weighted GRPO with positive–negative pairing (docs/algorithms/reference.md §4b; Sheng et al. 2026, arXiv 2602.03452)."""
from __future__ import annotations

import pytest
import torch

from rltk.algos import AlgorithmPipeline, StageError, get_stage
from rltk.algos.estimators import grpo
from rltk.algos.types import Rollouts
from rltk.algos.weighted import weighted_grpo

TOL = 1e-4  # docs/algorithms/reference.md: vectors hold to 1e-4 (eps moves the sixth digit)

POS = [1, 0, 0, 0, 0, 0, 0, 0]  # q⁺: one rare success
NEG = [1, 1, 1, 1, 1, 1, 1, 0]  # q⁻: one rare failure


def make_rollouts(outcomes_per_group, roles=("pos", "neg"), rewards=None, lengths=None):
    """Groups of verifier outcomes in order; ``roles`` per group (or None)."""
    correct = torch.tensor([bool(o) for group in outcomes_per_group for o in group])
    group_ids = torch.tensor([g for g, group in enumerate(outcomes_per_group) for _ in group])
    n = correct.shape[0]
    lengths = lengths or [3] * n
    width = max(lengths)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()
    return Rollouts(
        group_ids=group_ids,
        rewards=torch.tensor(rewards, dtype=torch.float32) if rewards is not None else correct.float(),
        correct=correct,
        completion_mask=mask,
        truncated=torch.zeros(n, dtype=torch.bool),
        roles=tuple(roles) if roles is not None else None,
    )


def spec_rollouts():
    return make_rollouts([POS, NEG])


def expected(pos_success, pos_failure, neg_success, neg_failure):
    return torch.tensor(
        [pos_success] + [pos_failure] * 7 + [neg_success] * 7 + [neg_failure], dtype=torch.float32
    )


# ---------------------------------------------------------------- §4 vectors


def test_plain_grpo_per_prompt_vector():
    adv = weighted_grpo(spec_rollouts(), scope="prompt")
    assert torch.allclose(adv.values, expected(2.474874, -0.353553, 0.353553, -2.474874), atol=TOL)
    # identical to the base estimator on the outcomes
    assert torch.allclose(adv.values, grpo(spec_rollouts()).values, atol=1e-6)


def test_pair_scope_lambda_1_vector():
    adv = weighted_grpo(spec_rollouts())
    assert torch.allclose(adv.values, expected(2.73861, 0.0, 0.0, -2.73861), atol=TOL)


def test_pair_scope_lambda_2_vector():
    """Revised §4b (uncentred): the common outcomes stay exactly 0 at λ = 2 too."""
    adv = weighted_grpo(spec_rollouts(), lam=2.0)
    assert torch.allclose(adv.values, expected(1.742976, 0.0, 0.0, -3.485951), atol=TOL)
    assert torch.equal(adv.values[1:15], torch.zeros(14))


def test_pair_scope_both_prompts_all_wrong():
    """§4b: G = 4, λ = 1, both prompts fail everywhere: q⁺ 0, q⁻ failures −1.870825 each.

    The first (centred) reading gave each q⁺ failure +0.935 here."""
    adv = weighted_grpo(make_rollouts([[0] * 4, [0] * 4]))
    want = torch.tensor([0.0] * 4 + [-1.870825] * 4)
    assert torch.allclose(adv.values, want, atol=TOL)
    assert torch.equal(adv.values[:4], torch.zeros(4))


def test_pair_scope_both_prompts_all_right():
    """§4b: G = 4, λ = 1, both prompts succeed everywhere: q⁺ successes +1.870825 each, q⁻ 0."""
    adv = weighted_grpo(make_rollouts([[1] * 4, [1] * 4]))
    want = torch.tensor([1.870825] * 4 + [0.0] * 4)
    assert torch.allclose(adv.values, want, atol=TOL)
    assert torch.equal(adv.values[4:], torch.zeros(4))


def test_pair_scope_lambda_0_is_positive_only():
    adv = weighted_grpo(spec_rollouts(), lam=0.0)
    assert adv.values[0] > 0
    assert torch.allclose(adv.values[1:], adv.values[1:2].expand(15))  # every other completion equal


# ---------------------------------------------------------------- scope=prompt multipliers


def test_prompt_scope_multipliers_by_role_and_outcome():
    adv = weighted_grpo(
        spec_rollouts(), scope="prompt", pos_success=2.0, pos_failure=0.5, neg_success=0.25, neg_failure=3.0
    )
    want = expected(2.474874 * 2.0, -0.353553 * 0.5, 0.353553 * 0.25, -2.474874 * 3.0)
    assert torch.allclose(adv.values, want, atol=TOL)


def test_prompt_scope_does_not_need_pairs():
    rollouts = make_rollouts([NEG, NEG, POS], roles=("neg", "neg", "pos"))
    adv = weighted_grpo(rollouts, scope="prompt", neg_failure=2.0)
    assert adv.values[7].item() == pytest.approx(-2.474874 * 2.0, abs=TOL)
    assert adv.values[16].item() == pytest.approx(2.474874, abs=TOL)


# ---------------------------------------------------------------- structure and edge cases


def test_pairs_are_independent():
    single = weighted_grpo(spec_rollouts(), lam=2.0).values
    other = [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 1]]  # a different std
    other_single = weighted_grpo(make_rollouts(other), lam=2.0).values
    both = weighted_grpo(make_rollouts([POS, NEG] + other, roles=("pos", "neg") * 2), lam=2.0)
    assert torch.allclose(both.values, torch.cat([single, other_single]), atol=1e-6)


def test_uses_correctness_not_shaped_rewards():
    shaped = [0.9, -0.2, 0.1, 0.0, 0.3, 0.0, 0.0, 0.0] + [0.7] * 7 + [0.2]
    rollouts = make_rollouts([POS, NEG], rewards=shaped)
    assert torch.allclose(weighted_grpo(rollouts).values, weighted_grpo(spec_rollouts()).values)
    prompt = weighted_grpo(rollouts, scope="prompt").values
    assert torch.allclose(prompt, expected(2.474874, -0.353553, 0.353553, -2.474874), atol=TOL)


def test_uninformative_pair_is_zero():
    """q⁺ all fail and q⁻ all succeed: every role outcome is 0, std 0 — advantage 0, no NaN."""
    for lam in (0.0, 1.0, 2.0):
        adv = weighted_grpo(make_rollouts([[0] * 8, [1] * 8]), lam=lam)
        assert torch.equal(adv.values, torch.zeros(16))
        assert adv.metrics["zero_adv_share"] == 1.0
    adv = weighted_grpo(make_rollouts([[0] * 8, [0] * 8]), lam=0.0)  # λ = 0: q⁻ failures are 0 too
    assert torch.equal(adv.values, torch.zeros(16))


def test_all_correct_and_all_wrong_pairs():
    adv = weighted_grpo(make_rollouts([[1] * 4, [0] * 4]))  # pos all succeed, neg all fail: ±1 split
    assert torch.allclose(adv.values[:4], adv.values[0].expand(4))
    assert adv.values[0] > 0 and adv.values[4] < 0
    assert adv.values.sum().abs() < 1e-5


def test_group_size_one():
    rollouts = make_rollouts([[1], [0]])
    pair = weighted_grpo(rollouts)  # the pair still has 2 completions to take the std over
    assert torch.allclose(pair.values, torch.tensor([0.707107, -0.707107]), atol=TOL)
    assert torch.equal(weighted_grpo(rollouts, scope="prompt").values, torch.zeros(2))


def test_unequal_group_sizes_in_a_pair():
    adv = weighted_grpo(make_rollouts([[1, 0], [1, 1, 0]]))
    values = torch.tensor([1.0, 0.0, 0.0, 0.0, -1.0], dtype=torch.float64)
    want = values / (values.std() + 1e-6)  # uncentred (revised §4b)
    assert torch.allclose(adv.values, want.float(), atol=1e-6)


def test_metrics():
    adv = weighted_grpo(spec_rollouts())
    m = adv.metrics
    assert m["pos_groups"] == 1.0 and m["neg_groups"] == 1.0
    assert m["pos_success_rate"] == pytest.approx(1 / 8)
    assert m["neg_success_rate"] == pytest.approx(7 / 8)
    assert m["zero_adv_share"] == pytest.approx(14 / 16)
    assert all(isinstance(v, float) for v in m.values())


def test_detached_and_dtype():
    adv = weighted_grpo(spec_rollouts())
    assert not adv.values.requires_grad
    assert adv.values.dtype == torch.float32
    assert adv.values.shape == (16,)


# ---------------------------------------------------------------- role validation


def test_roles_missing_is_a_clear_error():
    with pytest.raises(StageError, match="needs per-group roles"):
        weighted_grpo(make_rollouts([POS, NEG], roles=None))
    with pytest.raises(StageError, match="needs per-group roles"):
        weighted_grpo(make_rollouts([POS, NEG], roles=None), scope="prompt")


@pytest.mark.parametrize(
    "groups, roles, message",
    [
        ([POS, NEG], ("pos",), "1 entries for 2 groups"),
        ([POS, NEG], ("pos", "maybe"), "group 1 has role 'maybe'"),
        ([POS, NEG], ("neg", "pos"), "groups 0 and 1 have roles 'neg', 'pos'"),
        ([POS, NEG, POS], ("pos", "neg", "pos"), "3 groups cannot form"),
        ([POS, POS, NEG, NEG], ("pos", "pos", "neg", "neg"), "groups 0 and 1"),
    ],
)
def test_bad_roles_are_clear_errors(groups, roles, message):
    with pytest.raises(StageError, match=message):
        weighted_grpo(make_rollouts(groups, roles=roles))


def test_bad_params():
    with pytest.raises(StageError, match="scope must be pair or prompt"):
        weighted_grpo(spec_rollouts(), scope="batch")
    with pytest.raises(StageError, match="lam must be >= 0"):
        weighted_grpo(spec_rollouts(), lam=-1.0)


# ---------------------------------------------------------------- registry and pipeline


def test_registered_with_roles_need():
    stage = get_stage("advantage", "weighted_grpo")
    assert stage.fn is weighted_grpo
    assert stage.needs({}) == {"roles"}
    assert {"scope", "lam", "pos_success", "pos_failure", "neg_success", "neg_failure"} <= set(stage.parameters())


def test_pipeline_gradient_is_minus_advantage_over_tokens():
    """reinforce loss + token_mean: ∂L/∂logp = −A_i / Σ tokens on every completion token."""
    lengths = [3, 2, 4, 1, 2, 2, 3, 1] + [2, 1, 3, 2, 4, 1, 1, 2]
    rollouts = make_rollouts([POS, NEG], lengths=lengths)
    pipe = AlgorithmPipeline([{"name": "weighted_grpo", "lam": 2.0}], loss="reinforce", aggregation="token_mean")
    assert pipe.needs() == {"roles"}
    adv, metrics = pipe.compute_advantages(rollouts)
    assert "weighted_grpo/pos_success_rate" in metrics
    mask = rollouts.completion_mask
    logps = (-torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    per_token, _ = pipe.per_token_loss(logps, rollouts, adv)
    loss = pipe.aggregate(per_token, mask, pipe.normalizer(mask, mask.shape[1]))
    loss.backward()
    want = -adv.values.unsqueeze(-1) * mask / mask.sum()
    assert torch.allclose(logps.grad, want, atol=1e-7)


# ---------------------------------------------------------------- sign property (revised §4b)


def all_outcome_pairs(g: int) -> torch.Tensor:
    """Bool [4**g, 2g]: every (q⁺ outcomes, q⁻ outcomes) combination of one pair of G = g."""
    bits = (torch.arange(2**g).unsqueeze(1) >> torch.arange(g)) & 1  # [2**g, g]
    pos = bits.repeat_interleave(2**g, dim=0)
    neg = bits.repeat(2**g, 1)
    return torch.cat([pos, neg], dim=1).bool()


@pytest.mark.parametrize("lam", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("g", [2, 4, 8])
def test_sign_property_over_every_pair_of_outcome_vectors(g, lam):
    """A success never gets a negative advantage and a failure never a positive one, for all
    2^G × 2^G pairs (65,536 at G = 8), through the estimator: every pair is one batch."""
    pairs = all_outcome_pairs(g)  # [P, 2g]
    num_pairs = pairs.shape[0]
    correct = pairs.reshape(-1)
    n = correct.shape[0]
    rollouts = Rollouts(
        group_ids=torch.arange(2 * num_pairs).repeat_interleave(g),
        rewards=correct.float(),
        correct=correct,
        completion_mask=torch.ones(n, 1),
        truncated=torch.zeros(n, dtype=torch.bool),
        roles=("pos", "neg") * num_pairs,
    )
    values = weighted_grpo(rollouts, lam=lam).values
    assert bool(torch.isfinite(values).all())
    assert not bool((values[correct] < 0).any())
    assert not bool((values[~correct] > 0).any())
    # and exactly: q⁺ failures and q⁻ successes (outcome 0) get 0
    is_pos = torch.cat([torch.ones(g), torch.zeros(g)]).bool().repeat(num_pairs)
    common = (is_pos & ~correct) | (~is_pos & correct)
    assert torch.equal(values[common], torch.zeros(int(common.sum())))
    # and the value is o / (std + eps) for every row, from the outcome vectors directly
    o = torch.where(is_pos, correct.double(), -lam * (~correct).double()).reshape(num_pairs, 2 * g)
    std = o.std(dim=1, keepdim=True)
    want = torch.where(std > 0, o / (std + 1e-6), torch.zeros_like(o)).reshape(-1)
    assert torch.allclose(values.double(), want, atol=1e-5)

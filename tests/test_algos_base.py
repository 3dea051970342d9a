"""The §0 built-ins of docs/algorithms/reference.md: estimators, losses, aggregations, terms, filters, sampler,
registry errors, and micro-batch invariance of the step loss and gradient."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.factories import make_rollouts

from rltk.algos import AlgorithmPipeline, StageError, get_stage, register_advantage, registered
from rltk.algos.registry import Stage, validate_params
from rltk.algos.types import Advantages, Rollouts

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC_TOL = 1e-4
TOL = 1e-6
F64 = torch.float64


def stage(kind, name):
    return get_stage(kind, name).fn


def adv_of(values):
    return Advantages(torch.tensor(values, dtype=F64))


# ================================================================ §0.1 estimators


def test_grpo_uses_unbiased_std():
    out = stage("advantage", "grpo")(make_rollouts([1.0, 0.0, 0.0, 1.0]))
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025], dtype=F64)
    assert torch.allclose(out.values, expected, atol=SPEC_TOL)
    assert not torch.allclose(out.values.abs(), torch.ones(4, dtype=F64), atol=1e-2)  # population std gives ±1


def test_grpo_all_equal_is_zero_and_counted():
    rollouts = make_rollouts([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0], group_ids=[0] * 4 + [1] * 4)
    out = stage("advantage", "grpo")(rollouts)
    assert out.values[:4].tolist() == [0.0] * 4
    assert out.metrics["zero_variance_groups"] == pytest.approx(0.5)


@pytest.mark.parametrize("a, b", [(2.0, 0.0), (0.5, -3.0), (10.0, 7.0)])
def test_grpo_affine_invariance_for_binary_rewards(a, b):
    grpo = stage("advantage", "grpo")
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    base = grpo(make_rollouts(rewards, group_ids=[0] * 4 + [1] * 4)).values
    moved = grpo(make_rollouts([a * r + b for r in rewards], group_ids=[0] * 4 + [1] * 4)).values
    assert torch.allclose(base, moved, atol=SPEC_TOL)


def test_grpo_scale_batch_and_none():
    grpo = stage("advantage", "grpo")
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    rollouts = make_rollouts(rewards, group_ids=[0] * 4 + [1] * 4)
    r = torch.tensor(rewards, dtype=F64)
    centred = r - torch.tensor([0.5] * 4 + [0.75] * 4, dtype=F64)
    batch = grpo(rollouts, scale="batch").values
    assert torch.allclose(batch, centred / (r.std() + 1e-6), atol=1e-9)
    assert torch.allclose(grpo(rollouts, scale="none").values, centred, atol=1e-12)
    assert torch.allclose(stage("advantage", "dr_grpo")(rollouts).values, centred, atol=1e-12)
    with pytest.raises(StageError, match="scale"):
        grpo(rollouts, scale="global")


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_of_one_is_zero(name):
    rollouts = make_rollouts([1.0, 0.0, 1.0, 0.0, 0.0], group_ids=[0, 1, 1, 2, 3])
    values = stage("advantage", name)(rollouts).values
    assert values[0] == 0 and values[3] == 0 and values[4] == 0
    assert values[1] < 0 < values[2]


def test_grpo_batch_scale_group_of_one_and_detached():
    rollouts = make_rollouts([1.0], group_ids=[0])
    assert stage("advantage", "grpo")(rollouts, scale="batch").values.tolist() == [0.0]
    out = stage("advantage", "grpo")(make_rollouts([1.0, 0.0]))
    assert not out.values.requires_grad and out.values.dtype == F64


def test_rloo_leave_one_out():
    values = stage("advantage", "rloo")(make_rollouts([1.0, 0.0, 0.0, 1.0])).values
    assert torch.allclose(values, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3], dtype=F64), atol=1e-12)
    values = stage("advantage", "rloo")(make_rollouts([3.0, 1.0, 2.0])).values
    assert torch.allclose(values, torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0], dtype=F64), atol=1e-12)


def test_reinforce_raw_and_batch_mean():
    rollouts = make_rollouts([1.0, 0.0, 0.5, 1.0], group_ids=[0, 0, 1, 1])
    reinforce = stage("advantage", "reinforce")
    assert reinforce(rollouts).values.tolist() == [1.0, 0.0, 0.5, 1.0]
    assert torch.allclose(reinforce(rollouts, baseline="batch_mean").values, torch.tensor([0.375, -0.625, -0.125, 0.375], dtype=F64))
    with pytest.raises(StageError, match="baseline"):
        reinforce(rollouts, baseline="group")


# ================================================================ §0.2 losses


def _ppo_case():
    """Four one-token completions with ratios 1.5, 0.5, 0.5, 5 (old = 0) and A = 1, 1, −1, −1."""
    ratios = torch.tensor([[1.5], [0.5], [0.5], [5.0]], dtype=F64)
    rollouts = make_rollouts([1.0, 1.0, 0.0, 0.0], old_logps=torch.zeros(4, 1, dtype=F64))
    logps = ratios.log().requires_grad_(True)
    return rollouts, logps, adv_of([1.0, 1.0, -1.0, -1.0])


def test_ppo_clip_asymmetric_epsilon():
    rollouts, logps, adv = _ppo_case()
    out = stage("loss", "ppo_clip")(logps, rollouts, adv, epsilon_low=0.2, epsilon_high=0.28)
    assert torch.allclose(out.per_token[:, 0], torch.tensor([-1.28, -0.5, 0.8, 5.0], dtype=F64))
    assert out.token_metrics["clip_high"][:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out.token_metrics["clip_low"][:, 0].tolist() == [0.0, 0.0, 1.0, 0.0]
    out.per_token.sum().backward()
    # clipped tokens get no gradient; unclipped ones −ρ·A
    assert torch.allclose(logps.grad[:, 0], torch.tensor([0.0, -0.5, 0.0, 5.0], dtype=F64))
    # the two sides differ: ratio 1.25 is inside 1 + 0.28 but outside 1 + 0.2
    one = make_rollouts([1.0], old_logps=torch.zeros(1, 1, dtype=F64))
    lp = torch.tensor([[math.log(1.25)]], dtype=F64)
    assert stage("loss", "ppo_clip")(lp, one, adv_of([1.0]), epsilon_high=0.28).per_token.item() == pytest.approx(-1.25)
    assert stage("loss", "ppo_clip")(lp, one, adv_of([1.0])).per_token.item() == pytest.approx(-1.2)


def test_ppo_clip_dual_clip():
    rollouts, logps, adv = _ppo_case()
    out = stage("loss", "ppo_clip")(logps, rollouts, adv, epsilon_high=0.28, dual_clip=3.0)
    assert torch.allclose(out.per_token[:, 0], torch.tensor([-1.28, -0.5, 0.8, 3.0], dtype=F64))
    assert out.token_metrics["clip_dual"][:, 0].tolist() == [0.0, 0.0, 0.0, 1.0]
    out.per_token.sum().backward()
    assert logps.grad[3, 0].item() == 0.0  # capped at −c·A: constant


def test_ppo_clip_on_policy_ratio_one_gradient_minus_a():
    rollouts = make_rollouts([1.0, 0.0, 0.0], lengths=[2, 3, 1])
    logps = (-torch.rand(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    adv = adv_of([0.7, -0.2, -1.5])
    out = stage("loss", "ppo_clip")(logps, rollouts, adv)
    expected = -adv.values.unsqueeze(-1).expand(3, 3)
    assert torch.allclose(out.per_token, expected)  # ρ ≡ 1 in value
    (out.per_token * rollouts.completion_mask).sum().backward()
    assert torch.allclose(logps.grad, expected * rollouts.completion_mask)
    assert out.token_metrics["clip_low"].sum() == 0 and out.token_metrics["clip_high"].sum() == 0


def test_gspo_sequence_ratio_and_clip():
    old = torch.zeros(2, 3, dtype=F64)
    rollouts = make_rollouts([1.0, 1.0], lengths=[2, 2], width=3, old_logps=old)
    logps = torch.tensor([[math.log(1.0002), math.log(1.0002), 9.0], [0.01, 0.03, 9.0]], dtype=F64)
    out = stage("loss", "gspo")(logps, rollouts, adv_of([1.0, 1.0]))
    assert torch.allclose(out.per_token[0, :2], torch.full((2,), -1.0002, dtype=F64))  # padding ignored
    assert torch.allclose(out.per_token[1, :2], torch.full((2,), -1.0004, dtype=F64))  # exp(0.02) clipped at 1 + 4e-4
    assert out.token_metrics["clip_high"][:, 0].tolist() == [0.0, 1.0]


def test_gspo_on_policy_gradient_is_minus_a_per_token():
    rollouts = make_rollouts([1.0, 0.0], lengths=[3, 1])
    logps = (-torch.rand(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    adv = adv_of([0.5, -2.0])
    out = stage("loss", "gspo")(logps, rollouts, adv)
    (out.per_token * rollouts.completion_mask).sum().backward()
    assert torch.allclose(logps.grad, -adv.values.unsqueeze(-1) * rollouts.completion_mask, atol=1e-12)


def test_cispo_clipped_detached_weight():
    rollouts = make_rollouts([1.0, 1.0], width=1, old_logps=torch.zeros(2, 1, dtype=F64))
    logps = torch.tensor([[math.log(2.0)], [math.log(8.0)]], dtype=F64, requires_grad=True)
    out = stage("loss", "cispo")(logps, rollouts, adv_of([1.0, 1.0]))
    assert torch.allclose(out.per_token[:, 0], torch.tensor([-2 * math.log(2.0), -5 * math.log(8.0)], dtype=F64))
    assert out.token_metrics["clip_high"][:, 0].tolist() == [0.0, 1.0]
    out.per_token.sum().backward()
    assert torch.allclose(logps.grad[:, 0], torch.tensor([-2.0, -5.0], dtype=F64))  # every token keeps a gradient


def test_reinforce_loss():
    rollouts = make_rollouts([1.0, 0.0], lengths=[2, 2])
    logps = torch.tensor([[-0.5, -1.0], [-2.0, -0.1]], dtype=F64, requires_grad=True)
    out = stage("loss", "reinforce")(logps, rollouts, adv_of([2.0, -1.0]))
    assert torch.allclose(out.per_token, torch.tensor([[1.0, 2.0], [-2.0, -0.1]], dtype=F64))
    out.per_token.sum().backward()
    assert torch.allclose(logps.grad, torch.tensor([[-2.0, -2.0], [1.0, 1.0]], dtype=F64))


# ================================================================ §0.3 aggregation


def _agg_case():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)  # row 2 empty
    return loss, mask


@pytest.mark.parametrize(
    "name, normalizer, value",
    [("token_mean", 4.0, 10 / 4), ("seq_mean_token_mean", 2.0, (2.0 + 4.0) / 2), ("seq_mean_token_sum_norm", 6.0, 10 / 6)],
)
def test_aggregation_values(name, normalizer, value):
    loss, mask = _agg_case()
    agg = get_stage("aggregation", name)
    assert agg.normalizer(mask, 3) == normalizer
    assert agg.fn(loss, mask, agg.normalizer(mask, 3)).item() == pytest.approx(value)


def _microbatch_case():
    """8 completions, 2 groups of 4, mixed lengths, 2 truncated (dropped by mask_truncated)."""
    gen = torch.Generator().manual_seed(42)
    width = 6
    old = -torch.rand(8, width, dtype=F64, generator=gen) * 2
    ref = old - 0.3 * torch.randn(8, width, dtype=F64, generator=gen)
    rollouts = make_rollouts(
        [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0],
        lengths=[3, 5, 2, 6, 1, 4, 6, 2],
        group_ids=[0] * 4 + [1] * 4,
        truncated=[False, False, False, True, False, False, True, False],
        width=width,
        old_logps=old,
        ref_logps=ref,
        entropy=torch.rand(8, width, dtype=F64, generator=gen),
    )
    current = old + 0.4 * torch.randn(8, width, dtype=F64, generator=gen)  # off-policy: some tokens clip
    return rollouts, current


def _run_step(pipe: AlgorithmPipeline, rollouts: Rollouts, current: torch.Tensor, chunk: int):
    """Advantages over the whole step (whole groups), a step normaliser summed over micro-batches,
    then one backward per micro-batch accumulating into the same leaf."""
    advantages, _ = pipe.compute_advantages(rollouts)
    keep = advantages.kept()
    width = rollouts.completion_mask.shape[1]
    chunks = [torch.arange(i, min(i + chunk, 8)) for i in range(0, 8, chunk)]
    normalizer = sum(pipe.normalizer(rollouts.completion_mask[c] * keep[c].unsqueeze(-1), width) for c in chunks)
    logps = current.clone().requires_grad_(True)
    total = 0.0
    for c in chunks:
        mb = rollouts.select(c)
        mb_adv = Advantages(advantages.values[c], keep=keep[c])
        mask = mb.completion_mask * keep[c].unsqueeze(-1)
        per_token, _ = pipe.per_token_loss(logps[c], mb, mb_adv)
        loss = pipe.aggregate(per_token, mask, normalizer)
        loss.backward()
        total += loss.item()
    return total, logps.grad


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("loss", [{"name": "ppo_clip", "epsilon_high": 0.28, "dual_clip": 3.0}, "gspo", "cispo", "reinforce"])
def test_microbatch_invariance(loss, aggregation):
    """docs/algorithms/reference.md §0.3: the step loss and summed gradient do not depend on the cut (1×8, 2×4, 8×1).
    Two ranks of 2×2 are the same sums in another order, so this also covers the 2-process split."""
    rollouts, current = _microbatch_case()
    pipe = AlgorithmPipeline(
        ["grpo", "mask_truncated"],
        loss=loss,
        aggregation=aggregation,
        terms=[{"name": "kl", "coef": 0.05, "estimator": "k3"}, {"name": "entropy", "coef": 0.01}],
    )
    loss_full, grad_full = _run_step(pipe, rollouts, current, 8)
    assert grad_full[[3, 6]].abs().sum() == 0  # dropped completions get no gradient
    assert grad_full.abs().sum() > 0
    for chunk in (4, 1):
        loss_mb, grad_mb = _run_step(pipe, rollouts, current, chunk)
        assert loss_mb == pytest.approx(loss_full, abs=TOL)
        assert torch.allclose(grad_mb, grad_full, atol=TOL, rtol=0)


def test_microbatch_normalizer_is_not_per_microbatch():
    """Normalising each micro-batch by its own token count would differ: guard the test's power."""
    rollouts, current = _microbatch_case()
    pipe = AlgorithmPipeline(["grpo", "mask_truncated"], loss="reinforce", aggregation="token_mean")
    advantages, _ = pipe.compute_advantages(rollouts)
    keep = advantages.kept().unsqueeze(-1)
    wrong = 0.0
    for c in (torch.arange(0, 4), torch.arange(4, 8)):
        mask = rollouts.completion_mask[c] * keep[c]
        per_token, _ = pipe.per_token_loss(current[c], rollouts.select(c), Advantages(advantages.values[c]))
        wrong += pipe.aggregate(per_token, mask, pipe.normalizer(mask, 6)).item() / 2
    right, _ = _run_step(pipe, rollouts, current, 4)
    assert abs(wrong - right) > 1e-3


# ================================================================ §0.4 terms, filters


def _kl_case():
    logps = torch.tensor([[0.0, -1.0]], dtype=F64, requires_grad=True)
    rollouts = make_rollouts([1.0], lengths=[2], ref_logps=torch.tensor([[-0.5, -0.5]], dtype=F64))
    return logps, rollouts


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", [0.5, -0.5]),
        ("k2", [0.125, 0.125]),
        ("k3", [math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5]),
    ],
)
def test_kl_estimators(estimator, expected):
    logps, rollouts = _kl_case()
    out = stage("term", "kl")(logps, rollouts, adv_of([0.0]), coef=0.1, estimator=estimator)
    assert torch.allclose(out.token_metrics["kl"], torch.tensor([expected], dtype=F64))
    assert torch.allclose(out.per_token, 0.1 * torch.tensor([expected], dtype=F64))


def test_kl_k3_gradient():
    logps, rollouts = _kl_case()
    out = stage("term", "kl")(logps, rollouts, adv_of([0.0]), coef=1.0, estimator="k3")
    out.per_token.sum().backward()
    delta = rollouts.ref_logps - logps.detach()
    assert torch.allclose(logps.grad, 1 - torch.exp(delta))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_kl_padding_is_masked_before_the_estimator(estimator, dtype):
    """Pad positions with very negative current log-probs (−100 and −1e4; ref is 0 there):
    loss and gradient finite, exactly 0 at padding, the formula on valid tokens."""
    logps = torch.tensor([[-0.3, -1.2, -100.0, -1e4], [-2.0, -1e4, -100.0, -1e4]], dtype=dtype, requires_grad=True)
    ref = torch.tensor([[-0.5, -0.4, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]], dtype=dtype)  # zeroed on padding
    rollouts = make_rollouts([1.0, 0.0], lengths=[2, 1], width=4, dtype=dtype, ref_logps=ref)
    mask = rollouts.completion_mask > 0
    out = stage("term", "kl")(logps, rollouts, adv_of([0.0, 0.0]), coef=0.1, estimator=estimator)
    assert torch.isfinite(out.per_token).all() and torch.isfinite(out.token_metrics["kl"]).all()
    assert torch.equal(out.per_token[~mask], torch.zeros(int((~mask).sum()), dtype=dtype))
    delta = (ref - logps.detach())[mask].double()
    formula = {"k1": -delta, "k2": 0.5 * delta**2, "k3": torch.exp(delta) - delta - 1}[estimator]
    assert torch.allclose(out.token_metrics["kl"][mask].double(), formula, atol=1e-6)
    loss = (out.per_token * rollouts.completion_mask).sum()  # as the aggregation does
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logps.grad).all()
    assert torch.equal(logps.grad[~mask], torch.zeros(int((~mask).sum()), dtype=dtype))
    grad = {"k1": torch.ones_like(delta), "k2": -delta, "k3": 1 - torch.exp(delta)}[estimator]
    assert torch.allclose(logps.grad[mask].double(), 0.1 * grad, atol=1e-6)


def test_kl_padding_through_the_pipeline_is_finite():
    """The whole step (loss + k3 term + token_mean) with −1e4 current log-probs on padding."""
    pipe = AlgorithmPipeline(["grpo"], terms=[{"name": "kl", "coef": 0.1, "estimator": "k3"}], aggregation="token_mean")
    ref = torch.tensor([[-0.5, 0.0], [-0.7, -0.2]], dtype=F64)
    rollouts = make_rollouts([1.0, 0.0], lengths=[1, 2], width=2, ref_logps=ref)
    adv, _ = pipe.compute_advantages(rollouts)
    logps = torch.tensor([[-0.4, -1e4], [-0.9, -0.1]], dtype=F64, requires_grad=True)
    per_token, _ = pipe.per_token_loss(logps, rollouts, adv)
    mask = rollouts.completion_mask
    loss = pipe.aggregate(per_token, mask, pipe.normalizer(mask, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert logps.grad[0, 1] == 0


def test_kl_needs_ref_only_when_coef_nonzero():
    kl = get_stage("term", "kl")
    assert kl.needs({}) == set() and kl.needs({"coef": 0.0}) == set()
    assert kl.needs({"coef": 0.01}) == {"ref_logps"}
    assert AlgorithmPipeline(["grpo"], terms=[{"name": "kl", "coef": 0.1}]).needs() == {"ref_logps"}
    # coef 0 works without ref logps
    logps = torch.zeros(1, 2, dtype=F64)
    out = kl.fn(logps, make_rollouts([1.0], lengths=[2]), adv_of([0.0]))
    assert out.per_token.abs().sum() == 0
    with pytest.raises(StageError, match="estimator"):
        kl.fn(logps, make_rollouts([1.0], lengths=[2]), adv_of([0.0]), coef=0.1, estimator="k4")


def test_entropy_term():
    ent = torch.tensor([[0.5, 2.0]], dtype=F64, requires_grad=True)
    rollouts = make_rollouts([1.0], lengths=[2], entropy=ent)
    out = stage("term", "entropy")(torch.zeros(1, 2, dtype=F64), rollouts, adv_of([0.0]), coef=0.1)
    assert torch.allclose(out.per_token, torch.tensor([[-0.05, -0.2]], dtype=F64))
    assert not out.token_metrics["entropy"].requires_grad
    out.per_token.sum().backward()
    assert torch.allclose(ent.grad, torch.full((1, 2), -0.1, dtype=F64))
    assert get_stage("term", "entropy").needs({"coef": 0.1}) == {"entropy"}
    assert get_stage("term", "entropy").needs({}) == set()  # coef 0: no entropy forward


def test_zero_variance_filter():
    rollouts = make_rollouts([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0], group_ids=[0] * 4 + [1] * 4)
    zvf = stage("modifier", "zero_variance_filter")
    out = zvf(rollouts, stage("advantage", "grpo")(rollouts))
    assert out.keep.tolist() == [False] * 4 + [True] * 4
    assert out.metrics["dropped"] == pytest.approx(0.5)
    prior = Advantages(torch.zeros(8, dtype=F64), keep=torch.tensor([True] * 7 + [False]))
    assert zvf(rollouts, prior).keep.tolist() == [False] * 4 + [True] * 3 + [False]


def test_flat_groups_are_found_exactly_where_a_std_is_not_zero():
    """Three rewards of 0.1 (float64): group_stats' std is ~1.7e-17, not 0, yet the group is flat;
    the filter, GRPO's zero_variance_groups metric, the batch metric and dynamic sampling all call it
    flat (one helper, max == min)."""
    from rltk.algos.types import flat_groups, group_stats
    from rltk.trainer.collector import batch_metrics
    from rltk.trainer.refill import ScoredGroups

    rewards = [0.1, 0.1, 0.1, 0.1, 0.3, 0.1]
    rollouts = make_rollouts(rewards, group_ids=[0] * 3 + [1] * 3)
    index, groups = rollouts.group_index()
    assert group_stats(rollouts.rewards, index, groups)[1][0] > 0  # the inexact test would keep it
    assert flat_groups(rollouts.rewards, index, groups).tolist() == [True, False]
    assert flat_groups(torch.tensor([2.0, 5.0]), torch.tensor([0, 1]), 2).tolist() == [True, True]  # groups of one
    grpo = stage("advantage", "grpo")(rollouts)
    assert grpo.metrics["zero_variance_groups"] == pytest.approx(0.5)
    assert stage("modifier", "zero_variance_filter")(rollouts, grpo).keep.tolist() == [False] * 3 + [True] * 3
    reasons = {"no_answer": 0, "parse_error": 0, "timeout": 0}
    assert batch_metrics(rollouts, grpo, reasons)["reward/zero_variance_groups"] == 0.5
    scored = ScoredGroups([0, 1], None, None, [], rollouts.rewards, {})
    assert scored.group_has_spread(3).tolist() == [False, True]


def test_mask_truncated():
    rollouts = make_rollouts([1.0, 0.0, 0.0, 1.0], truncated=[False, True, False, False])
    out = stage("modifier", "mask_truncated")(rollouts, adv_of([1.0, -1.0, -1.0, 1.0]))
    assert out.keep.tolist() == [True, False, True, True]
    assert out.values.tolist() == [1.0, -1.0, -1.0, 1.0]
    assert out.metrics["dropped"] == pytest.approx(0.25)


# ================================================================ sampler


def _sampler(seed=0, num_prompts=10, **params):
    return get_stage("sampler", "uniform").fn(num_prompts, seed, **params)


def test_uniform_sampler_each_prompt_once_per_epoch():
    sampler = _sampler(seed=3)
    drawn = [i for _ in range(5) for i in sampler.next_indices(4)]  # 20 = two epochs, across call boundaries
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]  # reshuffled per epoch
    assert _sampler(shuffle=False).next_indices(12) == list(range(10)) + [0, 1]


def test_uniform_sampler_deterministic_by_seed():
    assert _sampler(seed=5).next_indices(25) == _sampler(seed=5).next_indices(25)
    assert _sampler(seed=5).next_indices(25) != _sampler(seed=6).next_indices(25)


def test_uniform_sampler_resume():
    first = _sampler(seed=1)
    first.next_indices(7)
    state = first.state_dict()
    expected = first.next_indices(9)
    resumed = _sampler(seed=1)
    resumed.load_state_dict(state)
    assert resumed.next_indices(9) == expected
    with pytest.raises(ValueError):
        _sampler(num_prompts=0)


# ================================================================ registry


@pytest.fixture
def repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))


def test_unknown_name_suggests_closest():
    with pytest.raises(StageError, match=r"unknown advantage 'grpoo' \(did you mean 'grpo'\?\); registered: .*rloo"):
        get_stage("advantage", "grpoo")
    with pytest.raises(StageError, match="did you mean 'ppo_clip'"):
        AlgorithmPipeline(["grpo"], loss="ppoclip")
    with pytest.raises(StageError, match="unknown stage kind"):
        get_stage("widget", "grpo")
    assert {"grpo", "dr_grpo", "rloo", "reinforce"} <= set(registered("advantage"))


def test_unknown_param_suggests_closest():
    with pytest.raises(StageError, match=r"advantage 'grpo' has no parameter 'scal' \(did you mean 'scale'\?\); valid: eps, scale"):
        AlgorithmPipeline([{"name": "grpo", "scal": "group"}])
    with pytest.raises(StageError, match="did you mean 'epsilon_high'"):
        AlgorithmPipeline(["grpo"], loss={"name": "ppo_clip", "epsilon_hi": 0.28})
    with pytest.raises(StageError, match="valid: none"):
        validate_params(get_stage("modifier", "mask_truncated"), {"x": 1})


def test_bad_pipeline_specs():
    with pytest.raises(StageError, match="at least an estimator"):
        AlgorithmPipeline([])
    with pytest.raises(StageError, match="'name' key"):
        AlgorithmPipeline([{"scale": "group"}])


def test_import_path_stage(repo_on_path):
    pipe = AlgorithmPipeline([{"name": "tests.user_stages:double_reward", "factor": 3.0}, "tests.user_stages:needs_ref"])
    advantages, metrics = pipe.compute_advantages(make_rollouts([1.0, 0.0]))
    assert advantages.values.tolist() == [3.0, 0.0]
    assert metrics == {"tests.user_stages:double_reward/factor": 3.0}
    assert pipe.needs() == {"ref_logps"}
    with pytest.raises(StageError, match="did you mean 'factor'"):
        AlgorithmPipeline([{"name": "tests.user_stages:double_reward", "facter": 3.0}])


def test_import_path_errors(repo_on_path):
    with pytest.raises(StageError, match="cannot import module 'tests.no_such_module'"):
        get_stage("advantage", "tests.no_such_module:fn")
    with pytest.raises(StageError, match="has no callable 'missing'"):
        get_stage("advantage", "tests.user_stages:missing")
    with pytest.raises(StageError, match="has no callable 'NOT_CALLABLE'"):
        get_stage("advantage", "tests.user_stages:NOT_CALLABLE")
    with pytest.raises(StageError, match="needs a 'normalizer'"):
        get_stage("aggregation", "tests.user_stages:plain_sum")


def test_duplicate_registration_and_unknown_need():
    with pytest.raises(StageError, match="already registered"):
        register_advantage("grpo")(lambda rollouts: None)
    with pytest.raises(StageError, match="unknown need 'teacher_logps'"):
        Stage("modifier", "x", lambda rollouts, advantages: advantages, {"teacher_logps"}).needs({})
    assert Stage("modifier", "x", lambda r, a: a, lambda p: {f"hidden({p['layer']})"}).needs({"layer": 3}) == {"hidden(3)"}

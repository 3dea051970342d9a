"""ACE modifier (docs/algorithms/reference.md §2; Xu et al. 2026, arXiv 2602.21420)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tests import factories

from rltk.algos import AlgorithmPipeline, StageError, get_stage
from rltk.algos.ace import ace, confidence_shift
from rltk.algos.estimators import grpo
from rltk.algos.negative import nsr
from rltk.algos.types import Advantages, Rollouts

SPEC_TOL = 1e-4  # docs/algorithms/reference.md: vectors hold to 1e-4 (grpo's eps moves the sixth digit)
TOL = 1e-6
C = [0.3, 2.0, -1.0, 0.5]


def make_rollouts(rewards, lengths, c, correct=None, group_ids=None, truncated=None):
    """Rollouts whose old/ref logps give Σ_t mask·(old − ref) = c; padding carries junk (+100)."""
    rewards = torch.tensor(rewards, dtype=torch.float64)
    n, width = rewards.shape[0], max(max(lengths), 1)
    lengths_t = torch.tensor(lengths)
    mask = (torch.arange(width).unsqueeze(0) < lengths_t.unsqueeze(1)).double()
    per_token = torch.tensor(c, dtype=torch.float64).unsqueeze(-1) / lengths_t.clamp(min=1).unsqueeze(-1)
    old = -torch.rand(n, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.1
    ref = old - torch.where(mask > 0, per_token, torch.full_like(old, 100.0))
    return factories.make_rollouts(rewards.tolist(), lengths, correct=correct, group_ids=group_ids,
                                   truncated=truncated, width=width, old_logps=old, ref_logps=ref)


def spec_rollouts():
    return make_rollouts([1.0, 0.0, 0.0, 1.0], [3, 2, 4, 1], C)


def spec_advantages():
    return grpo(spec_rollouts())


def test_confidence_shift_matches_c_and_ignores_padding():
    assert torch.allclose(confidence_shift(spec_rollouts()), torch.tensor(C, dtype=torch.float64), atol=1e-12)
    mean = confidence_shift(spec_rollouts(), "mean")
    assert torch.allclose(mean, torch.tensor([0.3 / 3, 2.0 / 2, -1.0 / 4, 0.5 / 1], dtype=torch.float64))


@pytest.mark.parametrize(
    "params, wrong",
    [
        ({"alpha": 1.0}, [-2.707994, -1.137316]),
        ({"alpha": 0.5}, [-1.787009, -1.001670]),
        ({"alpha": 1.0, "fn": "relu"}, [-2.598072, -0.866024]),
    ],
)
def test_spec_vectors(params, wrong):
    out = ace(spec_rollouts(), spec_advantages(), **params)
    expected = torch.tensor([0.866025, wrong[0], wrong[1], 0.866025], dtype=torch.float64)
    assert torch.allclose(out.values, expected, atol=SPEC_TOL)


def test_exact_formula_and_metrics():
    adv = spec_advantages()
    out = ace(spec_rollouts(), adv)
    m = [1 + math.log1p(math.exp(2.0)), 1 + math.log1p(math.exp(-1.0))]
    a = adv.values
    assert out.values[1].item() == pytest.approx(a[1].item() * m[0], abs=TOL)
    assert out.values[2].item() == pytest.approx(a[2].item() * m[1], abs=TOL)
    assert out.values[0] == a[0] and out.values[3] == a[3]  # correct completions untouched
    assert out.metrics["overconfident_share"] == pytest.approx(0.5)
    assert out.metrics["mean_multiplier"] == pytest.approx(sum(m) / 2, abs=TOL)
    assert out.metrics["max_multiplier"] == pytest.approx(m[0], abs=TOL)


def test_additive_form():
    out = ace(spec_rollouts(), spec_advantages(), form="additive")
    sp = [math.log1p(math.exp(2.0)), math.log1p(math.exp(-1.0))]
    a = spec_advantages().values
    assert out.values[1].item() == pytest.approx(a[1].item() - sp[0], abs=TOL)  # −2.992953
    assert out.values[2].item() == pytest.approx(a[2].item() - sp[1], abs=TOL)
    assert out.values[1].item() == pytest.approx(-2.992953, abs=SPEC_TOL)


def test_mean_reduction_is_length_normalised():
    out = ace(spec_rollouts(), spec_advantages(), c_reduction="mean")
    a = spec_advantages().values
    assert out.values[1].item() == pytest.approx(a[1].item() * (1 + math.log1p(math.exp(1.0))), abs=TOL)
    assert out.values[2].item() == pytest.approx(a[2].item() * (1 + math.log1p(math.exp(-0.25))), abs=TOL)


def test_max_multiplier_caps_both_forms():
    a = spec_advantages().values
    out = ace(spec_rollouts(), spec_advantages(), max_multiplier=2.0)
    assert out.values[1].item() == pytest.approx(2 * a[1].item(), abs=TOL)
    assert out.values[2].item() == pytest.approx(a[2].item() * (1 + math.log1p(math.exp(-1.0))), abs=TOL)
    assert out.metrics["max_multiplier"] == pytest.approx(2.0)
    add = ace(spec_rollouts(), spec_advantages(), form="additive", max_multiplier=2.0)
    assert add.values[1].item() == pytest.approx(a[1].item() - 1.0, abs=TOL)


def test_token_level_advantages():
    rollouts = spec_rollouts()
    base = spec_advantages()
    token = Advantages(base.per_token(4) * torch.linspace(0.5, 2.0, 4, dtype=torch.float64))
    out = ace(rollouts, token)
    per_seq = ace(rollouts, base)
    ratio = torch.where(base.values != 0, per_seq.values / base.values, torch.ones_like(base.values))
    assert out.values.shape == (4, 4)
    assert torch.allclose(out.values, token.values * ratio.unsqueeze(-1), atol=TOL)
    add = ace(rollouts, token, form="additive")
    shift = (ace(rollouts, base, form="additive").values - base.values).unsqueeze(-1)  # −α·softplus(c), wrong rows
    assert torch.allclose(add.values, token.values + shift, atol=TOL)


def test_detached_even_if_inputs_carry_grad():
    rollouts = spec_rollouts()
    rollouts = replace(rollouts, old_logps=rollouts.old_logps.clone().requires_grad_(True))
    adv = Advantages(spec_advantages().values.clone().requires_grad_(True))
    out = ace(rollouts, adv)
    assert not out.values.requires_grad


def test_all_correct_unchanged_with_neutral_metrics():
    rollouts = make_rollouts([1.0] * 4, [3, 2, 4, 1], C)
    adv = Advantages(torch.tensor([0.5, -0.2, 0.1, 0.3], dtype=torch.float64))
    out = ace(rollouts, adv)
    assert torch.equal(out.values, adv.values)
    assert out.metrics == {"overconfident_share": 0.0, "mean_multiplier": 1.0, "max_multiplier": 1.0}


def test_all_wrong_group():
    rollouts = make_rollouts([0.0] * 4, [3, 2, 4, 1], C)
    # grpo gives 0 and a multiplier keeps it 0
    assert torch.equal(ace(rollouts, grpo(rollouts)).values, torch.zeros(4, dtype=torch.float64))
    # nsr gives −1 and ACE scales every wrong completion
    out = ace(rollouts, nsr(rollouts))
    expected = -(1 + torch.nn.functional.softplus(torch.tensor(C, dtype=torch.float64)))
    assert torch.allclose(out.values, expected, atol=TOL)
    assert out.metrics["overconfident_share"] == pytest.approx(0.75)


def test_group_of_one_and_empty_completion():
    rollouts = make_rollouts([1.0, 0.0, 0.0], [2, 0, 3], [0.4, 5.0, 1.0], group_ids=[0, 1, 2])
    adv = grpo(rollouts)
    assert torch.equal(ace(rollouts, adv).values, torch.zeros(3, dtype=torch.float64))  # G = 1 → 0 stays 0
    c = confidence_shift(rollouts)
    assert c[1].item() == 0.0  # an empty completion has no confidence shift
    out = ace(rollouts, Advantages(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)), c_reduction="mean")
    assert out.values[1].item() == pytest.approx(-(1 + math.log(2)), abs=TOL)


def test_truncated_keep_is_preserved_and_metrics_skip_dropped():
    rollouts = make_rollouts([1.0, 0.0, 0.0, 1.0], [3, 2, 4, 1], C, truncated=[False, True, False, False])
    pipe = AlgorithmPipeline(["grpo", "mask_truncated", "ace"], loss="reinforce")
    adv, metrics = pipe.compute_advantages(rollouts)
    assert adv.keep.tolist() == [True, False, True, True]
    assert adv.values[1].item() == pytest.approx(-2.707994, abs=SPEC_TOL)  # still computed
    assert metrics["ace/overconfident_share"] == 0.0  # the only kept wrong one has c = −1
    assert metrics["ace/max_multiplier"] == pytest.approx(1 + math.log1p(math.exp(-1.0)), abs=TOL)


def test_gradient_of_aggregated_loss_matches_analytic():
    rollouts = spec_rollouts()
    pipe = AlgorithmPipeline(["grpo", {"name": "ace", "alpha": 0.5}], loss="reinforce", aggregation="token_mean")
    adv, _ = pipe.compute_advantages(rollouts)
    mask = rollouts.completion_mask
    logps = (-torch.rand(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    per_token, _ = pipe.per_token_loss(logps, rollouts, adv)
    loss = pipe.aggregate(per_token, mask, pipe.normalizer(mask, mask.shape[1]))
    loss.backward()
    coeff = torch.tensor([0.866025, -1.787009, -1.001670, 0.866025], dtype=torch.float64)
    assert torch.allclose(logps.grad, -coeff.unsqueeze(-1) / 10 * mask, atol=SPEC_TOL / 10)


def test_needs_and_registration():
    assert get_stage("modifier", "ace").needs({}) == {"old_logps", "ref_logps"}
    assert AlgorithmPipeline(["grpo", "ace"]).needs() == {"old_logps", "ref_logps"}


@pytest.mark.parametrize(
    "params",
    [
        {"alpha": -1.0},
        {"alpha": float("inf")},
        {"alpha": "1"},
        {"fn": "tanh"},
        {"form": "mult"},
        {"c_reduction": "max"},
        {"max_multiplier": 0.5},
        {"max_multiplier": float("nan")},
    ],
)
def test_invalid_knobs_raise_one_line(params):
    with pytest.raises(StageError, match=r"^ace: ") as info:
        ace(spec_rollouts(), spec_advantages(), **params)
    assert "\n" not in str(info.value)


def test_missing_logps_raise():
    rollouts = replace(spec_rollouts(), ref_logps=None)
    with pytest.raises(StageError, match="ref_logps"):
        ace(rollouts, spec_advantages())

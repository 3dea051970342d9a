"""Dynamic sampling with refill (``rollout.dynamic_sampling``, rltk/trainer/refill.py): the step keeps
its number of groups, holds only groups whose rewards differ when the rounds allow, keeps a
sampler's pairs whole, and reports the extra generation."""
from __future__ import annotations

import pytest
import torch

from rltk.engines.base import Generation
from rltk.schema import ConfigError
from rltk.trainer.refill import Refill, ScoredGroups, informative_units
from rltk.validate import build_recipe
from tests.conftest import small_recipe_data

G = 2


def scored(indices: list[int], flat: list[bool], roles=None) -> ScoredGroups:
    """Groups of G rows; group g's prompt is g + 1 tokens (value = dataset index), its completions
    g + 2 tokens; rewards (0, 1) per group, or (0, 0) where ``flat``."""
    rows = len(indices) * G
    width = max(indices) + 1
    prompt_ids = torch.zeros(rows, width, dtype=torch.long)
    prompt_mask = torch.zeros(rows, width, dtype=torch.long)
    completion_ids = torch.full((rows, width + 1), -1, dtype=torch.long)
    completion_mask = torch.zeros(rows, width + 1, dtype=torch.long)
    for g, i in enumerate(indices):
        for k in range(G):
            r = g * G + k
            prompt_ids[r, width - i - 1:], prompt_mask[r, width - i - 1:] = i, 1
            completion_ids[r, : i + 2], completion_mask[r, : i + 2] = 100 + i, 1
    generation = Generation(prompt_ids, prompt_mask, completion_ids, completion_mask,
                            torch.zeros(rows, dtype=torch.bool), [f"{i}.{k}" for i in indices for k in range(G)],
                            completion_mask.float() * -0.5)
    rewards = torch.tensor([0.0 if f else float(k) for f in flat for k in range(G)])
    return ScoredGroups(list(indices), roles, generation, [f"v{i}" for i in indices for _ in range(G)], rewards,
                        {"r": rewards.clone()}, {"time/generate": 1.0})


def test_refill_keeps_the_informative_groups_up_to_the_quota():
    refill = Refill(quota_groups=4, group_size=G)
    refill.add(scored([3, 1, 4, 0], [False, True, False, True]))
    assert refill.missing == 2
    refill.add(scored([5, 2, 6, 7], [True, False, False, False]))  # 3 informative, room for 2
    assert refill.missing == 0
    out, metrics = refill.result(pad_id=-1)
    assert out.indices == [3, 4, 2, 6]
    assert out.generation.texts == ["3.0", "3.1", "4.0", "4.1", "2.0", "2.1", "6.0", "6.1"]
    assert out.verdicts == ["v3", "v3", "v4", "v4", "v2", "v2", "v6", "v6"]
    assert out.rewards.tolist() == [0, 1] * 4 and out.per_reward["r"].tolist() == [0, 1] * 4
    assert out.group_has_spread(G).all()
    # rows keep their own tokens, re-padded to the widest part: prompt i is i + 1 tokens of value i
    gen = out.generation
    assert gen.prompt_ids.shape[1] == 7 and gen.completion_ids.shape[1] == 8
    for row, i in enumerate([3, 3, 4, 4, 2, 2, 6, 6]):
        assert gen.prompt_ids[row][gen.prompt_mask[row].bool()].tolist() == [i] * (i + 1)
        assert gen.completion_ids[row][gen.completion_mask[row].bool()].tolist() == [100 + i] * (i + 2)
        assert (gen.completion_ids[row][~gen.completion_mask[row].bool()] == -1).all()
        assert gen.sampling_logps[row].sum() == pytest.approx(-0.5 * (i + 2))
    assert metrics == {"dynamic/rounds": 2.0, "dynamic/generated_groups": 8.0, "dynamic/extra_generation": 1.0,
                       "dynamic/unfilled_share": 0.0}
    assert out.timings == {"time/generate": 2.0}


def test_without_enough_rounds_the_step_is_filled_with_uninformative_groups():
    refill = Refill(quota_groups=4, group_size=G)
    refill.add(scored([0, 1, 2, 3], [True, False, True, True]))
    out, metrics = refill.result(pad_id=-1)
    assert out.indices == [1, 0, 2, 3]  # informative first, then spares in order
    assert metrics["dynamic/unfilled_share"] == 0.75 and metrics["dynamic/extra_generation"] == 0.0


def test_pairs_are_kept_whole_and_only_when_both_groups_are_informative():
    roles = ["pos", "neg"] * 3
    first = scored([0, 1, 2, 3, 4, 5], [False, True, False, False, True, True], roles)
    assert informative_units(first, G) == [False, True, False]
    refill = Refill(quota_groups=4, group_size=G)
    refill.add(first)
    refill.add(scored([6, 7, 8, 9, 10, 11], [False, False, True, False, False, False], roles))
    out, metrics = refill.result(pad_id=-1)
    assert out.indices == [2, 3, 6, 7] and out.roles == ["pos", "neg", "pos", "neg"]
    assert metrics["dynamic/unfilled_share"] == 0.0


def test_trainer_refills_until_every_group_differs(tmp_path, tiny_model_dir):
    """Prompts with an even answer get equal rewards (tests.user_stages): with refill every trained
    group has an odd answer and differing rewards, the step keeps prompts_per_step groups, and the
    extra generation is reported; with max_refill_rounds 0 the flat groups stay in, counted."""
    from rltk.trainer.rl import RLTrainer

    def run(rounds):
        data = small_recipe_data(tiny_model_dir, tmp_path / str(rounds),
                                 rollout={"dynamic_sampling": True, "max_refill_rounds": rounds},
                                 rewards=[{"name": "tests.user_stages:alternating_unless_even_answer"}])
        trainer = RLTrainer(build_recipe(data))
        try:
            torch.manual_seed(0)
            batches = [trainer.collect() for _ in range(3)]
            data = trainer.collector.data
            answer_of = dict(zip(data.prompts, (e.answer for e in data.examples)))
            answers = [[answer_of[p] for p in b.prompts[::4]] for b in batches]
        finally:
            trainer.close()
        return batches, answers

    batches, answers = run(8)
    for batch, batch_answers in zip(batches, answers):
        assert batch.rollouts.num_completions == 16  # 4 prompts × 4, as without refill
        assert batch.metrics["reward/zero_variance_groups"] == 0.0
        assert all(int(a) % 2 == 1 for a in batch_answers)
        assert batch.metrics["dynamic/unfilled_share"] == 0.0
        assert batch.metrics["dynamic/extra_generation"] == batch.metrics["dynamic/generated_groups"] / 4 - 1
    assert any(b.metrics["dynamic/rounds"] > 1 for b in batches)  # some step needed a refill
    batches, answers = run(0)
    for batch, batch_answers in zip(batches, answers):
        even = sum(int(a) % 2 == 0 for a in batch_answers) / 4
        assert batch.metrics["dynamic/rounds"] == 1.0
        assert batch.metrics["reward/zero_variance_groups"] == pytest.approx(even)
        assert batch.metrics["dynamic/unfilled_share"] == pytest.approx(even)


def test_negative_refill_rounds_are_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="^rollout.max_refill_rounds: -1 is negative"):
        build_recipe({"model": {"name_or_path": tiny_model_dir}, "rollout": {"max_refill_rounds": -1}})

"""Difficulty pools (sampler ``difficulty_pools``, rltk/algos/pools.py): streaks retire always-solved
prompts and defer never-solved ones, a set share of each batch revisits them, the state survives a
checkpoint, and the trainer reports every visited group."""
from __future__ import annotations

import json

import pytest

from rltk.algos.pools import ACTIVE, DEFERRED, RETIRED, DifficultyPoolSampler
from rltk.algos.registry import StageError
from rltk.schema import ConfigError
from rltk.validate import build_recipe
from tests.conftest import small_recipe_data

G = 4


def test_streaks_move_prompts_between_pools():
    s = DifficultyPoolSampler(5, seed=0, retire_after=2, defer_after=3)
    s.observe([0, 1, 2], [G, 0, 2], G)
    assert s.streak[:3] == [1, -1, 0] and s.pool[:3] == [ACTIVE] * 3
    s.observe([0, 1], [G, 0], G)
    assert s.pool[0] == RETIRED and s.pool[1] == ACTIVE  # 2 solved visits retire; 2 failed do not defer yet
    s.observe([1], [0], G)
    assert s.pool[1] == DEFERRED and s.streak[1] == -3
    s.observe([0, 1], [G, 1], G)  # a retired prompt solved again stays retired; one mixed visit reactivates
    assert (s.pool[0], s.streak[0]) == (RETIRED, 3) and (s.pool[1], s.streak[1]) == (ACTIVE, 0)
    s.observe([0], [0], G)  # a retired prompt failed outright: its streak starts over on the other side
    assert (s.pool[0], s.streak[0]) == (ACTIVE, -1)
    assert s.metrics()["pools/retired"] == 0.0 and s.metrics()["pools/active"] == 5.0


def test_batches_revisit_a_set_share_and_otherwise_walk_the_active_prompts():
    s = DifficultyPoolSampler(40, seed=1, retire_after=1, defer_after=1, revisit_share=0.25)
    parked = set(range(0, 40, 2))  # even prompts: half solved, half failed once
    s.observe(sorted(parked), [G if i % 4 == 0 else 0 for i in sorted(parked)], G)
    assert s.metrics() == {"pools/active": 20.0, "pools/retired": 10.0, "pools/deferred": 10.0, "pools/revisits": 0.0}
    seen_active = []
    for _ in range(5):
        batch = s.next_indices(8)
        assert len(batch) == 8 and s.metrics()["pools/revisits"] == 2.0
        assert all(i % 2 == 1 for i in batch[:6]) and all(i in parked for i in batch[6:])
        seen_active += batch[:6]
    # the active part walks shuffled epochs over the 20 active prompts: 30 draws = every one once, then 10 more
    assert sorted(seen_active[:20]) == list(range(1, 40, 2))


def test_with_every_prompt_parked_the_whole_batch_revisits():
    s = DifficultyPoolSampler(3, seed=0, retire_after=1, defer_after=1)
    s.observe([0, 1, 2], [G, 0, G], G)
    batch = s.next_indices(5)
    assert len(batch) == 5 and set(batch) == {0, 1, 2} and s.metrics()["pools/revisits"] == 5.0


def test_state_round_trip_gives_the_same_next_batches():
    a = DifficultyPoolSampler(30, seed=2, retire_after=1, defer_after=2, revisit_share=0.3)
    a.next_indices(7)
    a.observe([1, 2, 3, 4], [G, 0, 0, 3], G)
    a.observe([2, 5], [0, G], G)
    b = DifficultyPoolSampler(30, seed=2, retire_after=1, defer_after=2, revisit_share=0.3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # as a checkpoint stores it
    assert [a.next_indices(7) for _ in range(6)] == [b.next_indices(7) for _ in range(6)]
    with pytest.raises(ValueError, match="tracks 30 prompts, the data has 31"):
        DifficultyPoolSampler(31, seed=2).load_state_dict(a.state_dict())


@pytest.mark.parametrize("params,message", [({"revisit_share": 1.5}, "revisit_share must be in"),
                                            ({"retire_after": -1}, "must be >= 0")])
def test_bad_parameters_are_one_line(tiny_model_dir, params, message):
    with pytest.raises(StageError, match=message):
        DifficultyPoolSampler(10, 0, **params)
    with pytest.raises(ConfigError, match=message):
        build_recipe({"model": {"name_or_path": tiny_model_dir},
                      "algorithm": {"sampler": {"name": "difficulty_pools", **params}}})


def test_trainer_reports_every_visited_group(tmp_path, tiny_model_dir):
    """The tiny random model solves nothing: with defer_after 1 every prompt of step 1 is deferred,
    and step 2's batch revisits them at the set share."""
    from rltk.trainer.rl import RLTrainer

    data = small_recipe_data(tiny_model_dir, tmp_path, rewards=[{"name": "math"}],
                             algorithm={"sampler": {"name": "difficulty_pools", "defer_after": 1,
                                                    "revisit_share": 0.5}})
    trainer = RLTrainer(build_recipe(data))
    try:
        first = trainer.collect()
        assert first.metrics["correct/mean"] == 0.0
        assert first.metrics["pools/deferred"] == 4.0 and first.metrics["pools/revisits"] == 0.0
        first_prompts = set(first.prompts)
        second = trainer.collect()
        assert second.metrics["pools/revisits"] == 2.0
        # 2 fresh prompts (rows 0-7), then 2 of step 1's deferred ones; all 6 are deferred now
        assert len(set(second.prompts[8:])) == 2 and set(second.prompts[8:]) <= first_prompts
        assert not set(second.prompts[:8]) & first_prompts
        assert second.metrics["pools/deferred"] == 6.0
    finally:
        trainer.close()

"""The pairing sampler (docs/algorithms/reference.md §4a) and Weighted GRPO end to end."""
from __future__ import annotations

import json

import pytest

from rltk.algos.pairing import PairingSampler
from rltk.algos.samplers import ProbeContext
from rltk.trainer.collector import JsonProbeCache
from rltk.algos.registry import StageError
from rltk.validate import build_recipe
from tests.conftest import small_recipe_data

G = 8
# success counts of 8 samples for prompts 0..9: 0-2 hard-but-solvable (1..2), 5-7 easy-but-brittle (6..7)
COUNTS = [1, 2, 2, 0, 0, 6, 7, 7, 8, 4]


def _context(tmp_path, calls, counts=COUNTS):
    def probe(indices):
        calls.append(list(indices))
        return [counts[i] for i in indices]

    return ProbeContext(probe, G, [f"L1-{i}" for i in range(len(counts))], JsonProbeCache(tmp_path / "probe.json"))


def test_pairs_roles_and_eligibility(tmp_path):
    calls = []
    sampler = PairingSampler(10, seed=0)
    sampler.attach(_context(tmp_path, calls))
    indices = sampler.next_indices(8)
    assert sampler.last_roles == ["pos", "neg"] * 4
    assert all(COUNTS[i] in (1, 2) for i in indices[0::2])  # c = G/4 = 2
    assert all(COUNTS[i] in (6, 7) for i in indices[1::2])
    assert sampler.histograms["hard"] == {0: 2, 1: 1, 2: 2, 4: 1, 6: 1, 7: 2, 8: 1}
    sampler.next_indices(8)
    assert len(calls) == 1  # refresh_every 0: probed once


def test_probe_cache_and_resume(tmp_path):
    calls = []
    first = PairingSampler(10, seed=3)
    first.attach(_context(tmp_path, calls))
    first.next_indices(4)
    state = first.state_dict()
    expected = first.next_indices(4)
    resumed = PairingSampler(10, seed=3)
    resumed.attach(_context(tmp_path, calls))
    resumed.load_state_dict(state)
    assert resumed.next_indices(4) == expected
    assert len(calls) == 1  # the resumed sampler reused the cached probe
    assert json.loads((tmp_path / "probe.json").read_text())["probes"]["0"]["hard"]
    other = PairingSampler(10, seed=4)  # another seed: the cache does not apply
    other.attach(_context(tmp_path, calls))
    other.next_indices(4)
    assert len(calls) == 2


def test_refresh_every_reprobes(tmp_path):
    calls = []
    sampler = PairingSampler(10, seed=0, refresh_every=2)
    sampler.attach(_context(tmp_path, calls))
    for _ in range(5):
        sampler.next_indices(2)
    assert len(calls) == 3  # batches 0, 2 and 4


def test_no_eligible_prompt_shows_the_histogram(tmp_path):
    sampler = PairingSampler(10, seed=0)
    sampler.attach(_context(tmp_path, [], counts=[0] * 10))
    with pytest.raises(StageError, match=r"no eligible prompt in the hard pool \(need 1 <= successes <= 2 of 8\); "
                                         r"observed success-count histogram \{0: 10\}"):
        sampler.next_indices(2)


def test_pool_patterns(tmp_path):
    sampler = PairingSampler(10, seed=0, hard_pool="^L1-[0-4]$", easy_pool="^L1-[5-9]$")
    sampler.attach(_context(tmp_path, []))
    indices = sampler.next_indices(6)
    assert all(i < 5 for i in indices[0::2]) and all(i >= 5 for i in indices[1::2])
    with pytest.raises(StageError, match="not a regular expression"):
        PairingSampler(10, seed=0, hard_pool="(")


def test_weighted_grpo_needs_the_pairing_sampler(tmp_path, tiny_model_dir):
    from rltk.schema import ConfigError

    data = small_recipe_data(tiny_model_dir, tmp_path, algorithm={"advantage": [{"name": "weighted_grpo"}]})
    with pytest.raises(ConfigError, match="need per-group roles, which the 'uniform' sampler does not provide"):
        build_recipe(data)  # before any model loads
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"prompts_per_step": 3},
                             algorithm={"advantage": [{"name": "weighted_grpo"}], "sampler": "pairing"})
    with pytest.raises(ConfigError, match="even number of prompts"):
        build_recipe(data)


def test_weighted_grpo_trains_with_pairing(tmp_path, tiny_model_dir, monkeypatch):
    from rltk.trainer.collector import RolloutCollector
    from rltk.trainer.rl import RLTrainer

    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"prompts_per_step": 4, "steps": 2},
                             rollout={"group_size": G},
                             algorithm={"advantage": [{"name": "weighted_grpo", "lam": 1.0}],
                                        "sampler": {"name": "pairing", "probe_size": 10}})
    monkeypatch.setattr(RolloutCollector, "probe", lambda self, indices: [COUNTS[i % 10] for i in indices])
    trainer = RLTrainer(build_recipe(data))
    try:
        batch = trainer.collect()
        assert batch.rollouts.roles == ("pos", "neg", "pos", "neg")
        assert "weighted_grpo/pos_groups" in batch.metrics
        metrics = trainer.train_batch()
        assert metrics["pairing/hard_eligible"] > 0
    finally:
        trainer.close()

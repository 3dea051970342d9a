"""DAPO's soft overlong punishment (rewards/length.py): the docstring's test vectors, the recipe
entry, and the values that reach the advantage stage."""
from __future__ import annotations

import pytest
import torch

from rewards.length import overlong_penalty, overlong_reward
from rewards.registry import load_reward_function
from rltk.schema import ConfigError
from rltk.trainer.rl import RLTrainer
from rltk.validate import build_recipe
from tests.conftest import small_recipe_data
from tests.factories import ScriptedEngine


@pytest.mark.parametrize("length, expected", [(3, 0.0), (6, 0.0), (7, -0.25), (9, -0.75), (10, -1.0), (12, -1.0)])
def test_vectors(length, expected):
    assert overlong_penalty(length, max_length=10, buffer=4) == expected


def test_dapo_setting_ramps_from_16384_to_20480():
    values = overlong_reward([[0] * n for n in (16384, 16385, 18432, 20480, 20481)])
    assert values == [0.0, -1 / 4096, -0.5, -1.0, -1.0]


@pytest.mark.parametrize("kwargs", [{"buffer": 0}, {"buffer": 11, "max_length": 10}, {"max_length": 10.5},
                                    {"buffer": True}])
def test_bad_settings_are_one_line(kwargs):
    with pytest.raises(ValueError, match=r"^overlong: needs integers 0 < buffer <= max_length"):
        overlong_reward([[1]], **{"max_length": 10, "buffer": 4, **kwargs})


def test_bad_settings_fail_when_the_recipe_loads(tmp_path, tiny_model_dir):
    data = small_recipe_data(tiny_model_dir, tmp_path, rewards=[{"name": "overlong", "kwargs": {"buffer": 0}}])
    with pytest.raises(ConfigError, match=r"^rewards\[0\]: overlong: needs integers 0 < buffer <= max_length, "
                                          r"got buffer=0, max_length=20480$"):
        build_recipe(data)


def test_recipe_entry_and_the_rewards_that_reach_the_advantages(tmp_path, tiny_model_dir):
    """rewards: [{name: overlong, kwargs: {max_length: 8, buffer: 4}}] on scripted completions of
    1 to 8 tokens (EOS included): R = 0 up to 4 tokens, then -0.25 per token."""
    assert load_reward_function("overlong", kwargs={"max_length": 8, "buffer": 4}).needs_columns == ()
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"prompts_per_step": 2},
                             rewards=[{"name": "overlong", "kwargs": {"max_length": 8, "buffer": 4}}])
    trainer = RLTrainer(build_recipe(data))
    texts = ["1", "12", "123", "1234", "12345", "123456", "1234567", None]  # None: 8 tokens, no EOS
    trainer.collector.engine = ScriptedEngine(trainer.tokenizer, texts)
    try:
        batch = trainer.collect()
    finally:
        trainer.close()
    lengths = batch.tokens.completion_mask.sum(1).tolist()
    assert lengths == [2, 3, 4, 5, 6, 7, 8, 8]
    expected = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0], dtype=batch.rollouts.rewards.dtype)
    torch.testing.assert_close(batch.rollouts.rewards, expected)
    torch.testing.assert_close(batch.rewards_by_function["overlong"], expected)

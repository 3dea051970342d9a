"""Generation edge cases have defined, counted behaviour: empty completions (EOS first), every
completion truncated, all-correct and all-wrong batches. The step always completes with finite
numbers; a step with nothing left to learn from is skipped and counted."""
from __future__ import annotations

import math

import pytest

from rltk.validate import build_recipe
from rltk.trainer.rl import RLTrainer
from tests.conftest import small_recipe_data
from tests.factories import ScriptedEngine

G = 4


def _run(tmp_path, model_dir, advantage, make_texts):
    data = small_recipe_data(model_dir, tmp_path, trainer={"prompts_per_step": 2, "steps": 1},
                             rollout={"max_new_tokens": 16, "group_size": G},
                             algorithm={"advantage": advantage}, rewards=[{"name": "math"}])
    trainer = RLTrainer(build_recipe(data))
    try:
        trainer.sampler.next_indices = lambda n: [0, 1]
        answers = [trainer.train_examples[i].answer for i in (0, 1)]
        trainer.collector.engine = ScriptedEngine(trainer.tokenizer, make_texts(answers))  # training rollouts only
        metrics = trainer.train_batch()
        return metrics, dict(trainer.counters)
    finally:
        trainer.close()


def _finite(metrics):
    for key, value in metrics.items():
        assert math.isfinite(value), key


def test_eos_first_gives_empty_completions(tmp_path, tiny_model_dir):
    metrics, _ = _run(tmp_path, tiny_model_dir, [{"name": "grpo"}], lambda answers: [""] * (2 * G))
    _finite(metrics)
    assert metrics["completion/empty"] == 1.0
    assert metrics["completion/length_mean"] == 1.0  # the EOS token alone
    assert metrics["verifier/no_answer"] == 1.0
    assert metrics["correct/all_wrong_groups"] == 1.0
    assert metrics["loss"] == 0.0  # equal rewards: grpo advantages are all zero


def test_every_completion_truncated_is_an_empty_counted_step(tmp_path, tiny_model_dir):
    metrics, counters = _run(tmp_path, tiny_model_dir, [{"name": "grpo"}, {"name": "mask_truncated"}],
                             lambda answers: [None] * (2 * G))
    _finite(metrics)
    assert metrics["completion/truncated"] == 1.0
    assert metrics["mask_truncated/dropped"] == 1.0
    assert metrics["empty_step"] == 1.0 and counters["empty_steps"] == 1


def test_all_correct_batch(tmp_path, tiny_model_dir):
    texts = lambda answers: [f"\\boxed{{{a}}}" for a in answers for _ in range(G)]  # noqa: E731
    metrics, counters = _run(tmp_path, tiny_model_dir, [{"name": "nsr"}], texts)
    _finite(metrics)
    assert metrics["correct/mean"] == 1.0 and metrics["correct/all_correct_groups"] == 1.0
    assert metrics["empty_step"] == 1.0 and counters["empty_steps"] == 1  # nsr drops every correct sample


@pytest.mark.parametrize("advantage, expect_zero", [([{"name": "grpo"}], True), ([{"name": "nsr"}], False)])
def test_all_wrong_batch(tmp_path, tiny_model_dir, advantage, expect_zero):
    metrics, _ = _run(tmp_path, tiny_model_dir, advantage, lambda answers: ["\\boxed{-1}"] * (2 * G))
    _finite(metrics)
    assert metrics["correct/mean"] == 0.0 and metrics["correct/all_wrong_groups"] == 1.0
    assert (metrics["grad_norm"] == 0.0) == expect_zero  # nsr still pushes wrong answers down

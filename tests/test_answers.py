"""GARL/PAFT likelihood mode: gold-answer log-probs after each rationale, and the pathwise term."""
from __future__ import annotations

import json

import pytest
import torch

from rltk.validate import build_recipe
from rltk.trainer.answers import build_answer_batch, rationale
from rltk.trainer.logprobs import TokenBatch, forward_logps
from rltk.trainer.rl import RLTrainer
from tests.conftest import small_recipe_data


def test_rationale_cuts_at_the_last_box():
    assert rationale("37+48=85. \\boxed{85}") == "37+48=85. "
    assert rationale("\\boxed{1} then \\boxed{2} done") == "\\boxed{1} then "
    assert rationale("no box at all") == "no box at all"


def test_answer_batch_marks_only_the_gold_answer(tiny_model_dir):
    from rltk.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    prompts = torch.tensor([tok("Q: 1+1=?\nA: ")["input_ids"]] * 2)
    tokens = TokenBatch(prompts, torch.ones_like(prompts), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    batch = build_answer_batch(tokens, ["1+1=3. \\boxed{3}", "x"], ["2", "2"], tok, "\\boxed{{{answer}}}")
    first = batch.tokens.completion_ids[0][batch.tokens.completion_mask[0].bool()]
    assert tok.decode(first) == "1+1=3. \\boxed{2}"
    answer = batch.tokens.completion_ids[0][batch.answer_mask[0].bool()]
    assert tok.decode(answer) == "\\boxed{2}"
    assert batch.answer_mask[1].sum() == len("\\boxed{2}")


@pytest.mark.parametrize("stage", [{"advantage": [{"name": "garl", "mode": "likelihood"}]},
                                   {"advantage": [{"name": "grpo"}],
                                    "loss": {"name": "paft", "mode": "likelihood"}}])
def test_likelihood_mode_trains(tmp_path, tiny_model_dir, stage):
    data = small_recipe_data(tiny_model_dir, tmp_path, algorithm={**stage, "aggregation": "seq_mean_token_sum"})
    trainer = RLTrainer(build_recipe(data))
    try:
        batch = trainer.collect()
        expected = []
        for i in range(len(batch.answer.tokens)):  # answer_logps = Σ answer-token logps, row by row
            with torch.no_grad():
                one = forward_logps(trainer.model, batch.answer.tokens.rows(torch.tensor([i])), 1.0).logps
            expected.append(float((one * batch.answer.answer_mask[i]).sum()))
        assert torch.allclose(batch.rollouts.answer_logps, torch.tensor(expected), atol=1e-4)
        # garl: every completion's pathwise weight is > 0; paft: only the resampled ones
        assert batch.answer_sft is not None and (batch.answer_sft >= 0).all() and batch.answer_sft.sum() > 0
        metrics = trainer.train_batch()
        assert metrics["answer/prob_mean"] > 0
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] if \
        (tmp_path / "metrics.jsonl").exists() else []
    assert all("loss" not in r or r["loss"] == r["loss"] for r in rows)


def test_pathwise_term_gradient(tmp_path, tiny_model_dir):
    """With zero advantages, the step gradient is exactly the weighted gold-answer SFT gradient."""
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"prompts_per_step": 2},
                             algorithm={"advantage": [{"name": "garl", "mode": "likelihood"}],
                                        "aggregation": "seq_mean_token_sum"})
    trainer = RLTrainer(build_recipe(data))
    try:
        batch = trainer.collect()
        from dataclasses import replace

        batch.advantages = replace(batch.advantages, values=torch.zeros_like(batch.advantages.values))
        rows = torch.arange(8)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.accumulate_gradients(batch, rows)
        got = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
        trainer.optimizer.zero_grad(set_to_none=True)
        logps = forward_logps(trainer.model, batch.answer.tokens, 1.0).logps
        manual = -(batch.answer_sft.unsqueeze(-1) * logps * batch.answer.answer_mask).sum() / 8
        manual.backward()
        want = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
        assert want.abs().sum() > 0
        assert torch.allclose(got, want, atol=1e-6)
    finally:
        trainer.close()

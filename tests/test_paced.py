"""PACED in the RL loop (docs/algorithms/reference.md §7; arXiv 2603.11178): the trainer's loss and gradient equal
a hand computation from the two models' full logits, do not depend on micro-batching, skip
all-zero-weight steps, follow the schedule; the recipe section is validated before models load."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from rltk.schema import ConfigError, TinyModelConfig

from rltk.validate import build_recipe
from rltk.trainer.rl import RLTrainer
from tests.conftest import small_recipe_data

# two prompts × four completions: pass rates 0.25 and 0.5 -> w = 0.1875, 0.25 (α = β = 1)
CORRECT = torch.tensor([True, False, False, False, True, True, False, False])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A second tiny model (wider, another seed) with the same character tokenizer."""
    from rltk.models import build_tiny_model

    cfg = TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, seed=1)
    return str(build_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny", cfg))


def paced_data(model_dir, out, teacher, **paced):
    data = small_recipe_data(model_dir, out, trainer={"prompts_per_step": 2})
    data["algorithm"] = {"advantage": [{"name": "grpo"}], "pg_coef": paced.pop("pg_coef", 0.0),
                         "paced": {"schedule": "forward", **paced}}
    data["teacher"] = teacher
    return data


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _step(trainer, batch, size):
    trainer.recipe.trainer.micro_batch_size = size
    trainer.optimizer.zero_grad(set_to_none=True)
    metrics = trainer.accumulate_gradients(batch, torch.arange(batch.rollouts.num_completions))
    return metrics, _grads(trainer.model).clone()


def _batch(trainer, correct=CORRECT):
    torch.manual_seed(3)
    batch = trainer.collect()
    return replace(batch, rollouts=replace(batch.rollouts, correct=correct))


def _completion_logits(model, tokens):
    ids = torch.cat([tokens.prompt_ids, tokens.completion_ids], 1)
    attention = torch.cat([tokens.prompt_mask, tokens.completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits
    return logits[:, tokens.prompt_ids.shape[1] - 1 : -1]


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_paced_loss_and_gradient_equal_hand_computation(tmp_path, tiny_model_dir, teacher_dir, direction):
    """Σ_i w_i·mean_t KL_t / Σ w from the two models' full logits, weights from the step's pass rates."""
    data = paced_data(tiny_model_dir, tmp_path, {"name_or_path": teacher_dir}, coef=0.7, schedule=direction)
    trainer = RLTrainer(build_recipe(data))
    try:
        batch = _batch(trainer)
        metrics, grads = _step(trainer, batch, 8)
        model, teacher = trainer.model, trainer.paced.teacher.model
        trainer.optimizer.zero_grad(set_to_none=True)
        log_s = F.log_softmax(_completion_logits(model, batch.tokens).double(), -1)
        with torch.no_grad():
            log_t = F.log_softmax(_completion_logits(teacher, batch.tokens).double(), -1)
        if direction == "forward":
            token_kl = (log_t.exp() * (log_t - log_s)).sum(-1)
        else:
            token_kl = (log_s.exp() * (log_s - log_t)).sum(-1)
        mask = batch.rollouts.completion_mask.double()
        per_sequence = (token_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        w = torch.tensor([0.1875] * 4 + [0.25] * 4, dtype=torch.float64)
        hand = 0.7 * (w * per_sequence).sum() / w.sum()
        hand.backward()
    finally:
        trainer.close()
    assert metrics["loss"] == pytest.approx(hand.item(), abs=1e-5)
    assert torch.allclose(grads, _grads(model).float(), atol=1e-5, rtol=0)
    mean_kl = float((token_kl.detach() * mask).sum() / mask.sum())
    assert metrics[f"paced/kl_{direction}"] == pytest.approx(mean_kl, abs=1e-5)
    assert metrics["paced/skipped"] == 0.0


@pytest.mark.parametrize("pg_coef", [0.0, 1.0])
def test_paced_micro_batching_gives_identical_loss_and_gradient(tmp_path, tiny_model_dir, teacher_dir, pg_coef):
    """1×8, 2×4 and 8×1 micro-batches: the Σw normaliser is the step's, not the micro-batch's."""
    data = paced_data(tiny_model_dir, tmp_path, {"name_or_path": teacher_dir}, pg_coef=pg_coef, schedule="reverse")
    trainer = RLTrainer(build_recipe(data))
    try:
        batch = _batch(trainer)
        results = [_step(trainer, batch, size) for size in (8, 4, 1)]
    finally:
        trainer.close()
    (metrics0, grad0), *others = results
    assert grad0.abs().sum() > 0
    for metrics, grad in others:
        assert metrics["loss"] == pytest.approx(metrics0["loss"], abs=1e-6)
        assert metrics["paced/kl_reverse"] == pytest.approx(metrics0["paced/kl_reverse"], abs=1e-6)
        assert torch.allclose(grad, grad0, atol=1e-6, rtol=0)


def test_all_zero_weight_step_is_skipped_and_counted(tmp_path, tiny_model_dir, teacher_dir):
    """Every group at p = 0 or 1: no PACED loss, no NaN; distillation-only makes the step empty."""
    data = paced_data(tiny_model_dir, tmp_path, {"name_or_path": teacher_dir})
    trainer = RLTrainer(build_recipe(data))
    try:
        batch = _batch(trainer, torch.tensor([True] * 4 + [False] * 4))
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        metrics = trainer.optimize(batch, torch.arange(8))
        assert metrics["empty_step"] == 1.0 and metrics["paced/skipped"] == 1.0
        assert metrics["paced/skipped_steps"] == 1.0
        assert trainer.counters["paced_skipped_steps"] == 1 and trainer.counters["empty_steps"] == 1
        for name, value in trainer.model.state_dict().items():
            assert torch.equal(value, before[name]), name
        trainer.policy_loss.pg_coef = 1.0  # with the policy loss the step still trains
        metrics = trainer.accumulate_gradients(batch, torch.arange(8))
        assert "empty_step" not in metrics and torch.isfinite(torch.tensor(metrics["loss"]))
        assert trainer.counters["paced_skipped_steps"] == 2 and "paced/kl_forward" not in metrics
        assert trainer.paced.batch_metrics(batch.rollouts)["paced/share_p1"] == 0.5
    finally:
        trainer.close()


def test_forward_then_reverse_switches_at_the_step(tmp_path, tiny_model_dir, teacher_dir):
    data = paced_data(tiny_model_dir, tmp_path, {"name_or_path": teacher_dir}, schedule="forward_then_reverse",
                      switch_step=1)
    trainer = RLTrainer(build_recipe(data))
    try:
        batch = _batch(trainer)
        first = trainer.accumulate_gradients(batch, torch.arange(8))
        trainer.step = 1
        second = trainer.accumulate_gradients(batch, torch.arange(8))
    finally:
        trainer.close()
    assert "paced/kl_forward" in first and first["paced/reverse"] == 0.0
    assert "paced/kl_reverse" in second and second["paced/reverse"] == 1.0


def test_privileged_teacher_reads_the_solution(tmp_path, tiny_model_dir):
    """Self-distillation: the teacher is the student reading the worked solution before the prompt."""
    data = paced_data(tiny_model_dir, tmp_path, {"privileged": True})
    trainer = RLTrainer(build_recipe(data))
    try:
        batch = _batch(trainer)
        example = trainer.train_examples[0]
        prompt = trainer.paced.teacher.prompts([example], [trainer.train_prompts[0]])[0]
        assert prompt == f"Solution: {example.solution}\n{trainer.train_prompts[0]}"
        assert trainer.paced.teacher.model is None
        teacher_len, student_len = batch.teacher_tokens.prompt_ids.shape[1], batch.tokens.prompt_ids.shape[1]
        assert teacher_len > student_len and torch.equal(batch.teacher_tokens.completion_ids,
                                                         batch.tokens.completion_ids)
        metrics, grads = _step(trainer, batch, 4)
    finally:
        trainer.close()
    assert metrics["loss"] > 0 and grads.abs().sum() > 0


@pytest.mark.parametrize("change, message", [
    ({"teacher": {}}, "needs exactly one of teacher.name_or_path"),
    ({"teacher": {"name_or_path": "/nope", "privileged": True}}, "needs exactly one of"),
    ({"teacher": {"name_or_path": "/nope/teacher"}}, "model directory '/nope/teacher' does not exist"),
    ({"paced": {"schedule": "forward_then_reverse"}}, "algorithm.paced.switch_step: schedule forward_then_reverse"),
    ({"paced": {"schedule": "backward"}}, "algorithm.paced.schedule"),
    ({"paced": {"alpha": -1.0}}, "algorithm.paced.alpha: must be >= 0"),
    ({"paced": {"chunk_size": 0}}, "algorithm.paced.chunk_size: must be >= 1"),
    ({"paced": None, "pg_coef": 0.0}, "algorithm.pg_coef: 0 leaves nothing to train"),
    ({"paced": None}, "teacher: is only used by algorithm.paced"),
    ({"teacher": {"privileged": True, "privileged_template": "{answer} {prompt}"}}, "teacher.privileged_template"),
])
def test_recipe_validation(tmp_path, change, message):
    data = {"teacher": {"privileged": True},
            "algorithm": {"pg_coef": 1.0, "paced": {"schedule": "forward"}}}
    if "teacher" in change:
        data["teacher"] = change["teacher"]
    if "paced" in change:
        data["algorithm"]["paced"] = None if change["paced"] is None else {**data["algorithm"]["paced"],
                                                                            **change["paced"]}
    if "pg_coef" in change:
        data["algorithm"]["pg_coef"] = change["pg_coef"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_recipe(data)


def test_teacher_with_another_vocabulary_is_refused(tmp_path, tiny_model_dir, teacher_dir):
    import shutil

    from rltk.models import build_char_tokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    build_char_tokenizer("0123456789+=").save_pretrained(other)
    data = paced_data(tiny_model_dir, tmp_path / "run", {"name_or_path": str(other)})
    with pytest.raises(ConfigError, match="different vocabulary from the student"):
        RLTrainer(build_recipe(data))

"""The RL trainer end to end on the tiny model: micro-batching invariance, resume, every method,
non-finite steps, checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rltk.validate import build_recipe
from rltk.trainer.checkpoint import latest_checkpoint, list_checkpoints
from rltk.trainer.guard import TrainingError
from rltk.trainer.rl import RLTrainer
from rltk.workflows import VARIANTS, train, variant_data
from tests.conftest import small_recipe_data


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batching_gives_identical_loss_and_gradient(tmp_path, tiny_model_dir, aggregation):
    """1×8, 2×4 and 8×1 micro-batches of one 8-completion step: same loss and gradient (1e-6)."""
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"prompts_per_step": 2},
                             algorithm={"aggregation": aggregation, "terms": [{"name": "kl", "coef": 0.05}],
                                        "advantage": [{"name": "grpo"}, {"name": "zero_variance_filter"}]})
    trainer = RLTrainer(build_recipe(data))
    try:
        torch.manual_seed(3)
        batch = trainer.collect()
        rows = torch.arange(8)
        results = []
        for size in (8, 4, 1):
            trainer.recipe.trainer.micro_batch_size = size
            trainer.optimizer.zero_grad(set_to_none=True)
            metrics = trainer.accumulate_gradients(batch, rows)
            results.append((metrics["loss"], _grads(trainer.model).clone()))
    finally:
        trainer.close()
    (loss0, grad0), *others = results
    assert grad0.abs().sum() > 0
    for loss, grad in others:
        assert abs(loss - loss0) < 1e-6
        assert torch.allclose(grad, grad0, atol=1e-6, rtol=0)


def test_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir):
    """Stopped at step 2 and resumed to step 4 == 4 uninterrupted steps (metrics and weights)."""
    common = {"trainer": {"steps": 4, "save_every": 2, "keep_checkpoints": 5, "prompts_per_step": 4}}
    straight = small_recipe_data(tiny_model_dir, tmp_path / "straight", **common)
    train(build_recipe(straight), evaluate_before=False)

    resumed_dir = tmp_path / "resumed"
    first = small_recipe_data(tiny_model_dir, resumed_dir, **common)
    first["trainer"] = {**first["trainer"], "steps": 2}
    train(build_recipe(first), evaluate_before=False)  # "stops" after its step-2 checkpoint
    second = small_recipe_data(tiny_model_dir, resumed_dir, **common)
    result = train(build_recipe(second), resume=True)
    assert result["start_step"] == 2

    def by_step(path):
        rows = [json.loads(line) for line in Path(path, "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "loss" in r}

    a, b = by_step(tmp_path / "straight"), by_step(resumed_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "reward/mean", "correct/mean", "completion/length_mean", "grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], abs=1e-6), (step, key)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "straight/checkpoints/step-000004/model/model.safetensors"))
    wb = load_file(str(resumed_dir / "checkpoints/step-000004/model/model.safetensors"))
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6), name


def test_partial_checkpoint_is_never_picked(tmp_path, tiny_model_dir):
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"steps": 2, "save_every": 1, "keep_checkpoints": 3})
    train(build_recipe(data), evaluate_before=False)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    partial = tmp_path / "checkpoints" / ".tmp-step-000003"
    shutil.copytree(tmp_path / "checkpoints" / "step-000002", partial)
    (tmp_path / "checkpoints" / "step-000009").mkdir()  # no trainer.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step-000002"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "checkpoints/step-000002/model"))


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"weighted_grpo"}))  # pairing: tests/test_pairing.py
def test_every_method_trains(tmp_path, tiny_model_dir, variant):
    """A few steps of every named method on the tiny model; the update changes the weights."""
    data = variant_data(small_recipe_data(tiny_model_dir, tmp_path), variant)
    result = train(build_recipe(data), evaluate_before=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert all(not isinstance(v, str) for v in row.values()), row  # no NaN/inf strings
    assert 0.0 <= result["after"]["summary"]["pass@k"][1] <= 1.0


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, tiny_model_dir, monkeypatch):
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"steps": 4, "max_bad_steps": 2})
    trainer = RLTrainer(build_recipe(data))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original = trainer.pipeline.per_token_loss

    def poisoned(logps, rollouts, advantages):
        per_token, metrics = original(logps, rollouts, advantages)
        return per_token * float("nan"), metrics

    monkeypatch.setattr(trainer.pipeline, "per_token_loss", poisoned)
    try:
        metrics = trainer.train_batch()
        assert metrics["skipped_nonfinite"] == 1.0
        assert trainer.counters["skipped_nonfinite_steps"] == 1
        for k, v in trainer.model.state_dict().items():
            assert torch.equal(v, before[k]), k  # the bad update was not applied
        with pytest.raises(TrainingError, match="2 consecutive steps"):
            trainer.train_batch()
    finally:
        trainer.close()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_policy_trains_in_training_mode_so_checkpointing_runs(tmp_path, tiny_model_dir, checkpointing):
    """from_pretrained returns eval mode, where transformers skips activation checkpointing: the
    trainer switches the policy to training mode (generation restores it), so with
    model.gradient_checkpointing every decoder layer's forward goes through the checkpoint."""
    data = small_recipe_data(tiny_model_dir, tmp_path, model={"gradient_checkpointing": checkpointing},
                             trainer={"prompts_per_step": 2})
    trainer = RLTrainer(build_recipe(data))
    calls = []
    try:
        batch = trainer.collect()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        assert policy.training
        for layer in policy.model.layers:
            checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
            layer._gradient_checkpointing_func = lambda fn, *a, _c=checkpoint, **k: calls.append(1) or _c(fn, *a, **k)
        trainer.accumulate_gradients(batch, torch.arange(8))
    finally:
        trainer.close()
    assert len(calls) == (len(policy.model.layers) if checkpointing else 0)

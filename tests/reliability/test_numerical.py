"""Non-finite gradients, losses and updates: the update is skipped, counted and logged; K in a row
stop. An update that would make the weights or the optimizer state non-finite (an overflowing lr,
fp16 AdamW's ε underflow, a NaN moment) is never applied, and a checkpoint is never written from
non-finite weights (rltk/trainer/guard.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rltk.validate import build_recipe
from rltk.trainer.guard import TrainingError
from rltk.trainer.rl import RLTrainer
from tests.conftest import small_recipe_data


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_skipped(tmp_path, tiny_model_dir, poison, caplog):
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"steps": 4, "max_bad_steps": 2})
    trainer = RLTrainer(build_recipe(data))
    try:
        param = next(p for p in trainer.model.parameters() if p.requires_grad)
        handle = param.register_hook(lambda grad: grad * poison)  # the loss stays finite
        before = param.detach().clone()
        metrics = trainer.train_batch()
        assert metrics["skipped_nonfinite"] == 1.0
        assert trainer.counters["skipped_nonfinite_steps"] == 1
        assert torch.equal(param.detach(), before)
        assert "non-finite loss or gradient" in caplog.text
        handle.remove()
        metrics = trainer.train_batch()  # a good step resets the count
        assert "skipped_nonfinite" not in metrics and trainer.guard.bad_steps == 0
        assert not torch.equal(param.detach(), before)
        handle = param.register_hook(lambda grad: grad * poison)
        trainer.train_batch()
        with pytest.raises(TrainingError, match="2 consecutive steps"):
            trainer.train_batch()
    finally:
        trainer.close()


# ---------------------------------------------------------------- the updated weights (the shadow step)
def _weights_and_state(trainer) -> dict:
    """Clones of the trainable weights and of every optimizer state tensor."""
    from rltk.trainer.guard import base_optimizer

    out = {f"w{i}": p.detach().clone() for i, p in enumerate(trainer.model.parameters()) if p.requires_grad}
    base = base_optimizer(trainer.optimizer)
    for i, state in enumerate(base.state.values()):
        out.update({f"s{i}.{k}": v.detach().clone() for k, v in state.items() if torch.is_tensor(v)})
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_update_that_overflows_the_weights_is_skipped(tmp_path, tiny_model_dir, caplog):
    """``trainer.lr: 1e38``: AdamW's first step would move every weight by lr / (1 − β1) = 1e39, past
    float32's range. The guard's shadow step sees it, the real step never runs: weights unchanged,
    no optimizer state created, the step counted like a non-finite loss; 2 in a row stop."""
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"steps": 4, "max_bad_steps": 2, "lr": 1e38})
    trainer = RLTrainer(build_recipe(data))
    try:
        before = _weights_and_state(trainer)
        metrics = trainer.train_batch()
        assert metrics["skipped_nonfinite"] == 1.0 and trainer.counters["skipped_nonfinite_steps"] == 1
        assert metrics["grad_norm"] > 0  # a real gradient: only the update was bad
        _assert_same(before, _weights_and_state(trainer))
        assert "the update would make the weights or the optimizer state non-finite" in caplog.text
        with pytest.raises(TrainingError, match="2 consecutive steps"):
            trainer.train_batch()
        _assert_same(before, _weights_and_state(trainer))
    finally:
        trainer.close()


def test_bad_update_keeps_weights_and_optimizer_state_then_training_goes_on(tmp_path, tiny_model_dir):
    """After good steps (Adam moments exist), an lr that overflows: the pre-step weights *and*
    moments are kept bit for bit; back at a sane lr the next step applies and resets the count."""
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"steps": 4, "max_bad_steps": 2})
    trainer = RLTrainer(build_recipe(data))
    try:
        trainer.train_batch()
        before = _weights_and_state(trainer)
        assert any(k.startswith("s") for k in before)  # moments exist
        for group in trainer.optimizer.param_groups:
            group["lr"] = 1e38
        metrics = trainer.train_batch()
        assert metrics["skipped_nonfinite"] == 1.0 and trainer.guard.bad_steps == 1
        _assert_same(before, _weights_and_state(trainer))
        for group in trainer.optimizer.param_groups:
            group["lr"] = 1e-3
        metrics = trainer.train_batch()
        assert "skipped_nonfinite" not in metrics and trainer.guard.bad_steps == 0
        after = _weights_and_state(trainer)
        assert not torch.equal(after["w0"], before["w0"])
        assert all(torch.isfinite(v).all() for v in after.values())
    finally:
        trainer.close()


def test_nan_optimizer_state_never_reaches_the_weights_or_a_checkpoint(tmp_path, tiny_model_dir):
    """A NaN in Adam's second moment (as an fp16 overflow leaves it): every update is skipped (the
    weights stay finite), a checkpoint is refused with one line and the previous one is kept, and
    ``max_bad_steps`` skipped steps stop training."""
    from safetensors.torch import load_file

    from rltk.trainer.checkpoint import latest_checkpoint
    from rltk.trainer.guard import base_optimizer

    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"steps": 4, "max_bad_steps": 2, "save_every": 1})
    trainer = RLTrainer(build_recipe(data))
    try:
        trainer.train_batch()
        good = trainer.save()
        state = next(iter(base_optimizer(trainer.optimizer).state.values()))
        state["exp_avg_sq"].view(-1)[0] = float("nan")
        weights = {k: v for k, v in _weights_and_state(trainer).items() if k.startswith("w")}
        metrics = trainer.train_batch()
        assert metrics["skipped_nonfinite"] == 1.0 and trainer.counters["skipped_nonfinite_steps"] == 1
        after = {k: v for k, v in _weights_and_state(trainer).items() if k.startswith("w")}
        _assert_same(weights, after)
        with pytest.raises(TrainingError) as info:
            trainer.save()
        message = str(info.value)
        assert message.startswith("step 2: refusing to save a checkpoint: the weights or the optimizer state hold "
                                  "NaN or inf") and "\n" not in message
        assert f"the last good checkpoint {good} is kept" in message
        assert latest_checkpoint(tmp_path) == good
        assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # refused before anything was written
        saved = load_file(str(good / "model" / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in saved.values())
        with pytest.raises(TrainingError, match="2 consecutive steps"):
            trainer.train_batch()
    finally:
        trainer.close()


def test_nan_weights_are_never_saved(tmp_path, tiny_model_dir):
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"steps": 4})
    trainer = RLTrainer(build_recipe(data))
    try:
        param = next(p for p in trainer.model.parameters() if p.requires_grad)
        with torch.no_grad():
            param.view(-1)[3] = float("inf")
        with pytest.raises(TrainingError, match="^step 0: refusing to save a checkpoint: .*; no checkpoint was "
                                                "written yet$"):
            trainer.save()
        assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
    finally:
        trainer.close()


# ---------------------------------------------------------------- the guard alone
def _linear(dtype=torch.float32, lr=1e-2, weight_decay=0.01):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


FINE = {"loss": 1.0, "grad_norm": 1.0}


@pytest.mark.parametrize("chunk", [1, 5, 2**24])
def test_guarded_steps_equal_plain_adamw(chunk):
    """The shadow step (any chunk size, slices of tensors included) leaves the real optimizer alone:
    guarded steps give bit-identical weights and moments to plain AdamW steps."""
    import copy

    from rltk.trainer.guard import NonFiniteGuard

    model, optimizer, scheduler = _linear()
    plain = copy.deepcopy(model)
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.01)
    guard = NonFiniteGuard(2, "", chunk_elements=chunk)
    for step in range(3):
        for p, q in zip(model.parameters(), plain.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        assert guard.step(optimizer, scheduler, dict(FINE), step + 1)
        plain_optimizer.step()
        for p, q in zip(model.parameters(), plain.parameters()):
            assert torch.equal(p, q)
        for a, b in zip(optimizer.state.values(), plain_optimizer.state.values()):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_adamw_on_a_zero_gradient_step_is_skipped():
    """Pure fp16 AdamW with an all-zero gradient (every reward equal): ε = 1e-8 underflows to 0 in
    fp16, so m / (√v + ε) = 0 / 0 would turn every weight NaN. The step is skipped instead."""
    from rltk.trainer.guard import NonFiniteGuard

    model, optimizer, scheduler = _linear(torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    metrics = {"loss": 0.0, "grad_norm": 0.0}
    assert not NonFiniteGuard(2, "").step(optimizer, scheduler, metrics, 1)
    assert metrics["skipped_nonfinite"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state  # no moments were created either
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("lr", [float("inf"), 1e39])
def test_infinite_or_overflowing_lr_is_skipped(lr):
    from rltk.trainer.guard import NonFiniteGuard

    model, optimizer, scheduler = _linear(lr=lr)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    assert not NonFiniteGuard(2, "").step(optimizer, scheduler, dict(FINE), 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------- DeepSpeed
@pytest.mark.distributed
def test_deepspeed_step_with_nonfinite_result_stops_and_is_never_saved(tmp_path, tiny_model_dir, deepspeed_ops):
    """ZeRO-2 on 2 processes: the engine applies the update inside the last backward, so the guard
    checks every rank's fp32 master partition and Adam state right after it. A NaN on one rank
    stops both ranks with the same one line, and the checkpoint after it is refused."""
    import json

    from rltk.trainer.checkpoint import latest_checkpoint
    from tests.test_deepspeed import cpu_config, launch_deepspeed

    data = small_recipe_data(tiny_model_dir, tmp_path / "run", trainer={"steps": 4, "prompts_per_step": 4})
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(data))
    worker = str(Path(__file__).with_name("guard_worker.py"))
    launch_deepspeed(cpu_config(tmp_path, "zero2"), [worker, str(recipe), str(tmp_path / "out.json")])
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["world"] == 2 and result["base"] == "AdamW"
    assert 0 < result["partition"] < result["total"]  # the guard sees this rank's ZeRO partition
    assert result["step"].startswith("step 2: the optimizer step left non-finite weights or optimizer state; "
                                     "DeepSpeed applies the update inside its engine, so it cannot be undone")
    # the failed step was not counted, so the refused checkpoint would have replaced step-000001
    assert result["save"].startswith("step 1: refusing to save a checkpoint: the weights or the optimizer state "
                                     "hold NaN or inf")
    assert f"the last good checkpoint {result['good']} is kept" in result["save"]
    assert latest_checkpoint(tmp_path / "run").name == "step-000001"


@pytest.mark.distributed
def test_deepspeed_step_that_overflows_inside_the_engine_stops_with_one_line(tmp_path, tiny_model_dir, deepspeed_ops):
    """``trainer.lr: 1e38`` under ZeRO-2 on CPU: DeepSpeed's torch AdamW raises an overflow inside
    the engine's step (in the last backward), after part of the update is written; the run stops
    with one line instead of a traceback."""
    import json

    from tests.test_deepspeed import cpu_config, launch_deepspeed

    data = small_recipe_data(tiny_model_dir, tmp_path / "run", trainer={"steps": 4, "prompts_per_step": 4,
                                                                       "lr": 1e38})
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(data))
    worker = str(Path(__file__).with_name("guard_worker.py"))
    launch_deepspeed(cpu_config(tmp_path, "zero2"), [worker, str(recipe), str(tmp_path / "out.json"), "overflow"])
    message = json.loads((tmp_path / "out.json").read_text())["step"]
    assert message.startswith("step 1: the optimizer step overflowed inside DeepSpeed's engine ("), message
    assert "the update cannot be undone" in message and "\n" not in message

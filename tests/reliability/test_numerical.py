"""Non-finite gradients and losses: the update is skipped, counted and logged; K in a row stop."""
from __future__ import annotations

import pytest
import torch

from rltk.config import build_recipe
from rltk.trainer.rl import RLTrainer, TrainingError
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

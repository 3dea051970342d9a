"""The examples of docs/extending.md run as written: through the pipeline and a tiny RL run."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from rltk.algos import Advantages, AlgorithmPipeline, Rollouts
from rltk.validate import build_recipe
from tests.conftest import small_recipe_data

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _write_module(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(# my_stages\.py.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    for block in blocks:  # each example stays under 30 lines
        assert len(block.strip().splitlines()) < 30
    (tmp_path / "my_stages.py").write_text("\n".join(blocks))
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("my_stages", None)


def test_doc_examples_compute_expected_values(tmp_path):
    _write_module(tmp_path)
    pipeline = AlgorithmPipeline([{"name": "my_stages:short_grpo", "bonus": 0.5}],
                                 {"name": "my_stages:clipped_reinforce", "max_abs": 0.5})
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    rollouts = Rollouts(group_ids=torch.zeros(4, dtype=torch.long), rewards=torch.tensor([1.0, 1, 0, 0]),
                        correct=torch.tensor([True, True, False, False]), completion_mask=mask,
                        truncated=torch.zeros(4, dtype=torch.bool))
    advantages, metrics = pipeline.compute_advantages(rollouts)
    # lengths [2,3,1,3], mean 2.25: only completion 0 is correct and short -> shaped [1.5, 1, 0, 0]
    shaped = torch.tensor([1.5, 1.0, 0.0, 0.0])
    expected = (shaped - shaped.mean()) / (shaped.std() + 1e-6)
    assert torch.allclose(advantages.values, expected, atol=1e-6)
    assert metrics["my_stages:short_grpo/bonus_share"] == 0.25
    logps = torch.zeros(4, 3, requires_grad=True)
    per_token, token_metrics = pipeline.per_token_loss(logps, rollouts, advantages)
    per_token.sum().backward()
    assert torch.allclose(logps.grad[:, 0], -expected.clamp(-0.5, 0.5), atol=1e-6)
    # |A| = [1.167, 0.5 - 1e-6, 0.833, 0.833]: completion 1 sits just inside the clip
    assert token_metrics["my_stages:clipped_reinforce/clipped"][:, 0].tolist() == [1.0, 0.0, 1.0, 1.0]


def test_doc_examples_train(tmp_path, tiny_model_dir):
    _write_module(tmp_path)
    from rltk.workflows import train

    data = small_recipe_data(tiny_model_dir, tmp_path / "run", algorithm={
        "advantage": [{"name": "my_stages:short_grpo", "bonus": 0.2}],
        "loss": {"name": "my_stages:clipped_reinforce", "max_abs": 1.5}})
    result = train(build_recipe(data), evaluate_before=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any("my_stages:clipped_reinforce/clipped" in line for line in lines)
    assert Path(result["model_dir"], "config.json").is_file()


def test_a_typed_parameter_is_checked_when_the_recipe_loads(tmp_path, tiny_model_dir):

    from rltk.schema import ConfigError

    _write_module(tmp_path)
    data = small_recipe_data(tiny_model_dir, tmp_path / "run", algorithm={
        "advantage": [{"name": "my_stages:short_grpo"}], "loss": {"name": "my_stages:clipped_reinforce",
                                                                    "max_abs": "abc"}})
    with pytest.raises(ConfigError, match=r"algorithm\.loss\.max_abs \(loss 'my_stages:clipped_reinforce'\).*float"):
        build_recipe(data)
    data["algorithm"]["loss"]["max_abs"] = "1e-1"  # YAML 1.1 reads 1e-1 as a string: the annotation makes it a float
    assert build_recipe(data).algorithm_stages.pipeline.loss.params["max_abs"] == 0.1


def test_doc_loss_component_adds_its_own_normalised_gradient(tmp_path, tiny_model_dir):
    """The CorrectSFT component of docs/extending.md: with it, the step's gradient grows by exactly
    coef × ∇(−Σ logp over correct tokens) / (number of correct tokens), and its metric is that mean."""
    from dataclasses import replace

    from rltk.trainer.logprobs import forward_logps
    from rltk.trainer.rl import RLTrainer

    block = re.search(r"```python\n(# my_components\.py.*?)```", DOC.read_text(), flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "my_components.py", "exec"), namespace)
    trainer = RLTrainer(build_recipe(small_recipe_data(tiny_model_dir, tmp_path / "run")))
    try:
        batch = trainer.collect()
        n = batch.rollouts.num_completions
        correct = torch.arange(n) % 3 == 0  # a fixed pattern: the tiny model is rarely right on its own
        batch.rollouts = replace(batch.rollouts, correct=correct)
        rows = torch.arange(n)
        params = [p for p in trainer.model.parameters() if p.requires_grad]

        def gradient() -> torch.Tensor:
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.accumulate_gradients(batch, rows)
            return torch.cat([p.grad.flatten() for p in params])

        without = gradient()
        trainer.loss_components.append(namespace["CorrectSFT"](trainer, coef=0.5))
        trainer.optimizer.zero_grad(set_to_none=True)
        metrics = trainer.accumulate_gradients(batch, rows)
        with_component = torch.cat([p.grad.flatten() for p in params])
        trainer.optimizer.zero_grad(set_to_none=True)
        out = forward_logps(trainer.model, batch.tokens.rows(rows), trainer.recipe.rollout.temperature,
                            options=trainer.forward_options)
        mask = batch.rollouts.completion_mask * correct.float().unsqueeze(-1)
        nll = -(out.logps * mask).sum()
        (0.5 * nll / mask.sum()).backward()
        direct = torch.cat([p.grad.flatten() for p in params])
        assert torch.allclose(with_component - without, direct, atol=1e-6, rtol=1e-4)
        assert metrics["correct_sft/nll"] == pytest.approx(float(nll) / float(mask.sum()), rel=1e-5)
    finally:
        trainer.close()

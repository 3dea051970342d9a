"""2-process DDP over gloo: the step loss and gradient equal the 1-process ones."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import PACED_CORRECT, launch_with_free_port, small_recipe_data

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "step_worker.py"


def _launch(nproc: int, recipe: Path, out: Path, *extra: str) -> dict:
    """``torch.distributed.run`` of the step worker on a free port; a failure shows its stderr."""
    def command(port: int) -> tuple[list[str], dict]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_PORT": str(port),
               "ACCELERATE_USE_CPU": "true"}  # accelerate's MULTI_CPU (gloo) needs this without CUDA
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={port}", str(WORKER), str(recipe), str(out), *extra], env

    launch_with_free_port(command)
    return json.loads(out.read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_ddp_two_processes_match_one(tmp_path, tiny_model_dir, aggregation):
    data = small_recipe_data(tiny_model_dir, tmp_path / "run", trainer={"prompts_per_step": 4, "micro_batch_size": 4},
                             algorithm={"aggregation": aggregation})
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(data))
    one = _launch(1, recipe, tmp_path / "one.json")
    two = _launch(2, recipe, tmp_path / "two.json")
    assert two["world"] == 2
    assert abs(one["loss"] - two["loss"]) < 1e-6
    diff = max(abs(a - b) for a, b in zip(one["grad"], two["grad"]))
    assert diff < 1e-6
    assert max(abs(a) for a in one["grad"]) > 0


@pytest.mark.distributed
def test_ddp_paced_two_processes_match_one(tmp_path, tiny_model_dir):
    """PACED's Σw is the step's over both ranks (here 0.4375 on rank 0 and 0.1875 on rank 1)."""
    from rltk.schema import TinyModelConfig
    from rltk.models import build_tiny_model

    teacher = build_tiny_model(tmp_path / "teacher", TinyModelConfig(hidden_size=64, num_heads=2, seed=1))
    data = small_recipe_data(tiny_model_dir, tmp_path / "run", trainer={"prompts_per_step": 4, "micro_batch_size": 4},
                             algorithm={"paced": {"schedule": "reverse", "coef": 0.5}})
    data["teacher"] = {"name_or_path": str(teacher)}
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(data))
    one = _launch(1, recipe, tmp_path / "one.json", "grad", PACED_CORRECT)
    two = _launch(2, recipe, tmp_path / "two.json", "grad", PACED_CORRECT)
    assert two["world"] == 2
    assert abs(one["loss"] - two["loss"]) < 1e-6
    assert max(abs(a - b) for a, b in zip(one["grad"], two["grad"])) < 1e-6

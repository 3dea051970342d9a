"""kill -9 at random points and inside a checkpoint write; NaN losses until training stops.

A resumed run must start from the newest *complete* checkpoint and end with the same metrics and
weights as an uninterrupted run; a stopped run must leave its last good checkpoint intact.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rltk.trainer.checkpoint import latest_checkpoint, list_checkpoints
from tests.conftest import small_recipe_data

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fault_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _recipe(tmp_path: Path, model_dir: str, run: str) -> Path:
    data = small_recipe_data(model_dir, tmp_path / run, trainer={"steps": 4, "save_every": 1, "keep_checkpoints": 10})
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _rltk(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rltk", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "loss" in r}
    assert len(steps) == len([r for r in rows if "loss" in r]), "a step was logged twice"
    return steps


def _same_run(a: Path, b: Path) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert sorted(ma) == sorted(mb) == [1, 2, 3, 4]
    for step in ma:
        for key in ("loss", "reward/mean", "completion/length_mean", "grad_norm"):
            assert ma[step][key] == pytest.approx(mb[step][key], abs=1e-6), (step, key)
    ra = json.loads((a / "result.json").read_text())["after"]
    rb = json.loads((b / "result.json").read_text())["after"]
    assert ra["pass@k"] == rb["pass@k"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("straight")
    start = time.perf_counter()
    _rltk("train", _recipe(tmp, tiny_model_dir, "run"))
    UNINTERRUPTED_SECONDS.append(time.perf_counter() - start)
    return tmp / "run"


UNINTERRUPTED_SECONDS: list[float] = []  # wall time of the uninterrupted run, for kill points within a run


def test_kill_inside_checkpoint_write_then_resume(tmp_path, tiny_model_dir, uninterrupted):
    recipe = _recipe(tmp_path, tiny_model_dir, "run")
    proc = subprocess.run([sys.executable, str(WORKER), "kill_in_checkpoint", "3", "--", "train", str(recipe)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(run)] == [1, 2]
    partial = run / "checkpoints" / ".tmp-step-000003"
    assert (partial / "model").is_dir() and not (partial / "trainer.json").exists()
    assert latest_checkpoint(run).name == "step-000002"
    result = _rltk("train", recipe, "--resume")
    assert "done: final model" in result.stdout
    assert not partial.exists()  # stale partial checkpoints are cleaned up
    _same_run(uninterrupted, run)


def test_kill_at_random_points_then_resume(tmp_path, tiny_model_dir, uninterrupted):
    recipe = _recipe(tmp_path, tiny_model_dir, "run")
    rng = random.Random(7)
    kills = 0
    whole = UNINTERRUPTED_SECONDS[0]  # kill points are fractions of a whole run, however fast the machine
    for attempt in range(3):
        args = [sys.executable, "-m", "rltk", "train", str(recipe)] + (["--resume"] if attempt else [])
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.8) * whole)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 1
    _rltk("train", recipe, "--resume")
    _same_run(uninterrupted, tmp_path / "run")


def test_nan_losses_stop_training_with_last_good_checkpoint(tmp_path, tiny_model_dir):
    data = small_recipe_data(tiny_model_dir, tmp_path / "run",
                             trainer={"steps": 6, "save_every": 1, "keep_checkpoints": 10, "max_bad_steps": 2})
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, str(WORKER), "nan_loss_from", "2", "--", "train", str(recipe)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rltk: training stopped: 2 consecutive steps with a non-finite loss or gradient")
    assert "Traceback" not in proc.stderr
    run = tmp_path / "run"
    # steps 1 and 2 are good (batch index 0 and 1), steps 3 and 4 are NaN and skipped
    assert [s for s, _ in list_checkpoints(run)] == [1, 2, 3]
    rows = _metrics(run)
    assert rows[3]["skipped_nonfinite"] == 1.0 and "skipped_nonfinite" not in rows[2]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(latest_checkpoint(run) / "model"))
    assert all(p.isfinite().all() for p in model.parameters())

"""2-process DeepSpeed runs on CPU over gloo (ZeRO-2, ZeRO-3, ZeRO-3 + LoRA) against 1 process.

Each DeepSpeed run uses the deepspeed_config section of the shipped GPU config
(``launch/zero2.yaml``, ``launch/zero3.yaml``), made CPU-runnable only in what a CPU needs: two
processes and no bf16. One optimizer step (``RLTrainer.optimize``) with two micro-batches per rank
must give the 1-process loss, gradient norm and updated weights: that checks rltk's
micro-batch accumulation against DeepSpeed's boundaries, the global normaliser, DeepSpeed's
averaging, clipping and the single optimizer step. A ZeRO-2 run saved at step 1 and resumed must
then reproduce the uninterrupted run's step-2 metrics and final weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import small_recipe_data

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "step_worker.py"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _env(port: int, **extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_PORT": str(port),
           "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", **extra}
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently turn DeepSpeed off
    return env


def cpu_config(tmp_path: Path, name: str) -> Path:
    """``launch/<name>.yaml`` with 2 processes and fp32: what differs on a CPU machine."""
    cfg = yaml.safe_load((ROOT / "launch" / f"{name}.yaml").read_text())
    cfg.update(num_processes=2, mixed_precision="no")
    out = tmp_path / f"{name}-cpu.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]


def launch_deepspeed(config: Path, port: int, script: list[str]) -> None:
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
          "--main_process_port", str(port), *script], _env(port))


def launch_single(port: int, script: list[str]) -> None:
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
          f"--master_port={port}", *script], _env(port, ACCELERATE_USE_CPU="true"))


def _step_recipe(tmp_path: Path, model_dir: str, name: str, lora: bool) -> Path:
    # 4 prompts × 4 samples: 8 completions per rank in 2 micro-batches of 4; a small clip so it acts
    model = {"name_or_path": model_dir, **({"lora": LORA} if lora else {})}
    data = small_recipe_data(model_dir, tmp_path / name, model=model,
                             trainer={"prompts_per_step": 4, "micro_batch_size": 4, "max_grad_norm": 0.05})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def _compare(one: dict, two: dict, zero: int) -> None:
    assert two["world"] == 2 and two["zero_stage"] == zero and one["zero_stage"] == 0
    assert two["micro_batches"] == 2 and one["micro_batches"] == 4
    assert abs(one["loss"] - two["loss"]) < 1e-6, (one["loss"], two["loss"])
    assert one["grad_norm"] > 0.05  # clipping was active
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-5 * one["grad_norm"], (one["grad_norm"], two["grad_norm"])
    assert one["weight_names"] == two["weight_names"]
    diff = max(abs(a - b) for a, b in zip(one["weights"], two["weights"]))
    assert diff < 1e-5, diff  # lr is 1e-3: a second Adam step or a missing one would move weights by ~1e-3


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, tiny_model_dir):
    """1-process results, full fine-tuning and LoRA, computed once for the module."""
    tmp = tmp_path_factory.mktemp("one")
    out = {}
    for name, lora, port in (("full", False, 29611), ("lora", True, 29612)):
        recipe = _step_recipe(tmp, tiny_model_dir, name, lora)
        launch_single(port, [str(WORKER), str(recipe), str(tmp / f"{name}.out.json"), "step"])
        out[name] = json.loads((tmp / f"{name}.out.json").read_text())
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("config,zero,lora,port", [("zero2", 2, False, 29621), ("zero3", 3, False, 29623),
                                                   ("zero3", 3, True, 29625)],
                         ids=["zero2", "zero3", "zero3_lora"])
def test_deepspeed_two_processes_match_one(tmp_path, tiny_model_dir, baselines, config, zero, lora, port):
    recipe = _step_recipe(tmp_path, tiny_model_dir, "run", lora)
    launch_deepspeed(cpu_config(tmp_path, config), port, [str(WORKER), str(recipe), str(tmp_path / "two.json"), "step"])
    _compare(baselines["lora" if lora else "full"], json.loads((tmp_path / "two.json").read_text()), zero)

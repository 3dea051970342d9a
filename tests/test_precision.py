"""Training precision (rltk/precision.py): a bf16-declared recipe trains float32 master
weights with float32 optimizer state under bf16 autocast — on 1 process, DDP and ZeRO-2 — so an
update at lr 1e-6 moves the weights; pure bf16 exists only as ``model.pure_bf16`` and leaves most
of them unchanged (which is why it is not the default)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from rltk.schema import ConfigError

from rltk.validate import build_recipe
from tests.conftest import launch_with_free_port, small_recipe_data
from tests.test_deepspeed import cpu_config, launch_deepspeed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "precision_worker.py"


def _recipe(tmp_path: Path, model_dir: str, name: str, **model) -> Path:
    data = small_recipe_data(model_dir, tmp_path / name, model={"dtype": "bfloat16", **model},
                             trainer={"steps": 2, "prompts_per_step": 4, "micro_batch_size": 8, "lr": 1e-6})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def _launch_ddp(nproc: int, recipe: Path, out: Path) -> dict:
    def command(port: int) -> tuple[list[str], dict]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_PORT": str(port),
               "ACCELERATE_USE_CPU": "true"}
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={port}", str(WORKER), str(recipe), str(out)], env

    launch_with_free_port(command)  # a free port; a failure shows the run's stderr
    return json.loads(out.read_text())


def _assert_mixed(result: dict, world: int, zero: int) -> None:
    assert result["world"] == world and result["zero_stage"] == zero
    assert result["mixed_precision"] == "bf16"
    assert result["master_dtypes"] == ["torch.float32"]
    assert result["state_dtypes"] == ["torch.float32"]
    # lr 1e-6 on float32 masters: essentially every weight with a gradient moves (bf16 weights: ~2%)
    assert result["changed_share"] > 0.9, result


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2], ids=["one_process", "ddp"])
def test_bf16_recipe_trains_float32_masters(tmp_path, tiny_model_dir, nproc):
    result = _launch_ddp(nproc, _recipe(tmp_path, tiny_model_dir, "mixed"), tmp_path / "out.json")
    _assert_mixed(result, nproc, 0)


@pytest.mark.distributed
def test_bf16_recipe_under_zero2_keeps_float32_masters(tmp_path, tiny_model_dir, deepspeed_ops):
    config = cpu_config(tmp_path, "zero2")
    launch_deepspeed(config, [str(WORKER), str(_recipe(tmp_path, tiny_model_dir, "zero2")), str(tmp_path / "out.json")])
    _assert_mixed(json.loads((tmp_path / "out.json").read_text()), 2, 2)


@pytest.mark.distributed
def test_pure_bf16_is_explicit_and_loses_most_small_updates(tmp_path, tiny_model_dir):
    result = _launch_ddp(1, _recipe(tmp_path, tiny_model_dir, "pure", pure_bf16=True), tmp_path / "out.json")
    assert result["master_dtypes"] == ["torch.bfloat16"]
    assert result["changed_share"] < 0.5, result  # most lr-1e-6 updates round away in bf16


def test_pure_bf16_needs_a_bf16_dtype(tiny_model_dir, tmp_path):
    data = small_recipe_data(tiny_model_dir, tmp_path, model={"dtype": "float32", "pure_bf16": True})
    with pytest.raises(ConfigError, match="model.pure_bf16"):
        build_recipe(data)


def test_trainable_weights_load_float32_frozen_ones_in_the_recipe_dtype(tiny_model_dir):
    from rltk.schema import LoraConfig, ModelConfig
    from rltk.models import load_model

    cfg = ModelConfig(name_or_path=tiny_model_dir, dtype="bfloat16")
    assert {p.dtype for p in load_model(tiny_model_dir, cfg).parameters()} == {torch.float32}
    assert {p.dtype for p in load_model(tiny_model_dir, cfg, trainable=False).parameters()} == {torch.bfloat16}
    lora = ModelConfig(name_or_path=tiny_model_dir, dtype="bfloat16",
                       lora=LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"]))
    model = load_model(tiny_model_dir, lora)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}  # adapters are masters, the base is frozen


def test_bf16_trainable_weights_without_the_switch_are_refused(tiny_model_dir):
    from rltk.schema import ModelConfig
    from rltk.precision import check_master_weights

    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.raises(ConfigError, match="pure_bf16"):
        check_master_weights(model, ModelConfig(dtype="bfloat16"))
    check_master_weights(model, ModelConfig(dtype="bfloat16", pure_bf16=True))

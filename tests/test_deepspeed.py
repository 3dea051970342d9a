"""2-process DeepSpeed runs on CPU over gloo (ZeRO-2, ZeRO-3, ZeRO-3 + LoRA, ZeRO-3 offload) against 1 process.

Each DeepSpeed run uses the deepspeed_config section of the shipped GPU config
(``launch/zero2.yaml``, ``launch/zero3.yaml``, ``launch/zero3_offload.yaml``), made CPU-runnable only in what a CPU needs: two
processes and no bf16. One optimizer step (``RLTrainer.optimize``) with two micro-batches per rank
must give the 1-process loss, gradient norm and updated weights: that checks rltk's
micro-batch accumulation against DeepSpeed's boundaries, the global normaliser, DeepSpeed's
averaging, clipping and the single optimizer step. A ZeRO-2 run saved at step 1 and resumed must
then reproduce the uninterrupted run's step-2 metrics and final weights.

Every run gets a free port (``tests.conftest.free_port``) and shows its stderr when it fails;
DeepSpeed's CPU ops are compiled once, before the first timed run (the ``deepspeed_ops`` fixture).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PACED_CORRECT, build_deepspeed_ops, launch_with_free_port, small_recipe_data

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


def launch_deepspeed(config: Path, script: list[str]) -> None:
    """``accelerate launch`` of ``script`` on a free port; DeepSpeed's CPU ops are compiled first
    (once per session, outside this run's timeout); a failure shows the run's stderr."""
    build_deepspeed_ops()
    launch_with_free_port(lambda port: ([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                         str(config), "--main_process_port", str(port), *script], _env(port)))


def launch_single(script: list[str]) -> None:
    launch_with_free_port(lambda port: ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                                         "--master_addr=127.0.0.1", f"--master_port={port}", *script],
                                        _env(port, ACCELERATE_USE_CPU="true")))


def _step_recipe(tmp_path: Path, model_dir: str, name: str, lora: bool, teacher: dict | None = None) -> Path:
    # 4 prompts × 4 samples: 8 completions per rank in 2 micro-batches of 4; a small clip so it acts;
    # a KL term so the reference model (a separate frozen model, or the adapter disabled) is used;
    # with ``teacher``, PACED (reverse KL) on top of the policy loss
    model = {"name_or_path": model_dir, **({"lora": LORA} if lora else {})}
    algorithm = {"terms": [{"name": "kl", "coef": 0.1}]}
    if teacher is not None:
        algorithm["paced"] = {"schedule": "reverse", "coef": 0.5}
    data = small_recipe_data(model_dir, tmp_path / name, model=model,
                             trainer={"prompts_per_step": 4, "micro_batch_size": 4, "max_grad_norm": 0.05},
                             algorithm=algorithm)
    if teacher is not None:
        data["teacher"] = teacher
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
    # the saved HF-format models (gathered from the ZeRO shards; merged under LoRA) are equal too
    wa, wb = _exported(one["checkpoint"]), _exported(two["checkpoint"])
    assert sorted(wa) == sorted(wb)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert Path(one["checkpoint"], "adapter").is_dir() == Path(two["checkpoint"], "adapter").is_dir()


def _exported(checkpoint: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(checkpoint) / "model")
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, tiny_model_dir):
    """1-process results, full fine-tuning and LoRA, computed once for the module."""
    tmp = tmp_path_factory.mktemp("one")
    out = {}
    for name, lora in (("full", False), ("lora", True)):
        recipe = _step_recipe(tmp, tiny_model_dir, name, lora)
        launch_single([str(WORKER), str(recipe), str(tmp / f"{name}.out.json"), "step"])
        out[name] = json.loads((tmp / f"{name}.out.json").read_text())
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("config,zero,lora", [("zero2", 2, False), ("zero3", 3, False), ("zero3", 3, True),
                                              ("zero3_offload", 3, False)],
                         ids=["zero2", "zero3", "zero3_lora", "zero3_offload"])
def test_deepspeed_two_processes_match_one(tmp_path, tiny_model_dir, baselines, deepspeed_ops, config, zero, lora):
    recipe = _step_recipe(tmp_path, tiny_model_dir, "run", lora)
    launch_deepspeed(cpu_config(tmp_path, config), [str(WORKER), str(recipe), str(tmp_path / "two.json"), "step"])
    _compare(baselines["lora" if lora else "full"], json.loads((tmp_path / "two.json").read_text()), zero)


@pytest.mark.distributed
def test_zero3_token_budget_packing_and_drop_finished_match_one_process(tmp_path, tiny_model_dir, deepspeed_ops):
    """ZeRO-3 on 2 processes, forwards of at most 60 tokens packed without padding, rollouts from
    rltk's decode loop (``rollout.drop_finished``) on the gathered weights: the loss, the gradient
    norm and the updated weights of 1 process with 4-row padded micro-batches and the same decode
    loop. Each process runs as many forwards (ZeRO-3 gathers the weights in every one), even when
    its rows need fewer."""
    path = _step_recipe(tmp_path, tiny_model_dir, "budget", False)
    data = json.loads(path.read_text())
    data["data"]["max_prompt_length"] = 40  # every prompt of the task is shorter: the same rows are kept
    data["rollout"]["drop_finished"] = True
    path.write_text(json.dumps(data))
    launch_single([str(WORKER), str(path), str(tmp_path / "one.json"), "step"])
    data["trainer"].update(max_tokens_per_micro_batch=60, padding_free=True, output_dir=str(tmp_path / "budget2"))
    path.write_text(json.dumps(data))
    launch_deepspeed(cpu_config(tmp_path, "zero3"), [str(WORKER), str(path), str(tmp_path / "two.json"), "step"])
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert two["world"] == 2 and two["zero_stage"] == 3 and two["micro_batches"] > 2
    assert abs(one["loss"] - two["loss"]) < 1e-6, (one["loss"], two["loss"])
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-5 * one["grad_norm"]
    assert max(abs(a - b) for a, b in zip(one["weights"], two["weights"])) < 1e-5


def _by_step(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.distributed
def test_zero2_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, deepspeed_ops):
    """ZeRO-2 on 2 processes: stopped after step 1's checkpoint and resumed == 2 straight steps."""
    config = cpu_config(tmp_path, "zero2")

    def recipe(run: str, steps: int) -> Path:
        data = small_recipe_data(tiny_model_dir, tmp_path / run, trainer={"steps": steps, "save_every": 1,
                                                                         "keep_checkpoints": 3, "prompts_per_step": 4})
        path = tmp_path / f"{run}-{steps}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    train = ["-m", "rltk", "train"]
    launch_deepspeed(config, [*train, str(recipe("straight", 2))])
    launch_deepspeed(config, [*train, str(recipe("resumed", 1))])  # "stops" after its step-1 checkpoint
    launch_deepspeed(config, [*train, str(recipe("resumed", 2)), "--resume"])
    a, b = _by_step(tmp_path / "straight"), _by_step(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2]
    for key in ("loss", "reward/mean", "correct/mean", "completion/length_mean", "grad_norm"):
        assert a[2][key] == pytest.approx(b[2][key], abs=1e-6), key
    assert a[2]["grad_norm"] > 0
    wa = _exported(str(tmp_path / "straight/checkpoints/step-000002"))
    wb = _exported(str(tmp_path / "resumed/checkpoints/step-000002"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    assert (tmp_path / "resumed/checkpoints/step-000002/state/pytorch_model").is_dir()  # DeepSpeed's own state


@pytest.mark.distributed
def test_zero3_dynamic_sampling_refills_in_lockstep(tmp_path, tiny_model_dir, deepspeed_ops):
    """ZeRO-3 on 2 processes with rollout.dynamic_sampling: prompts with an even answer get equal
    rewards (tests.user_stages), so a process may need more rounds than the other; every process
    runs as many (each round's generation gathers the sharded weights, a collective), the run ends
    (a process left behind would hang it), and every trained group is informative."""
    data = small_recipe_data(tiny_model_dir, tmp_path / "run", trainer={"steps": 3, "prompts_per_step": 4},
                             rollout={"dynamic_sampling": True, "max_refill_rounds": 8},
                             rewards=[{"name": "tests.user_stages:alternating_unless_even_answer"}])
    path = tmp_path / "dynamic.yaml"
    path.write_text(yaml.safe_dump(data))
    launch_deepspeed(cpu_config(tmp_path, "zero3"), ["-m", "rltk", "train", str(path)])
    steps = _by_step(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3]
    for row in steps.values():
        assert row["reward/zero_variance_groups"] == 0.0 and row["dynamic/unfilled_share"] == 0.0
        assert row["grad_norm"] > 0
    assert sum(row["dynamic/rounds"] for row in steps.values()) > 3  # some step needed a refill


@pytest.mark.distributed
def test_slurm_script_runs_two_nodes(tmp_path, tiny_model_dir, deepspeed_ops):
    """``launch/slurm.sbatch`` with ``launch/multinode.yaml`` (ZeRO-2), 2 "nodes" × 1 process on this
    machine: a stand-in ``srun`` runs the script's per-node command once per node id, as SLURM's
    one task per node would; both nodes must join one 2-process run that trains and checkpoints."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")  # show hostnames -> main node
    (bin_dir / "srun").write_text("#!/bin/bash\nshift\npids=()\nfor id in 0 1; do SLURM_NODEID=$id \"$@\" & pids+=($!); done\n"
                                  "rc=0\nfor p in \"${pids[@]}\"; do wait $p || rc=1; done\nexit $rc\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    config = cpu_config(tmp_path, "multinode")
    data = small_recipe_data(tiny_model_dir, tmp_path / "run", trainer={"steps": 1, "prompts_per_step": 4})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    launch_with_free_port(lambda port: (["bash", str(ROOT / "launch" / "slurm.sbatch"), str(recipe)], _env(
        port, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node[0-1]", GPUS_PER_NODE="1", ACCELERATE_CONFIG=str(config),
        MAIN_PROCESS_PORT=str(port))))
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["final_checkpoint"].endswith("step-000001")
    assert (tmp_path / "run/checkpoints/step-000001/state/pytorch_model").is_dir()  # DeepSpeed state
    assert 1 in _by_step(tmp_path / "run")


@pytest.mark.distributed
@pytest.mark.parametrize("config,zero,privileged,lora", [
    ("zero2", 2, False, False), ("zero3", 3, False, False), ("zero3", 3, True, False), ("zero3", 3, True, True)],
    ids=["zero2_teacher_model", "zero3_teacher_model", "zero3_privileged", "zero3_lora_privileged"])
def test_deepspeed_paced_two_processes_match_one(tmp_path, tiny_model_dir, deepspeed_ops, config, zero, privileged,
                                                 lora):
    """PACED under DeepSpeed: the teacher is a frozen engine (whole under ZeRO-2, sharded under
    ZeRO-3) or the student reading the solution; under ZeRO-3 both LM heads are gathered around the
    chunked KL's forward and backward. The step (policy loss + PACED, Σw over both ranks) equals
    the 1-process step. Under LoRA the privileged teacher is the student with its adapter on and
    the (frozen) LM head gets no gradient."""
    from rltk.schema import TinyModelConfig
    from rltk.models import build_tiny_model

    if privileged:
        teacher = {"privileged": True}
    else:
        cfg = TinyModelConfig(hidden_size=64, num_heads=2, seed=1)
        teacher = {"name_or_path": str(build_tiny_model(tmp_path / "teacher", cfg))}
    one_recipe = _step_recipe(tmp_path, tiny_model_dir, "paced-one", lora, teacher)  # a run directory each
    two_recipe = _step_recipe(tmp_path, tiny_model_dir, "paced-two", lora, teacher)
    launch_single([str(WORKER), str(one_recipe), str(tmp_path / "one.json"), "step", PACED_CORRECT])
    launch_deepspeed(cpu_config(tmp_path, config),
                     [str(WORKER), str(two_recipe), str(tmp_path / "two.json"), "step", PACED_CORRECT])
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["lm_head_sharded"] == (zero == 3) and not one["lm_head_sharded"]  # the gather had work to do
    _compare(one, two, zero)

"""`rltk check`: every shipped recipe (quickstart and real-model; bases are no recipes) passes its dry
run with its intended launch config, and malformed recipe × launch combinations fail with one line.
Nothing is downloaded: models are known by name, datasets are never opened. Also checks
launch/vllm_server.sh against the config keys.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from rltk.schema import ConfigError

from rltk.validate import build_recipe, load_recipe
from rltk.launch_check import KNOWN_MODELS, check_recipe, check_recipe_file, intended_launch, read_launch_config
from tests.test_recipes import ALL_RECIPES, REAL_MODEL_RECIPES

ROOT = Path(__file__).resolve().parents[1]
REAL = [p for p in REAL_MODEL_RECIPES if p.parent.name in ("qwen2.5-math-1.5b", "qwen2.5-math-7b")]
METHODS = ["grpo", "dr_grpo", "psr", "nsr", "w_reinforce", "ace_grpo", "ace_dapo", "resrl", "weighted_grpo", "garl",
           "paft"]
EVAL_SETS = {"math500": "HuggingFaceH4/MATH-500", "aime24": "HuggingFaceH4/aime_2024", "aime25": "yentinglin/aime_2025",
             "amc23": "math-ai/amc23"}


def _zero3(tmp_path: Path, offload: bool = False, processes: int = 8) -> Path:
    device = "cpu" if offload else "none"
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "mixed_precision": "bf16",
              "num_machines": 1, "num_processes": processes,
              "deepspeed_config": {"zero_stage": 3, "offload_optimizer_device": device, "offload_param_device": device,
                                   "zero3_init_flag": True}}
    path = tmp_path / f"zero3{'_offload' if offload else ''}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch_for(recipe: Path) -> tuple[Path, int | None]:
    named = intended_launch(recipe)
    assert named is not None, f"{recipe.name}: add a '# launch: <accelerate config>' comment line"
    path, processes = named
    assert (ROOT / path).is_file(), f"{recipe.name}: launch config {path} is not in launch/"
    return ROOT / path, processes


def test_every_method_has_a_recipe_for_both_models():
    for model in ("qwen2.5-math-1.5b", "qwen2.5-math-7b"):
        missing = [m for m in METHODS if not (ROOT / "recipes" / model / f"{m}.yaml").exists()]
        assert not missing, f"{model}: {missing}"


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipe_passes_its_dry_run(path):
    """What `rltk check RECIPE` runs, with the launch config the recipe's `# launch:` line names."""
    launch, processes = _launch_for(path)
    lines = check_recipe_file(path, launch=str(launch), num_processes=processes)
    assert lines[0] == f"recipe: {path}" and lines[1].startswith(f"launch: {launch} (")
    assert any(line.startswith("memory: ") for line in lines) and any(line.startswith("context: ") for line in lines)
    if load_recipe(path).model.name_or_path in KNOWN_MODELS:  # every Hub model the recipes name
        assert "memory: about " in " ".join(lines)  # ... has its memory estimated, not skipped


@pytest.mark.parametrize("path", REAL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_recipe_passes_its_dry_run(path, tmp_path):
    launch, processes = _launch_for(path)
    lines = check_recipe_file(path, launch=str(launch), num_processes=processes)
    recipe = load_recipe(path)
    assert recipe.rollout.engine == "vllm"
    if path.stem in METHODS:  # the RL recipes: HF ids for training and every eval set
        assert "/" in recipe.data.source and not (ROOT / recipe.data.source).exists()  # an HF dataset id
        assert {s.name: s.source for s in recipe.eval.sets} == EVAL_SETS
        assert recipe.eval.n >= max(recipe.eval.ks)
        if path.parent.name == "qwen2.5-math-7b":
            assert "memory: " in " ".join(lines) and "ZeRO-3" in lines[1]


def test_the_7b_recipes_do_not_fit_plain_ddp():
    with pytest.raises(ConfigError, match=r"^memory: about .* exceeds 80 GiB"):
        check_recipe_file(ROOT / "recipes" / "qwen2.5-math-7b" / "grpo.yaml", launch=str(ROOT / "launch" / "ddp.yaml"))


def _check(tmp_path, overrides=(), launch=None, **kw):
    data = {"model": {"name_or_path": "Qwen/Qwen2.5-Math-1.5B", "dtype": "bfloat16", "gradient_checkpointing": True},
            "rollout": {"engine": "vllm", "group_size": 8, "max_new_tokens": 3072},
            "data": {"max_prompt_length": 1024},
            "trainer": {"prompts_per_step": 64, "mini_batches": 2, "micro_batch_size": 16, "steps": 10}}
    recipe = build_recipe(data, list(overrides))
    return check_recipe(recipe, read_launch_config(launch or ROOT / "launch" / "ddp.yaml"), **kw)


def test_a_good_layout_reports_its_numbers(tmp_path):
    lines = _check(tmp_path)
    assert "8 training processes" in lines[0]
    assert lines[1].startswith("batches: 4 prompts × 8 = 32 completions per process per optimizer step")
    assert lines[2] == "context: prompt ≤ 1024 + completion ≤ 3072 fits 4096"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.prompts_per_step=36", "trainer.mini_batches=1", "trainer.steps=10"],
     "trainer.prompts_per_step / mini_batches = 36 prompts per optimizer step cannot be split over 8"),
    (["rollout.max_new_tokens=3500"], "data.max_prompt_length + rollout.max_new_tokens = 1024 + 3500 exceeds "
                                      "Qwen/Qwen2.5-Math-1.5B's context (4096)"),
    (["eval.max_new_tokens=4000"], "data.max_prompt_length + eval.max_new_tokens = 1024 + 4000 exceeds"),
    (["rollout.vllm.tensor_parallel_size=3"], "rollout.vllm.tensor_parallel_size (3) must divide the 8"),
    (["rollout.vllm.gpu_memory_utilization=0.95"], "rollout.vllm.gpu_memory_utilization 0.95 leaves training no memory"),
    (["rollout.vllm.gpu_memory_utilization=0.02"], "rollout.vllm.gpu_memory_utilization 0.02 × 80 GiB = 1.6 GiB "
                                                   "cannot hold vLLM's copy"),
    (["rollout.vllm.mode=server", "rollout.vllm.tensor_parallel_size=8"], "rollout.vllm: the vLLM server takes 8 GPUs"),
    (["model.name_or_path=Qwen/Qwen2.5-Math-7B"], "memory: about"),
    (["algorithm.sampler={name: pairing}", "trainer.prompts_per_step=8", "trainer.mini_batches=1"],
     "trainer.prompts_per_step: the pairing sampler needs an even number of prompts per process"),
])
def test_malformed_combinations_fail_with_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        _check(tmp_path, overrides)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_memory_counts_the_micro_batch_and_names_the_precision(tmp_path):
    """Activations and the log-prob working set are part of the figure: 16 × 4,096 tokens of the
    1.5B without gradient checkpointing need ~215 GiB of activations; the dense logits path
    (head_chunk_tokens 0) ~112 GiB of logits. Pure bf16 is named."""
    lines = _check(tmp_path)
    memory = next(line for line in lines if line.startswith("memory:"))
    assert "activations 18.4, log-prob working set 3.2" in memory
    assert "precision: bfloat16 compute (autocast) over float32 master weights and optimizer state" in lines
    assert "weights 5.8, gradients 5.8, optimizer 11.5" in memory  # 1.54e9 × (4 + 4 + 8) bytes
    with pytest.raises(ConfigError, match=r"^memory: about .*activations 215\.5.* exceeds 80 GiB; lower "
                                          r"trainer.micro_batch_size"):
        _check(tmp_path, ["model.gradient_checkpointing=false"])
    with pytest.raises(ConfigError, match=r"log-prob working set 111\.8.* exceeds 80 GiB"):
        _check(tmp_path, ["trainer.head_chunk_tokens=0"])
    pure = _check(tmp_path, ["model.pure_bf16=true"])
    assert any(line.startswith("precision: pure bf16 (model.pure_bf16)") for line in pure)
    assert "weights 2.9, gradients 2.9, optimizer 5.8" in next(line for line in pure if line.startswith("memory:"))
    asleep = _check(tmp_path, ["rollout.vllm.enable_sleep_mode=true", "rollout.vllm.gpu_memory_utilization=0.5"])
    assert next(line for line in asleep if line.startswith("memory:")).startswith("memory: about 63.0 of 80 GiB")  # states 23.0 + max(vLLM 40, step 21.6)


def test_a_token_budget_is_counted_as_that_many_longest_sequences(tmp_path):
    """max_tokens_per_micro_batch 16,384 of 4,096-token sequences: the figure of 4-row micro-batches."""
    budget = _check(tmp_path, ["trainer.max_tokens_per_micro_batch=16384", "trainer.padding_free=true"])
    rows = _check(tmp_path, ["trainer.micro_batch_size=4"])
    memory = [next(line for line in lines if line.startswith("memory:")) for lines in (budget, rows)]
    assert memory[0] == memory[1] and "activations 4.6" in memory[0]
    assert budget[1].endswith("sorted by length into forwards of at most 16384 tokens, packed without padding")
    with pytest.raises(ConfigError, match=r"^trainer.max_tokens_per_micro_batch \(4000\) is smaller than the longest "
                                          r"sequence, data.max_prompt_length \+ rollout.max_new_tokens = 4096 tokens$"):
        _check(tmp_path, ["trainer.max_tokens_per_micro_batch=4000"])


def test_server_mode_subtracts_the_server_gpus(tmp_path):
    # 8 GPUs, server on 1: 7 training processes cannot split 32 prompts per step ...
    with pytest.raises(ConfigError, match="cannot be split over 7 training processes"):
        _check(tmp_path, ["rollout.vllm.mode=server"])
    # ... 56 can, and the server's share is not counted on the training GPUs
    lines = _check(tmp_path, ["rollout.vllm.mode=server", "trainer.prompts_per_step=112"])
    assert "7 training processes + 1 vLLM server GPUs" in lines[0]
    assert "vLLM" not in next(line for line in lines if line.startswith("memory:"))


def test_zero_and_offload_rules(tmp_path):
    zero3 = _zero3(tmp_path)
    lines = _check(tmp_path, ["model.name_or_path=Qwen/Qwen2.5-Math-7B", "rollout.vllm.gpu_memory_utilization=0.5",
                              "trainer.micro_batch_size=8"], launch=zero3)
    assert "ZeRO-3" in lines[0]
    bad = tmp_path / "zero2_param_offload.yaml"
    config = yaml.safe_load(zero3.read_text())
    config["deepspeed_config"].update(zero_stage=2, offload_param_device="cpu")
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="parameter offload needs ZeRO stage 3, got 2"):
        _check(tmp_path, launch=bad)
    with pytest.raises(ConfigError, match=r"model.lora.load_in_4bit \(QLoRA\) cannot be sharded by ZeRO-3"):
        _check(tmp_path, ["model.lora={r: 8, load_in_4bit: true}"], launch=zero3)


def test_launch_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="launch config '.*missing.yaml' does not exist"):
        read_launch_config(tmp_path / "missing.yaml")
    no_count = tmp_path / "nocount.yaml"
    no_count.write_text("distributed_type: MULTI_GPU\n")
    with pytest.raises(ConfigError, match="num_processes must be a positive integer"):
        read_launch_config(no_count)
    assert read_launch_config(no_count, num_processes=4).num_processes == 4
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# a recipe without a launch comment\nrollout: {engine: vllm}\n")
    with pytest.raises(ConfigError, match="names no launch config"):
        check_recipe_file(recipe)


def test_rltk_check_cli(tmp_path, capsys):
    from rltk.cli import main

    assert main(["check", str(ROOT / "recipes/qwen2.5-math-1.5b/grpo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "launch: " in out and "batches: 8 prompts × 8" in out
    assert main(["check", str(ROOT / "recipes/qwen2.5-math-1.5b/grpo.yaml"), "trainer.prompts_per_step=36",
                 "trainer.mini_batches=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rltk: error: trainer.prompts_per_step / mini_batches = 36")


# ------------------------------------------------------------------------------- launch/vllm_server.sh

SCRIPT = ROOT / "launch" / "vllm_server.sh"


def test_vllm_server_script_parses_and_matches_the_config_keys():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "trl vllm-serve" in text and "--tensor-parallel-size" in text and "accelerate launch" in text
    assert '--num_processes "$TRAIN_PROCS"' in text and "/health" in text
    overrides = re.findall(r"(rollout\.[a-z_.]+)=", text)
    assert {"rollout.engine", "rollout.vllm.mode", "rollout.vllm.server_host", "rollout.vllm.server_port",
            "rollout.vllm.tensor_parallel_size"} <= set(overrides)
    values = {"rollout.engine": "vllm", "rollout.vllm.mode": "server", "rollout.vllm.server_host": "10.0.0.1",
              "rollout.vllm.server_port": "8001", "rollout.vllm.group_port": "51300",
              "rollout.vllm.tensor_parallel_size": "2", "rollout.vllm.server_data_parallel_size": "1"}
    recipe = build_recipe({}, [f"{key}={values[key]}" for key in overrides])  # every key exists and parses
    assert recipe.rollout.vllm.mode == "server" and recipe.rollout.vllm.server_port == 8001


def test_vllm_server_script_refuses_a_layout_without_training_gpus(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "recipe.yaml"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "NUM_GPUS": "1", "MODEL": "m", "TP": "1"}, cwd=tmp_path)
    assert proc.returncode == 2 and "none is left for training" in proc.stderr


def test_frozen_models_count_whole_per_process_and_sharded_under_zero3():
    """The PACED teacher (and the reference model) are whole on every process except under ZeRO-3,
    where prepare_frozen shards them: 72.7e9 bf16 weights = 135.4 GiB whole, 16.9 GiB per GPU of 8."""
    paced_7b = ROOT / "recipes" / "qwen2.5-math-7b" / "paced.yaml"
    memory = [line for line in check_recipe_file(paced_7b) if line.startswith("memory: ")][0]
    assert "teacher model 16.9," in memory
    with pytest.raises(ConfigError, match=r"teacher model 135\.4, .* exceeds 80 GiB"):
        check_recipe_file(paced_7b, launch=str(ROOT / "launch" / "zero2.yaml"))
    lines = check_recipe_file(ROOT / "recipes" / "qwen2.5-math-1.5b" / "paced.yaml", launch=str(ROOT / "launch" / "zero3.yaml"))
    assert "teacher model 1.8," in [line for line in lines if line.startswith("memory: ")][0]  # 7.62e9 × 2 / 8
    other = check_recipe_file(paced_7b, ["teacher.name_or_path=someone/unknown-72b"])
    assert [line for line in other if line.startswith("memory: ")][0].endswith(
        "; teacher 'someone/unknown-72b' not counted (size unknown)")
    reference = check_recipe_file(ROOT / "recipes" / "qwen2.5-math-7b" / "grpo.yaml", ["algorithm.terms=[{name: kl, coef: 0.01}]"])
    assert "reference model 1.8," in [line for line in reference if line.startswith("memory: ")][0]


def test_training_on_a_gpu_refuses_a_micro_batch_that_cannot_fit(monkeypatch):
    """At start, on a GPU, RLTrainer runs the same memory figure against the GPU's real size."""
    from types import SimpleNamespace

    import torch

    from rltk.launch_check import check_memory_at_start

    recipe = build_recipe({"model": {"name_or_path": "Qwen/Qwen2.5-Math-1.5B", "dtype": "bfloat16"},
                           "rollout": {"group_size": 8, "max_new_tokens": 3072}, "data": {"max_prompt_length": 1024},
                           "trainer": {"prompts_per_step": 16, "micro_batch_size": 16}})
    job = SimpleNamespace(num_processes=1, distributed_type="MULTI_GPU", mixed_precision="bf16", device="cuda:0")
    assert check_memory_at_start(recipe, job) is None  # no GPU here: nothing to compare with
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    with pytest.raises(ConfigError, match=r"^memory: about .*activations 215\.5.* exceeds 80 GiB"):
        check_memory_at_start(recipe, job)  # no gradient checkpointing: 16 x 4,096 tokens of activations
    recipe.model.gradient_checkpointing = True
    assert check_memory_at_start(recipe, job).startswith("memory: about 44.6 of 80 GiB")

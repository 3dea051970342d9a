"""Recipe schema: loading, overrides, validation messages, and the CLI's exit code 2."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rltk.schema import ConfigError, apply_override

from rltk.validate import build_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart" / "grpo.yaml"


def test_defaults_validate():
    recipe = build_recipe({})
    assert recipe.rollout.group_size == 8
    assert recipe.algorithm.advantage == [{"name": "grpo"}]


def test_quickstart_recipe_matches_embedded_copy():
    embedded = ROOT / "rltk" / "resources" / "quickstart.yaml"
    assert yaml.safe_load(QUICKSTART.read_text()) == yaml.safe_load(embedded.read_text())


def test_overrides_dotted_and_indexed():
    recipe = load_recipe(QUICKSTART, ["trainer.lr=2e-6", "algorithm.advantage[1]={name: zero_variance_filter}",
                                      "rollout.group_size=4", "algorithm.loss.epsilon_high=0.28"])
    assert recipe.trainer.lr == 2e-6
    assert recipe.algorithm.advantage[1] == {"name": "zero_variance_filter"}
    assert recipe.rollout.group_size == 4
    assert recipe.algorithm.loss["epsilon_high"] == 0.28


def test_override_string_stage_becomes_mapping():
    data = {"algorithm": {"loss": "ppo_clip"}}
    apply_override(data, "algorithm.loss.dual_clip=3.0")
    assert data["algorithm"]["loss"] == {"name": "ppo_clip", "dual_clip": 3.0}


def test_float_without_dot_is_accepted():
    assert build_recipe({"trainer": {"lr": "1e-4"}}).trainer.lr == 1e-4


@pytest.mark.parametrize(
    "data, message",
    [
        ({"trainer": {"lrr": 1}}, "unknown key 'trainer.lrr'; did you mean 'lr'?"),
        ({"trainr": {}}, "unknown key 'trainr'; did you mean 'trainer'?"),
        ({"trainer": {"steps": "ten"}}, "trainer.steps: expected int, got 'ten' (str)"),
        ({"trainer": {"steps": True}}, "trainer.steps: expected int, got True (bool)"),
        ({"trainer": {"steps": 0}}, "trainer.steps: must be > 0, got 0"),
        ({"rollout": {"engine": "sglang"}}, "rollout.engine: 'sglang' is not one of 'hf' | 'vllm'"),
        ({"rollout": {"group_size": 1}}, "rollout.group_size: 1 gives 'grpo' a zero advantage"),
        ({"trainer": {"prompts_per_step": 6, "mini_batches": 4}}, "must be divisible by trainer.mini_batches"),
        ({"algorithm": {"advantage": [{"name": "grpoo"}]}}, "unknown advantage 'grpoo' (did you mean 'grpo'?)"),
        ({"algorithm": {"loss": {"name": "ppo_clip", "epsilon": 0.3}}}, "has no parameter 'epsilon' (did you mean"),
        ({"algorithm": {"advantage": [{"name": "nosuch.module:fn"}]}}, "cannot import module 'nosuch.module'"),
        ({"rewards": [{"name": "mathh"}]}, "rewards[0]"),
        ({"eval": {"n": 4, "ks": [8]}}, "eval.ks: k = 8 exceeds eval.n = 4"),
        ({"model": {"lora": {"r": 8}, "ref_model": "x"}}, "model.ref_model and model.lora conflict"),
    ],
)
def test_validation_messages(data, message):
    with pytest.raises(ConfigError) as info:
        build_recipe(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer: {lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        build_recipe({}, ["trainer.lr"])
    with pytest.raises(ConfigError, match="out of range"):
        build_recipe({}, ["algorithm.advantage[5].alpha=1"])


def test_cli_misspelt_key_exits_2_with_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer:\n  leraning_rate: 1.0e-4\n")  # too far from 'lr' for a suggestion
    proc = subprocess.run([sys.executable, "-m", "rltk", "train", str(recipe)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("rltk: error: unknown key 'trainer.leraning_rate'; valid keys: steps,")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "advantage, message",
    [
        ([{"name": "grpo"}, {"name": "ace", "alpha": -1}], "ace: alpha must be a finite number >= 0"),
        ([{"name": "grpo"}, {"name": "ace", "fn": "tanh"}], "ace: fn must be softplus or relu"),
        ([{"name": "grpo"}, {"name": "resrl", "rank": 0}], "resrl: rank must be >= 1"),
        ([{"name": "grpo", "scale": "rows"}], "grpo: scale must be group, batch or none"),
        ([{"name": "garl", "q": 2}], "garl: q must be in [0, 1]"),
    ],
)
def test_stage_knob_values_fail_at_load(advantage, message):
    """Bad knob values are caught by a dry run of the pipeline before any model loads."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_recipe({"algorithm": {"advantage": advantage}})


def test_cli_overrides_may_follow_options(monkeypatch):
    """`rltk compare R --variants a,b trainer.lr=1e-5`: the override after an option is kept."""
    import rltk.cli as cli
    import rltk.workflows as workflows

    seen = {}

    def fake_compare(base, overrides, variants, output_dir):
        seen.update(overrides=overrides, variants=variants, output_dir=output_dir)
        return "table", output_dir

    monkeypatch.setattr(workflows, "compare", fake_compare)
    assert cli.main(["compare", str(QUICKSTART), "rollout.top_k=5", "--variants", "grpo,nsr",
                     "--output-dir", "out", "trainer.lr=1e-5"]) == 0
    assert seen == {"overrides": ["rollout.top_k=5", "trainer.lr=1e-5"], "variants": ["grpo", "nsr"],
                    "output_dir": "out"}
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", str(QUICKSTART), "--variants", "grpo", "--bogus"])
    assert info.value.code == 2


def test_paft_needs_whole_groups_per_micro_batch():
    with pytest.raises(ConfigError, match="must be >= rollout.group_size"):
        build_recipe({"algorithm": {"loss": {"name": "paft"}}, "trainer": {"micro_batch_size": 4},
                      "rollout": {"group_size": 8}})


def test_flatten_keys_and_tracker_config():
    from rltk.schema import flatten_keys
    from rltk.trainer.metrics import _tracker_config

    nested = {"trainer": {"lr": 1e-6, "adam_betas": [0.9, 0.99]}, "teacher": {"name_or_path": None}, "seed": 0,
              "empty": {}}
    assert flatten_keys(nested) == {"trainer.lr": 1e-6, "trainer.adam_betas": [0.9, 0.99],
                                    "teacher.name_or_path": None, "seed": 0}
    assert _tracker_config(nested) == {"trainer.lr": 1e-6, "trainer.adam_betas": "[0.9, 0.99]",
                                       "teacher.name_or_path": "null", "seed": 0}


# --------------------------------------------------------------------------- NaN, inf, limits, paths

@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.lr=.nan"], "trainer.lr: must be a finite number, got nan"),
        (["trainer.lr=1e400"], "trainer.lr: must be a finite number, got '1e400'"),
        (["trainer.weight_decay=.inf"], "trainer.weight_decay: must be a finite number, got inf"),
        (["rollout.temperature=-.inf"], "rollout.temperature: must be a finite number, got -inf"),
        (["verifier.deadline_s=.nan"], "verifier.deadline_s: must be a finite number, got nan"),
        (["trainer.adam_betas=[0.9, .nan]"], "trainer.adam_betas[1]: must be a finite number"),
        (["redi.sft_epochs=.nan"], "redi.sft_epochs: must be a finite number"),  # Union[float, None]
        (["algorithm.advantage=[{name: grpo}, {name: ace}]", "algorithm.advantage[1].alpha=.nan"],
         "algorithm.advantage[1].alpha (modifier 'ace'): must be a finite number, got nan"),
        (["algorithm.advantage=[{name: grpo, eps: .inf}]"],
         "algorithm.advantage[0].eps (advantage 'grpo'): must be a finite"),
        (["algorithm.terms=[{name: kl, coef: abc}]"], "algorithm.terms[0].coef (term 'kl'): expected float"),
        (["algorithm.loss={name: ppo_clip, epsilon_low: -0.5}"],
         "ppo_clip: epsilon_low must be a finite number in [0, 1]"),
        (["algorithm.loss={name: ppo_clip, dual_clip: 0.5}"], "ppo_clip: dual_clip must be a finite number > 1"),
        (["trainer.seed=-1"], "trainer.seed: must be in [0, 2**31 - 1]"),
        ([f"trainer.seed={2**31}"], "trainer.seed: must be in [0, 2**31 - 1]"),
        ([f"trainer.steps={2**63}"], "trainer.steps: 9223372036854775808 is out of range"),
        (["trainer.output_dir="], "trainer.output_dir: must name a directory"),
        (["trainer.prompts_per_step=1000001"], "trainer.prompts_per_step: 1000001 is above the limit of 1,000,000"),
        (["logging.report_to=[no_such]"], "logging.report_to: unknown tracker 'no_such'"),
    ],
)
def test_non_finite_out_of_range_and_limits_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        build_recipe({}, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_limits_and_seed_bounds_are_inclusive():
    import time

    from rltk.validate import MAX_SEED, SIZE_LIMITS

    start = time.perf_counter()
    recipe = build_recipe({}, [f"trainer.prompts_per_step={SIZE_LIMITS['trainer.prompts_per_step']}",
                               f"trainer.seed={MAX_SEED}", "model.tiny.seed=0"])
    assert recipe.trainer.prompts_per_step == 1_000_000 and recipe.trainer.seed == 2**31 - 1
    assert time.perf_counter() - start < 10  # the sampler's dry run does not scale with prompts_per_step


def test_stage_parameters_are_typed_at_load():
    recipe = build_recipe({"algorithm": {"loss": {"name": "gspo", "epsilon_low": "3e-4", "epsilon_high": 4}}})
    assert recipe.algorithm.loss == {"name": "gspo", "epsilon_low": 3e-4, "epsilon_high": 4.0}
    assert isinstance(recipe.algorithm.loss["epsilon_high"], float)


def test_pipeline_refuses_non_finite_parameters_without_the_recipe():
    from rltk.algos.pipeline import AlgorithmPipeline
    from rltk.algos.registry import StageError

    with pytest.raises(StageError, match="loss 'ppo_clip': epsilon_high must be a finite number, got nan"):
        AlgorithmPipeline(["grpo"], loss={"name": "ppo_clip", "epsilon_high": float("nan")})


def test_home_is_expanded_in_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "train.jsonl").write_text("".join(f'{{"problem": "{i}+1", "answer": "{i + 1}"}}\n' for i in range(8)))
    recipe = build_recipe({"trainer": {"output_dir": "~/runs/a"},
                           "data": {"source": "~/train.jsonl", "eval_source": "~/train.jsonl", "num_test": 2}})
    assert recipe.trainer.output_dir == str(tmp_path / "runs" / "a")
    assert recipe.data.source == recipe.data.eval_source == str(tmp_path / "train.jsonl")
    assert build_recipe({}, ["trainer.output_dir=runs/~x"]).trainer.output_dir == "runs/~x"  # only a leading ~


def test_installed_tracker_is_accepted(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    assert build_recipe({"logging": {"report_to": ["wandb"]}}).logging.report_to == ["wandb"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="tracker 'wandb' is not installed; pip install wandb"):
        build_recipe({"logging": {"report_to": ["wandb"]}})

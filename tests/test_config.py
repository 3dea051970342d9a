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


@pytest.mark.parametrize("seeds, message", [("0,one,2", "expected comma-separated integers, got '0,one,2'"),
                                            ("1,1", "expected distinct seeds, got 1,1"),
                                            (",", "expected distinct seeds, got none")])
def test_compare_bad_seeds_are_one_line(seeds, message, capsys):
    from rltk import cli

    assert cli.main(["compare", str(QUICKSTART), "--variants", "grpo,nsr", "--seeds", seeds]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"rltk: error: --seeds: {message}\n"


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


# ------------------------------------------------------------------------------- base: inheritance


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_is_deep_merged_under_the_recipe(tmp_path):
    """Mappings merge key by key; lists and scalars replace; a stage entry naming another stage
    replaces the base's entry whole; the ``base`` key itself is gone from the merged data."""
    from rltk.schema import load_recipe_data

    _write(tmp_path / "base.yaml", """
trainer: {steps: 40, lr: 1.0e-5, output_dir: runs/base}
rollout: {group_size: 4, max_new_tokens: 16}
algorithm:
  advantage: [{name: grpo}, {name: zero_variance_filter}]
  loss: {name: ppo_clip, epsilon_low: 0.2, epsilon_high: 0.2}
  terms: [{name: kl, coef: 0.0}]
eval: {ks: [1, 2, 4]}
""")
    child = _write(tmp_path / "child.yaml", """
base: base.yaml
trainer: {lr: 2.0e-5}
algorithm:
  advantage: [{name: nsr}]
  loss: {epsilon_high: 0.28}
  terms: []
eval: {ks: [1]}
""")
    data = load_recipe_data(child)
    assert "base" not in data
    assert data["trainer"] == {"steps": 40, "lr": 2.0e-5, "output_dir": "runs/base"}  # merged key by key
    assert data["rollout"] == {"group_size": 4, "max_new_tokens": 16}  # untouched section kept
    assert data["algorithm"]["advantage"] == [{"name": "nsr"}]  # lists replace
    assert data["algorithm"]["terms"] == [] and data["eval"]["ks"] == [1]
    assert data["algorithm"]["loss"] == {"name": "ppo_clip", "epsilon_low": 0.2, "epsilon_high": 0.28}
    other = _write(tmp_path / "other.yaml", "base: base.yaml\nalgorithm:\n  loss: {name: cispo, epsilon_max: 4.0}\n")
    assert load_recipe_data(other)["algorithm"]["loss"] == {"name": "cispo", "epsilon_max": 4.0}  # no ppo_clip knobs
    scalar = _write(tmp_path / "scalar.yaml", "base: base.yaml\nalgorithm: {loss: reinforce}\ntrainer: {output_dir: null}\n")
    merged = load_recipe_data(scalar)
    assert merged["algorithm"]["loss"] == "reinforce" and merged["trainer"]["output_dir"] is None
    recipe = load_recipe(child)
    assert (recipe.trainer.steps, recipe.trainer.lr, recipe.rollout.group_size) == (40, 2.0e-5, 4)


def test_nested_bases_and_paths_relative_to_each_file(tmp_path):
    from rltk.schema import load_recipe_data

    _write(tmp_path / "shared" / "root.yaml", "trainer: {steps: 10, lr: 1.0e-5, seed: 1}\nrollout: {group_size: 4}\n")
    _write(tmp_path / "shared" / "model.yaml", "base: root.yaml\ntrainer: {steps: 20}\n")  # relative to shared/
    leaf = _write(tmp_path / "methods" / "leaf.yaml", "base: ../shared/model.yaml\ntrainer: {seed: 3}\n")
    assert load_recipe_data(leaf) == {"trainer": {"steps": 20, "lr": 1.0e-5, "seed": 3}, "rollout": {"group_size": 4}}


def test_overrides_apply_after_the_merge(tmp_path, capsys):
    from rltk.cli import main

    _write(tmp_path / "base.yaml", "trainer: {steps: 40, lr: 1.0e-5}\nrollout: {group_size: 4}\n"
                                   "data: {max_prompt_length: 64}\n")  # + 32 new tokens fits the tiny model
    child = _write(tmp_path / "child.yaml", "base: base.yaml\ntrainer: {lr: 2.0e-5}\n")
    recipe = load_recipe(child, ["trainer.lr=3e-5", "rollout.group_size=6", "trainer.steps=8"])
    assert (recipe.trainer.lr, recipe.rollout.group_size, recipe.trainer.steps) == (3e-5, 6, 8)
    launch = _write(tmp_path / "ddp.yaml", "distributed_type: MULTI_GPU\nnum_processes: 1\n")
    assert main(["check", str(child), "--launch", str(launch), "--print", "trainer.lr=4e-5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out.split("\nrecipe: ")[0])
    assert (printed["trainer"]["lr"], printed["trainer"]["steps"], printed["rollout"]["group_size"]) == (4e-5, 40, 4)


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: c.yaml\n", "c.yaml": "base: a.yaml\n"},
     r"^recipe '.*a\.yaml': base cycle .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml; a recipe cannot be its own base$"),
    ({"a.yaml": "base: a.yaml\n"}, r"^recipe '.*a\.yaml': base cycle .*a\.yaml -> .*a\.yaml;"),
    ({"a.yaml": "base: missing.yaml\n"}, r"^base '.*missing\.yaml' of recipe '.*a\.yaml' does not exist$"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "- 1\n- 2\n"},
     r"^base '.*b\.yaml' of recipe '.*a\.yaml' must be a mapping of sections, got list$"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "trainer: [\n"}, r"^base '.*b\.yaml' of recipe '.*a\.yaml' is not valid YAML"),
    ({"a.yaml": "base: [b.yaml]\n"},
     r"^recipe '.*a\.yaml': base must be the path of another recipe file, relative to this one, got \['b\.yaml'\]$"),
    ({"a.yaml": "base: null\n"}, r"^recipe '.*a\.yaml': base must be the path .* got None$"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: 3\n"}, r"^recipe '.*b\.yaml': base must be the path .* got 3$"),
])
def test_bad_bases_fail_with_one_line_naming_the_file(tmp_path, files, message):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_recipe(tmp_path / "a.yaml")
    assert "\n" not in str(info.value)


def test_cli_bad_base_exits_2_with_one_line(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "base: nowhere.yaml\ntrainer: {steps: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "rltk", "check", str(recipe)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"rltk: error: base '{tmp_path / 'nowhere.yaml'}' of recipe '{recipe}' "
                                                "does not exist"]

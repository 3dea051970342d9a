"""Recipe schema: loading, overrides, validation messages, and the CLI's exit code 2."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rltk.config import ConfigError, apply_override, build_recipe, load_recipe

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
    from rltk.config import flatten_keys
    from rltk.trainer.metrics import _tracker_config

    nested = {"trainer": {"lr": 1e-6, "adam_betas": [0.9, 0.99]}, "teacher": {"name_or_path": None}, "seed": 0,
              "empty": {}}
    assert flatten_keys(nested) == {"trainer.lr": 1e-6, "trainer.adam_betas": [0.9, 0.99],
                                    "teacher.name_or_path": None, "seed": 0}
    assert _tracker_config(nested) == {"trainer.lr": 1e-6, "trainer.adam_betas": "[0.9, 0.99]",
                                       "teacher.name_or_path": "null", "seed": 0}

"""The commands a user runs: rltk eval, sft, compare, train (tiny model, seconds each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import small_recipe_data

ROOT = Path(__file__).resolve().parents[1]


def _rltk(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "rltk", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_eval_command_writes_report(tmp_path, tiny_model_dir):
    out = tmp_path / "report"
    proc = _rltk("eval", "--model", tiny_model_dir, "--n", 4, "--k", "1,2,4", "--num-problems", 6,
                 "--temperature", 1.0, "--max-new-tokens", 8, "--out", out, "logging.progress=false", cwd=tmp_path)
    assert "| variant | pass@1 | pass@2 | pass@4 |" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["n"] == 4 and report["protocol"]["num_problems"] == 6
    assert report["protocol"]["verifier_version"].startswith("rltk-math/2 math-verify==")
    assert set(report["summary"]["pass@k"]) == {"1", "2", "4"}
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 24
    assert (out / "passk.png").stat().st_size > 0
    assert "pass@1" in (out / "report.md").read_text()


def test_sft_then_train_then_compare(tmp_path, tiny_model_dir):
    data = small_recipe_data(tiny_model_dir, tmp_path / "run",
                             sft={"enabled": True, "steps": 3, "batch_size": 8, "num_examples": 32})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    proc = _rltk("compare", recipe, "--variants", "grpo,nsr", cwd=tmp_path)
    compare_dir = tmp_path / "run" / "compare"
    table = (compare_dir / "comparison.md").read_text()
    for row in ("| start |", "| grpo |", "| nsr |"):
        assert row in table and row in proc.stdout
    assert (compare_dir / "sft" / "config.json").is_file()  # one shared warm start
    assert (compare_dir / "comparison.png").stat().st_size > 0
    for variant in ("grpo", "nsr"):
        saved = json.loads((compare_dir / variant / "recipe.json").read_text())
        assert saved["model"]["name_or_path"] == str(compare_dir / "sft")
        assert saved["trainer"]["seed"] == 0
    nsr = json.loads((compare_dir / "nsr" / "recipe.json").read_text())
    assert nsr["algorithm"]["advantage"] == [{"name": "nsr"}]

    # a second call reuses the finished grpo run (not retrained) and trains only psr
    finished = (compare_dir / "grpo" / "result.json").stat().st_mtime_ns
    proc = _rltk("compare", recipe, "--variants", "grpo,psr", cwd=tmp_path)
    assert (compare_dir / "grpo" / "result.json").stat().st_mtime_ns == finished
    assert "already finished with this recipe" in proc.stderr
    table = (compare_dir / "comparison.md").read_text()
    for row in ("| start |", "| grpo |", "| psr |"):
        assert row in table
    assert "| nsr |" not in table
    psr = json.loads((compare_dir / "psr" / "result.json").read_text())
    assert "before" not in psr  # the start was evaluated once, by the first grpo run


def test_cached_warm_start_is_reused_only_for_the_same_settings(tmp_path, tiny_model_dir, caplog):
    from rltk.validate import build_recipe
    from rltk.trainer.sft import run_sft

    data = small_recipe_data(tiny_model_dir, tmp_path, sft={"enabled": True, "steps": 2, "batch_size": 4,
                                                           "num_examples": 8})
    path = run_sft(build_recipe(data))
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert run_sft(build_recipe(data)) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # same settings: reused
    data["sft"]["lr"] = 5e-4
    run_sft(build_recipe(data))
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp  # other settings: trained again
    assert "was made with other settings (sft.lr: 0.001 -> 0.0005); training it again" in caplog.text


def test_tiny_model_is_rebuilt_when_its_settings_change(tmp_path):
    import json as _json

    from rltk.schema import TinyModelConfig
    from rltk.models import build_tiny_model

    path = build_tiny_model(tmp_path / "tiny", TinyModelConfig(hidden_size=32, num_heads=2))
    assert _json.loads((path / "config.json").read_text())["hidden_size"] == 32
    build_tiny_model(tmp_path / "tiny", TinyModelConfig(hidden_size=64, num_heads=2))
    assert _json.loads((path / "config.json").read_text())["hidden_size"] == 64


def test_compare_variant_paths_name_run_directories_inside_the_comparison(tmp_path):
    """A variant given as a recipe path (even absolute) runs under the comparison directory, named
    by the file's stem; two files with one stem are refused before anything runs."""
    import pytest

    from rltk.schema import ConfigError
    from rltk.workflows import compare, variant_name

    assert variant_name("nsr") == "nsr"
    assert variant_name(str(tmp_path / "sub" / "nsr_lr.yaml")) == "nsr_lr"
    with pytest.raises(ConfigError, match="two variants would share the run directory 'v'"):
        compare({}, [], [str(tmp_path / "a" / "v.yaml"), str(tmp_path / "b" / "v.yaml")], str(tmp_path / "cmp"))
    assert not (tmp_path / "cmp").exists()


def test_every_command_tears_the_process_group_down(tmp_path, monkeypatch):
    """A command that succeeds or fails leaves no process group for interpreter finalization (where gloo's
    threads can abort a rank that finished: "terminate called without an active exception")."""
    import torch.distributed as dist

    from rltk import cli
    from rltk.schema import ConfigError

    def fail(args):
        raise ConfigError("bad recipe")

    for command, expected in ((lambda args: 0, 0), (fail, cli.EXIT_USAGE)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store-{expected}'}", rank=0, world_size=1)
        monkeypatch.setitem(cli._COMMANDS, "check", command)
        assert cli.main(["check", str(tmp_path / "recipe.yaml")]) == expected
        assert not dist.is_initialized()


def test_eval_writes_each_model_under_its_own_name_and_never_over_another(tmp_path, tiny_model_dir):
    """Two checkpoints whose directories are both called `model` get two report directories and two
    table rows named after their paths; --out pointing at another model's report is refused."""
    import shutil

    models = [f"runs/{run}/checkpoints/step-000002/model" for run in ("a", "b")]
    for model in models:
        shutil.copytree(tiny_model_dir, tmp_path / model)
    flags = ["--n", 2, "--k", "1,2", "--num-problems", 3, "--max-new-tokens", 4, "logging.progress=false"]
    for model in models:
        proc = _rltk("eval", "--model", model, *flags, cwd=tmp_path)
        assert f"| {model} |" in proc.stdout  # the row is the model, not "model"
    for run, model in zip("ab", models):
        out = tmp_path / "runs" / "eval" / f"{run}-checkpoints-step-000002-model"
        assert f"report: {out.relative_to(tmp_path)}/report.md" in _rltk("eval", "--model", model, *flags,
                                                                          cwd=tmp_path).stdout  # its own: replaced
        assert json.loads((out / "report.json").read_text())["protocol"]["model"] == model
    taken = tmp_path / "runs" / "eval" / "a-checkpoints-step-000002-model"
    before = (taken / "report.json").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "rltk", "eval", "--model", models[1], "--out", str(taken),
                           *map(str, flags)], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"rltk: error: {taken} holds the report of another model ({models[0]}); rltk eval does not overwrite it: "
        "pass --out with another directory, or move that one"]
    assert (taken / "report.json").read_bytes() == before


def test_eval_name_of_paths_and_hub_ids(tmp_path, monkeypatch):
    from rltk.workflows import eval_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "q" / "sft").mkdir(parents=True)
    assert eval_name("runs/q/sft/") == eval_name(str(tmp_path / "runs/q/sft")) == "q-sft"  # relative to the cwd
    assert eval_name("Qwen/Qwen2.5-Math-1.5B") == "Qwen-Qwen2.5-Math-1.5B"
    assert eval_name("/elsewhere/my model:v2") == "elsewhere-my-model-v2"
    deep = "/".join(["part"] * 40)
    x, y = eval_name(f"/x/{deep}"), eval_name(f"/y/{deep}")  # the same last 100 characters
    assert len(x) <= 120 and x.startswith("part-part") and x != y  # ... told apart by a hash of the whole

"""Run directories as a contract: a run never destroys another run's work.

A second run into a directory that holds a run is refused with one line (or, with ``--overwrite``,
the old run is moved aside whole); pruning only touches the run's own checkpoints; ``--resume``
names recipe changes and needs ``--allow-changes`` beyond the safe set; ``sft.output_subdir`` and
``redi.output_subdir`` stay strictly inside the run directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from rltk.cli import main
from rltk.schema import ConfigError, Recipe
from rltk.validate import build_recipe
from rltk.trainer import run_dir as rd
from rltk.trainer.checkpoint import _prune, list_checkpoints
from tests.conftest import small_recipe_data


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("rltk: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (what must survive a refused command)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ two runs, one directory


def test_second_run_is_refused_then_overwrite_moves_the_first_aside(tmp_path, tiny_model_dir, capsys):
    """The issue's case: run A finished (keep_checkpoints 1: only step 4), then run B (another
    recipe, 2 steps) into the same directory. B is refused with one line and A is untouched; with
    --overwrite A is moved aside whole and B's final model is where the log says."""
    run = tmp_path / "run"
    first = _write(tmp_path / "a.yaml", small_recipe_data(
        tiny_model_dir, run, trainer={"steps": 4, "save_every": 2, "keep_checkpoints": 1, "lr": 1e-4}))
    second = _write(tmp_path / "b.yaml", small_recipe_data(
        tiny_model_dir, run, trainer={"steps": 2, "keep_checkpoints": 1, "lr": 3e-4}))
    assert main(["train", str(first)]) == 0
    capsys.readouterr()
    identity = json.loads((run / rd.IDENTITY_FILE).read_text())
    assert identity["kind"] == "rl" and identity["recipe"]["trainer"]["lr"] == 1e-4
    assert identity["fingerprint"].startswith("sha256:")
    before = _snapshot(run)
    assert [s for s, _ in list_checkpoints(run)] == [4]

    assert main(["train", str(second)]) == 2
    _one_line_error(capsys, f"trainer.output_dir '{run}' holds another rl run", "--resume", "--overwrite")
    assert _snapshot(run) == before  # nothing written, nothing deleted
    assert not list(tmp_path.glob("run.old-*"))

    assert main(["train", str(second), "--overwrite"]) == 0
    out = capsys.readouterr().out
    final = out.strip().splitlines()[-1].removeprefix("done: final model at ")
    assert Path(final).is_dir() and (Path(final) / "config.json").is_file()  # B's final model exists
    assert [s for s, _ in list_checkpoints(run)] == [2]
    (aside,) = tmp_path.glob("run.old-*")
    assert _snapshot(aside) == before  # A whole: its checkpoint, metrics and identity
    assert json.loads((run / rd.IDENTITY_FILE).read_text())["run_id"] != identity["run_id"]
    new_metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in new_metrics) == 2


@pytest.mark.parametrize("marker", ["metrics.jsonl", "checkpoints/step-000003/trainer.json", "rltk_run.json",
                                    "result.json", "redi_metrics.jsonl"])
def test_any_trace_of_a_run_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, capsys, marker):
    run = tmp_path / "run"
    (run / marker).parent.mkdir(parents=True, exist_ok=True)
    (run / marker).write_text("{}\n")
    before = _snapshot(run)
    recipe = _write(tmp_path / "r.yaml", small_recipe_data(tiny_model_dir, run))
    assert main(["train", str(recipe)]) == 2
    _one_line_error(capsys, "holds", marker.split("/")[0] + ("/" if "/" in marker else ""))
    assert _snapshot(run) == before and sorted(p.name for p in run.iterdir()) == sorted({marker.split("/")[0]})


def test_redi_into_a_run_directory_is_refused(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Q: 1\nA: ", "chosen": "\\boxed{1}", "rejected": "\\boxed{2}"}) + "\n")
    recipe = _write(tmp_path / "r.yaml", small_recipe_data(tiny_model_dir, run, redi={"data": str(pairs)}))
    assert main(["redi", str(recipe)]) == 2
    err = _one_line_error(capsys, "holds another run", "--overwrite")
    assert "--resume" not in err  # redi cannot resume
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_redi_twice_is_refused_and_overwrite_moves_the_first_aside(tmp_path, tiny_model_dir, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q: {i}\nA: ", "chosen": f"\\boxed{{{i}}}",
                                         "rejected": "\\boxed{0}"}) + "\n" for i in range(1, 3)))
    root = Path(__file__).resolve().parents[2]
    args = ["redi", str(root / "recipes" / "quickstart" / "redi.yaml"), f"model.name_or_path={tiny_model_dir}",
            f"trainer.output_dir={tmp_path / 'run'}", "logging.progress=false", "sft.enabled=false",
            f"redi.data={pairs}", "redi.batch_size=2", "redi.max_steps=1"]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    identity = json.loads((tmp_path / "run" / rd.IDENTITY_FILE).read_text())
    assert identity["kind"] == "redi"
    before = _snapshot(tmp_path / "run")
    assert main([*args, "redi.alpha=0.5"]) == 2
    _one_line_error(capsys, "holds another redi run", "--overwrite")
    assert _snapshot(tmp_path / "run") == before
    assert main([*args, "redi.alpha=0.5", "--overwrite"]) == 0
    (aside,) = tmp_path.glob("run.old-*")
    assert _snapshot(aside) == before  # the first run's model, metrics and identity, whole
    assert json.loads((tmp_path / "run" / rd.IDENTITY_FILE).read_text())["recipe"]["redi"]["alpha"] == 0.5


def test_cli_flag_combinations(tmp_path, tiny_model_dir, capsys):
    recipe = _write(tmp_path / "r.yaml", small_recipe_data(tiny_model_dir, tmp_path / "run"))
    assert main(["train", str(recipe), "--allow-changes"]) == 2
    _one_line_error(capsys, "--allow-changes only applies with --resume")
    assert main(["train", str(recipe), "--resume", "--overwrite"]) == 2
    _one_line_error(capsys, "--resume and --overwrite exclude each other")
    assert not (tmp_path / "run").exists()


def test_overwrite_never_moves_the_working_directory(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    monkeypatch.chdir(run / "sub")
    with pytest.raises(ConfigError, match="current or home directory"):
        rd.move_aside(run)
    monkeypatch.chdir(tmp_path)
    moved = rd.move_aside(run)
    assert moved.name.startswith("run.old-") and (moved / "sub").is_dir() and not run.exists()
    run.mkdir()
    assert rd.move_aside(run) != moved  # a second move in the same second gets its own name


# ------------------------------------------------------------------------------------------ pruning


def _fake_checkpoint(root: Path, step: int, run_id: str | None) -> Path:
    path = root / "checkpoints" / f"step-{step:06d}"
    path.mkdir(parents=True)
    (path / "trainer.json").write_text(json.dumps({"step": step, "sampler": {}, "run_id": run_id}))
    return path


def test_pruning_only_touches_the_runs_own_checkpoints(tmp_path):
    for step in (5, 6):
        _fake_checkpoint(tmp_path, step, "other-run")
    _fake_checkpoint(tmp_path, 7, None)  # from an older rltk: no run id
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step, "this-run")
    (tmp_path / "checkpoints" / ".tmp-step-000004").mkdir()
    _prune(tmp_path / "checkpoints", keep=1, run_id="this-run")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 5, 6, 7]  # this run's newest + all others
    assert not (tmp_path / "checkpoints" / ".tmp-step-000004").exists()


# ------------------------------------------------------------------------------------------ resume with a changed recipe


def test_resume_names_changed_keys_and_needs_allow_changes(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    recipe = _write(tmp_path / "r.yaml", small_recipe_data(
        tiny_model_dir, run, trainer={"steps": 2, "save_every": 1, "keep_checkpoints": 5, "lr": 1e-4}))
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    before = _snapshot(run)

    assert main(["train", str(recipe), "--resume", "trainer.lr=2e-4"]) == 2
    _one_line_error(capsys, "trainer.lr: 0.0001 -> 0.0002", "--allow-changes")
    assert _snapshot(run) == before

    # a safe key (trainer.steps) together with lr: still refused, and only lr is named
    assert main(["train", str(recipe), "--resume", "trainer.lr=2e-4", "trainer.steps=3"]) == 2
    err = _one_line_error(capsys, "trainer.lr: 0.0001 -> 0.0002")
    assert "trainer.steps: 2 -> 3" not in err.split("(changeable without it")[0]

    assert main(["train", str(recipe), "--resume", "--allow-changes", "trainer.lr=2e-4", "trainer.steps=3"]) == 0
    capsys.readouterr()
    assert [s for s, _ in list_checkpoints(run)] == [1, 2, 3]
    identity = json.loads((run / rd.IDENTITY_FILE).read_text())
    assert identity["recipe"]["trainer"]["lr"] == 2e-4
    (resume,) = identity["resumes"]
    assert resume["step"] == 2 and resume["changed"] == {"trainer.lr": [1e-4, 2e-4], "trainer.steps": [2, 3]}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_recipe_changes_and_safe_keys():
    base = Recipe().to_dict()
    changed = json.loads(json.dumps(base))
    changed["trainer"].update(steps=500, lr=3e-6, output_dir="elsewhere")
    changed["eval"]["n"] = 64
    changed["logging"]["progress"] = False
    changes = rd.recipe_changes(base, changed)
    assert [c[0] for c in changes] == ["eval.n", "logging.progress", "trainer.lr", "trainer.output_dir",
                                       "trainer.steps"]
    assert [c[0] for c in changes if not rd.is_safe_key(c[0])] == ["trainer.lr"]
    assert rd.fingerprint(base) != rd.fingerprint(changed)
    del changed["trainer"]["lr"]
    assert rd.fingerprint(base) == rd.fingerprint({**changed, "trainer": {**changed["trainer"], "lr": 1e-4}})
    # a key the stored recipe lacks (added to rltk since) counts only when not at its default
    old = json.loads(json.dumps(base))
    del old["trainer"]["max_bad_steps"]
    assert rd.recipe_changes(old, base) == []
    assert [c[0] for c in rd.recipe_changes(old, {**base, "trainer": {**base["trainer"], "max_bad_steps": 9}})] == [
        "trainer.max_bad_steps"]


def test_compare_never_replaces_a_variant_run_of_another_recipe(tmp_path, tiny_model_dir):
    from rltk.workflows import _resumable_variant

    recipe = build_recipe(small_recipe_data(tiny_model_dir, tmp_path / "grpo"))
    assert not _resumable_variant(recipe, tmp_path / "grpo")  # nothing there: train afresh
    run = rd.claim(recipe, "rl")
    run.start()
    assert _resumable_variant(recipe, tmp_path / "grpo")  # the same recipe: continue it
    recipe.eval.n = 4
    assert _resumable_variant(recipe, tmp_path / "grpo")  # a safe change: continue it
    recipe.trainer.lr = 5e-4
    with pytest.raises(ConfigError, match=r"compare: .*grpo holds a run of another recipe \(trainer.lr: 0.001 -> "
                                          r"0.0005\)"):
        _resumable_variant(recipe, tmp_path / "grpo")


# ------------------------------------------------------------------------------------------ output subdirectories


def _sentinels(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "keep.txt", tmp_path / "run" / "keep.txt", tmp_path / "abs" / "keep.txt",
             tmp_path / "run" / "checkpoints" / "keep.txt"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    return paths


@pytest.mark.parametrize("value, message", [
    ("..", "outside"), ("''", "must not be empty"), (".", "is the run directory itself"),
    ("ABS", "is an absolute path"), ("~/rltk-sft-test", "is an absolute path"), ("sft/../..", "outside"),
    ("checkpoints", "inside the run's own 'checkpoints'"), ("eval/sft", "inside the run's own 'eval'"),
])
@pytest.mark.parametrize("command", ["sft", "train", "redi"])
def test_output_subdir_is_confined_to_the_run_directory(tmp_path, tiny_model_dir, capsys, command, value, message):
    sentinels = _sentinels(tmp_path)
    value = str(tmp_path / "abs") if value == "ABS" else value
    data = small_recipe_data(tiny_model_dir, tmp_path / "run", sft={"enabled": True, "steps": 2, "batch_size": 4,
                                                                   "num_examples": 8})
    key = "redi.output_subdir" if command == "redi" else "sft.output_subdir"
    recipe = _write(tmp_path / "r.yaml", data)
    before = _snapshot(tmp_path)
    assert main([command, str(recipe), f"{key}={value}"]) == 2
    _one_line_error(capsys, f"{key}: ", message)
    assert _snapshot(tmp_path) == before and all(p.read_text() == "mine" for p in sentinels)
    assert not Path(os.path.expanduser("~/rltk-sft-test")).exists()


def test_sft_and_redi_directories_may_not_overlap(tmp_path, tiny_model_dir):
    data = small_recipe_data(tiny_model_dir, tmp_path / "run", sft={"output_subdir": "models"},
                             redi={"output_subdir": "models/redi"})
    with pytest.raises(ConfigError, match="redi.output_subdir: 'models/redi' overlaps sft.output_subdir 'models'"):
        rd.check_recipe_paths(build_recipe(data))
    data["redi"]["output_subdir"] = "models"
    with pytest.raises(ConfigError, match="overlaps"):
        rd.check_recipe_paths(build_recipe(data))


def test_output_subdir_through_a_symlink_out_of_the_run_is_refused(tmp_path, tiny_model_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "sft").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="sft.output_subdir: 'sft' resolves to .*elsewhere, outside"):
        rd.check_recipe_paths(build_recipe(small_recipe_data(tiny_model_dir, tmp_path / "run")))


def test_sft_never_replaces_a_directory_it_did_not_write(tmp_path, tiny_model_dir):
    from rltk.trainer.sft import run_sft

    data = small_recipe_data(tiny_model_dir, tmp_path, sft={"enabled": True, "steps": 2, "batch_size": 4,
                                                           "num_examples": 8, "output_subdir": "data"})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("mine\n")
    with pytest.raises(ConfigError, match="is not an SFT model written by rltk"):
        run_sft(build_recipe(data), force=True)
    assert (tmp_path / "data" / "train.jsonl").read_text() == "mine\n"


def test_output_dir_tilde_is_expanded_and_empty_refused(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = build_recipe(small_recipe_data(tiny_model_dir, "~/runs/x"))
    assert rd.output_dir(recipe) == tmp_path / "runs" / "x"
    assert rd.subdir(recipe, "sft.output_subdir") == tmp_path / "runs" / "x" / "sft"
    recipe.trainer.output_dir = " "
    with pytest.raises(ConfigError, match="trainer.output_dir: must not be empty"):
        rd.check_recipe_paths(recipe)

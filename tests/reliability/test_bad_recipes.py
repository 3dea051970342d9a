"""Malformed recipes (issue 8, item 4): each one exits 2 with one line that names the problem, no
traceback, and nothing written.

The corpus lives in ``recipes/``; the first line of every file is ``# expect: <substring>``, a part
of the one-line error the recipe must produce. An optional second line ``# skip-if-installed: <module>``
skips a case about a missing package where that package is installed. Every file runs in-process through
``rltk.cli.main(["train", path])`` (cheap), and a sample also as ``python -m rltk train`` in a
subprocess (the real entry point: exit status, stderr, imports; ~3 s of imports each).

Every case fails in ``rltk.validate``, before anything loads. Recipes that would reach the
trainer carry small sizes, so a check that is missed costs seconds, never a training run.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rltk.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = Path(__file__).with_name("recipes")
FILES = sorted(RECIPES.glob("*.yaml"))

# The subprocess sample: clean cases of different kinds (schema, cross-field, stage, YAML, output dir, and a size
# that once allocated gigabytes while the recipe was checked).
SUBPROCESS_SAMPLE = ["unknown_top_level_key", "grpo_group_size_one", "unknown_estimator", "malformed_yaml",
                     "unwritable_output_dir", "prompts_per_step_huge"]


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <substring>'"
    return first[len("# expect: "):].strip()


def _skip_if_installed(path: Path) -> str | None:
    lines = path.read_text().splitlines()
    if len(lines) > 1 and lines[1].startswith("# skip-if-installed: "):
        return lines[1][len("# skip-if-installed: "):].strip()
    return None


def _param(path: Path):
    marks = []
    if path.stem == "unwritable_output_dir" and not Path("/proc").is_dir():
        marks.append(pytest.mark.skip(reason="needs a /proc that refuses mkdir"))
    module = _skip_if_installed(path)
    if module and importlib.util.find_spec(module) is not None:
        marks.append(pytest.mark.skip(reason=f"{module} is installed"))
    return pytest.param(path, id=path.stem, marks=marks)


def check_outcome(code: int, stderr: str, expected: str, cwd: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert code == 2, f"exit code {code}; stderr: {stderr[-500:]}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {lines[-5:]}"
    assert lines[0].startswith("rltk: error: "), lines[0]
    assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"
    assert sorted(p.name for p in cwd.iterdir()) == [], "files were written in the working directory"


def test_corpus_is_large_and_well_formed():
    assert len(FILES) >= 120
    for path in FILES:
        assert expected_message(path)
    assert set(SUBPROCESS_SAMPLE) <= {p.stem for p in FILES}


@pytest.mark.parametrize("path", [_param(p) for p in FILES])
def test_bad_recipe_in_process(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["train", str(path)])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    check_outcome(code, captured.err, expected_message(path), tmp_path)


@pytest.mark.parametrize("path", [_param(RECIPES / f"{name}.yaml") for name in SUBPROCESS_SAMPLE])
def test_bad_recipe_subprocess(path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rltk", "train", str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    check_outcome(proc.returncode, proc.stderr, expected_message(path), tmp_path)
    assert proc.stdout.strip() == ""

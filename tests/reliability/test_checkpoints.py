"""Checkpoints survive corruption: fsynced before their completion marker, a manifest of sizes and
sha256 in ``trainer.json``, and ``--resume`` falls back past a damaged newest checkpoint.

Each case damages one file of the newest of two checkpoints (a copy of one finished run) and
resumes: the run continues from the previous checkpoint with a warning naming the file and what is
wrong, and its next step equals the original run's. A damaged RNG file alone resumes from that
checkpoint with a warning that the resume is not bit-reproducible.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from rltk.validate import build_recipe
from rltk.trainer import checkpoint as ck
from rltk.trainer.checkpoint import list_checkpoints, verify_checkpoint
from rltk.workflows import train
from tests.conftest import small_recipe_data

COMMON = {"steps": 2, "save_every": 1, "keep_checkpoints": 5}


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A finished 2-step run with complete checkpoints at steps 1 and 2 (resumed below to 3 steps)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(build_recipe(small_recipe_data(tiny_model_dir, run, trainer=COMMON)), evaluate_before=False)
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_manifest_records_every_file(finished):
    for _, path in list_checkpoints(finished):
        state = json.loads((path / "trainer.json").read_text())
        manifest = state["manifest"]
        assert manifest["hash"] == "sha256" and state["run_id"]
        files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"trainer.json"}
        assert set(manifest["files"]) == files
        for name in ("state/model.safetensors", "state/optimizer.bin", "state/scheduler.bin",
                     "state/random_states_0.pkl", "model/model.safetensors", "model/config.json"):
            assert manifest["files"][name]["size"] == (path / name).stat().st_size > 0
            assert len(manifest["files"][name]["sha256"]) == 64
        assert verify_checkpoint(path) == []


def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, reason", [
    ("state/model.safetensors", _truncate, "truncated"),  # the weights accelerate resumes
    ("state/optimizer.bin", _truncate, "truncated"),
    ("state/scheduler.bin", _truncate, "truncated"),
    ("trainer.json", _truncate, "not valid JSON"),  # step, sampler state and the manifest
    ("model/model.safetensors", _flip, "content differs from its sha256"),  # same size, other bytes
    ("state/optimizer.bin", os.remove, "missing"),
])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(finished, tmp_path, tiny_model_dir, caplog, name, damage,
                                                            reason):
    run = _copy(finished, tmp_path)
    damage(run / "checkpoints" / "step-000002" / name)
    with caplog.at_level(logging.WARNING):
        result = train(build_recipe(small_recipe_data(tiny_model_dir, run, trainer={**COMMON, "steps": 3})),
                       resume=True)
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert f"step-000002 is damaged ({name}: {reason}" in warning and "falling back" in warning, warning
    assert result["start_step"] == 1
    assert (run / "checkpoints" / "damaged-step-000002").is_dir()  # set aside, not deleted
    assert [s for s, _ in list_checkpoints(run)] == [1, 2, 3]
    assert all(verify_checkpoint(path) == [] for _, path in list_checkpoints(run))
    assert _losses(run)[2] == pytest.approx(_losses(finished)[2], abs=1e-6)  # step 2 again, as first run


def test_damaged_rng_state_resumes_from_that_checkpoint_not_bit_reproducibly(finished, tmp_path, tiny_model_dir,
                                                                            caplog):
    run = _copy(finished, tmp_path)
    _truncate(run / "checkpoints" / "step-000002" / "state" / "random_states_0.pkl")
    with caplog.at_level(logging.WARNING):
        result = train(build_recipe(small_recipe_data(tiny_model_dir, run, trainer={**COMMON, "steps": 3})),
                       resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    (warning,) = [w for w in warnings if "random_states_0.pkl" in w]
    assert "step-000002/state/random_states_0.pkl: truncated" in warning and "not bit-reproducible" in warning
    assert not any("is damaged" in w for w in warnings)
    assert result["start_step"] == 2 and [s for s, _ in list_checkpoints(run)] == [1, 2, 3]


def test_every_checkpoint_damaged_starts_over_with_a_warning(finished, tmp_path, tiny_model_dir, caplog):
    run = _copy(finished, tmp_path)
    for _, path in list_checkpoints(run):
        _truncate(path / "state" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        result = train(build_recipe(small_recipe_data(tiny_model_dir, run, trainer=COMMON)), resume=True,
                       evaluate_before=False)
    assert result["start_step"] == 0
    assert sum("is damaged" in r.getMessage() for r in caplog.records) == 2
    assert any("no usable complete checkpoint" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "damaged-step-000001", "damaged-step-000002", "step-000001", "step-000002"]


def test_checkpoint_without_manifest_is_accepted_with_a_warning(tmp_path, caplog):
    path = tmp_path / "checkpoints" / "step-000001"
    path.mkdir(parents=True)
    (path / "trainer.json").write_text(json.dumps({"step": 1, "sampler": {}}))
    with caplog.at_level(logging.WARNING):
        assert verify_checkpoint(path) == []
    assert "has no manifest" in caplog.text


def test_weights_and_optimizer_are_fsynced_before_the_completion_marker(tmp_path, tiny_model_dir, monkeypatch):
    from rltk.trainer.rl import RLTrainer

    events: list[str] = []
    real_fsync, real_write = os.fsync, ck.atomic_write_json

    def fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def write(path, data):
        events.append(f"WRITE {path}")
        return real_write(path, data)

    trainer = RLTrainer(build_recipe(small_recipe_data(tiny_model_dir, tmp_path, trainer=COMMON)))
    try:
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(ck, "atomic_write_json", write)
        final = trainer.save()
    finally:
        trainer.close()
    marker = next(i for i, e in enumerate(events) if e.startswith("WRITE") and e.endswith("trainer.json"))
    synced = {Path(e).relative_to(tmp_path / "checkpoints" / ".tmp-step-000000").as_posix()
              for e in events[:marker] if ".tmp-step-000000/" in e}
    for name in ("state/model.safetensors", "state/optimizer.bin", "state/scheduler.bin",
                 "state/random_states_0.pkl", "model/model.safetensors"):
        assert name in synced, (name, sorted(synced))
    assert any(e == str(tmp_path / "checkpoints") for e in events[marker:])  # the rename is made durable
    assert verify_checkpoint(final) == []

"""Checkpoints that survive a crash at any point (DESIGN.md §7).

Layout: ``<output_dir>/checkpoints/step-000010/`` holding ``state/`` (accelerate's ``save_state``:
model, optimizer, scheduler and every rank's RNG), ``model/`` (an HF-format export with the
tokenizer, loadable by ``from_pretrained``) and ``trainer.json`` (step, sampler state). Everything
is written under ``.tmp-step-000010`` and renamed when complete, so a directory named ``step-*``
is always whole and a partial one is never picked by ``--resume``.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from rltk.io import atomic_write_json

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / "trainer.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(accelerator, model, tokenizer, output_dir: str | Path, step: int,
                    trainer_state: dict[str, Any], keep: int) -> Path:
    """Write a complete checkpoint for ``step`` on every rank; the main rank renames it into place."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(tmp / "model", state_dict=state_dict)
        tokenizer.save_pretrained(tmp / "model")
        atomic_write_json(tmp / "trainer.json", {"step": step, **trainer_state})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale partial ones."""
    for path in root.glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)
    complete = list_checkpoints(root.parent)
    for _, path in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(path, ignore_errors=True)

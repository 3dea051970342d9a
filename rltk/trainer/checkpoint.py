"""Checkpoints that survive a crash at any point (docs/design.md §7).

Layout: ``<output_dir>/checkpoints/step-000010/`` holding ``state/`` (accelerate's ``save_state``:
model, optimizer, scheduler and every rank's RNG), ``model/`` (an HF-format export with the
tokenizer, loadable by ``from_pretrained``) and ``trainer.json`` (step, sampler state). Under LoRA
``adapter/`` holds the peft adapter and ``model/`` the base with the adapter merged in, so
``model/`` is always a plain HF model. Under DeepSpeed the weights are gathered from all ranks
(ZeRO-3 needs ``zero3_save_16bit_model: true``, as in ``launch/zero3.yaml``). Everything
is written under ``.tmp-step-000010`` and renamed when complete, so a directory named ``step-*``
is always whole and a partial one is never picked by ``--resume``.

Before the completion marker ``trainer.json`` is written, every file of the checkpoint is fsynced
(each process syncs ``state/``, the main one everything) and its size and sha256 are recorded in
``trainer.json``'s ``manifest``; the directory renames are fsynced too. ``--resume`` verifies the
newest checkpoint against its manifest and falls back to the previous complete one when a file is
missing, truncated or altered (:func:`verify_checkpoint`); a damaged RNG file alone only costs
bit-reproducibility. Pruning removes only checkpoints whose ``run_id`` is the saving run's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rltk.io import atomic_write_json, fsync_dir, fsync_tree, replace_dir

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_RNG_FILE = re.compile(r"^state/random_states_\d+\.pkl$")  # accelerate's per-process RNG state
MANIFEST_HASH = "sha256"
_CHUNK = 8 << 20


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
                    trainer_state: dict[str, Any], keep: int, trust_remote_code: bool = False,
                    run_id: str | None = None) -> Path:
    """Write a complete checkpoint for ``step`` on every rank; the main rank renames it into place.
    ``run_id`` marks the checkpoint as the run's: pruning keeps the newest ``keep`` of that run's
    checkpoints and never touches another's."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    accelerator.wait_for_everyone()
    fsync_tree(tmp / "state")  # every process: what it wrote is on disk before the marker
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    if accelerator.is_main_process:
        export_model(accelerator, unwrapped, state_dict, tokenizer, tmp, trust_remote_code)
        manifest = build_manifest(tmp)  # fsyncs every file as it hashes it
        fsync_tree(tmp, files=False)
        atomic_write_json(tmp / "trainer.json", {"step": step, **trainer_state, "run_id": run_id,
                                                 "manifest": manifest})
        replace_dir(tmp, final, sync=False)  # files synced above; the same step saved again is swapped whole
        _prune(root, keep, run_id)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------ durability and verification


def _digest(path: Path, sync: bool = False) -> tuple[int, str]:
    """Size and sha256 of ``path`` (read in 8 MiB chunks; hashlib releases the GIL, so files hash
    in parallel threads); ``sync`` also fsyncs it."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(handle.fileno())
    return size, digest.hexdigest()


def _checkpoint_files(checkpoint: Path) -> list[str]:
    found = []
    for dirpath, _, filenames in os.walk(checkpoint):
        for name in filenames:
            relative = Path(dirpath, name).relative_to(checkpoint).as_posix()
            if relative != "trainer.json":
                found.append(relative)
    return sorted(found)


def _workers(count: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, count))


def build_manifest(checkpoint: Path) -> dict[str, Any]:
    """``{"hash": "sha256", "files": {relative path: {"size", "sha256"}}}`` of every file in
    ``checkpoint`` but ``trainer.json`` (which holds the manifest), fsyncing each."""
    names = _checkpoint_files(checkpoint)
    with ThreadPoolExecutor(_workers(len(names))) as pool:
        digests = list(pool.map(lambda name: _digest(checkpoint / name, sync=True), names))
    return {"hash": MANIFEST_HASH,
            "files": {name: {"size": size, MANIFEST_HASH: hexdigest}
                      for name, (size, hexdigest) in zip(names, digests)}}


@dataclass(frozen=True)
class Problem:
    """One damaged file of a checkpoint: which, why, and whether only the RNG state is affected."""

    file: str
    reason: str
    rng_only: bool = False

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def read_trainer_state(checkpoint: Path) -> tuple[dict | None, Problem | None]:
    """``trainer.json`` of ``checkpoint``, or the problem that makes it unusable."""
    path = checkpoint / "trainer.json"
    try:
        text = path.read_text()
    except OSError as exc:
        return None, Problem("trainer.json", f"unreadable ({exc.strerror or exc})")
    try:
        state = json.loads(text)
    except ValueError as exc:
        return None, Problem("trainer.json", f"not valid JSON ({exc.msg} at byte {exc.pos} of {len(text)}: truncated?)")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "sampler" not in state:
        return None, Problem("trainer.json", "lacks the step or sampler state")
    return state, None


def has_manifest(checkpoint: Path) -> bool:
    state, _ = read_trainer_state(checkpoint)
    return bool(state) and isinstance(state.get("manifest"), dict)


def verify_checkpoint(checkpoint: Path) -> list[Problem]:
    """What is wrong with ``checkpoint``: ``trainer.json`` unreadable, or a file of its manifest
    missing, of another size or with another sha256. Files are hashed in parallel threads. A
    checkpoint written before manifests existed is only checked for a readable ``trainer.json``."""
    state, problem = read_trainer_state(checkpoint)
    if problem:
        return [problem]
    manifest = state.get("manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        log.warning("checkpoint %s has no manifest (written by an older rltk): its files are not verified", checkpoint)
        return []
    files: dict[str, dict] = manifest["files"]
    hash_name = manifest.get("hash", MANIFEST_HASH)

    def check(item: tuple[str, dict]) -> Problem | None:
        name, expected = item
        rng = bool(_RNG_FILE.match(name))
        path = checkpoint / name
        try:
            size = path.stat().st_size
        except OSError:
            return Problem(name, "missing", rng)
        if size != expected.get("size"):
            how = "truncated" if size < expected.get("size", 0) else "longer than written"
            return Problem(name, f"{how}: {size} bytes, {expected.get('size')} when saved", rng)
        if hash_name == MANIFEST_HASH and expected.get(MANIFEST_HASH):
            try:
                _, hexdigest = _digest(path)
            except OSError as exc:
                return Problem(name, f"unreadable ({exc.strerror or exc})", rng)
            if hexdigest != expected[MANIFEST_HASH]:
                return Problem(name, "content differs from its sha256 at save (same size: corrupted)", rng)
        return None

    with ThreadPoolExecutor(_workers(len(files))) as pool:
        return [p for p in pool.map(check, sorted(files.items())) if p is not None]


def choose_checkpoint(output_dir: str | Path,
                      exclude: frozenset[str] = frozenset()) -> tuple[Path | None, list[Problem]]:
    """The newest complete checkpoint that verifies, and its RNG-only problems. Each newer damaged
    one is set aside (:func:`set_damaged_aside`) with a warning naming its files and what is wrong."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if path.name in exclude:
            continue
        problems = verify_checkpoint(path)
        fatal = [p for p in problems if not p.rng_only]
        if not fatal:
            return path, problems
        try:
            where = f"set aside as {set_damaged_aside(path).name}"
        except OSError as exc:
            where = f"left in place ({exc.strerror or exc})"
        log.warning("--resume: checkpoint %s is damaged (%s); %s; falling back to the previous complete checkpoint",
                    path.name, "; ".join(map(str, fatal)), where)
    return None, []


def set_damaged_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged-step-N[-k]`` so it is neither resumed nor pruned."""
    target = checkpoint.with_name(f"damaged-{checkpoint.name}")
    n = 2
    while target.exists():
        target = checkpoint.with_name(f"damaged-{checkpoint.name}-{n}")
        n += 1
    checkpoint.rename(target)
    fsync_dir(checkpoint.parent)
    return target


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def export_model(accelerator, unwrapped, state_dict, tokenizer, out: Path, trust_remote_code: bool = False) -> None:
    """Write ``out/model`` (HF format) and, for a LoRA policy, ``out/adapter``; main rank only."""
    if not is_peft_model(unwrapped):
        unwrapped.save_pretrained(out / "model", state_dict=state_dict)
        tokenizer.save_pretrained(out / "model")
        return
    unwrapped.save_pretrained(out / "adapter", state_dict=state_dict)
    tokenizer.save_pretrained(out / "adapter")
    merged = merge_lora(accelerator, unwrapped, state_dict, trust_remote_code)
    merged.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")


def merge_lora(accelerator, peft_model, state_dict, trust_remote_code: bool = False):
    """The base model with the adapter weights of ``state_dict`` merged in, built whole on this
    rank from the base checkpoint (the base weights are frozen under LoRA, so they equal the
    training ones; a QLoRA base is reloaded unquantised, so the merge is exact in its dtype)."""
    import copy

    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from rltk.trainer.distributed import whole_model_loading

    name = peft_model.active_adapter
    config = copy.deepcopy(peft_model.peft_config[name])
    adapter = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=name)
    dtype = next(v.dtype for v in adapter.values() if v.is_floating_point())
    with whole_model_loading(accelerator):
        base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
        fresh = get_peft_model(base, config)
    set_peft_model_state_dict(fresh, adapter)
    return fresh.merge_and_unload()


def push_to_hub(checkpoint: Path, repo_id: str) -> None:
    """Upload a checkpoint's ``model/`` (and ``adapter/`` under LoRA, as a sub-folder) to the Hub."""
    from huggingface_hub import HfApi

    from rltk.schema import ConfigError

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(checkpoint / "model"))
        if (checkpoint / "adapter").is_dir():
            api.upload_folder(repo_id=repo_id, folder_path=str(checkpoint / "adapter"), path_in_repo="adapter")
    except Exception as exc:  # offline, no token, no permission: one line, the checkpoint stays on disk
        raise ConfigError(f"trainer.push_to_hub: cannot upload to '{repo_id}': {str(exc).splitlines()[0]} "
                          f"(the checkpoint is intact at {checkpoint})") from None


def checkpoint_run_id(checkpoint: Path) -> str | None:
    state, _ = read_trainer_state(checkpoint)
    return state.get("run_id") if state else None


def _prune(root: Path, keep: int, run_id: str | None) -> None:
    """Delete stale partial checkpoints and all but the newest ``keep`` complete checkpoints of run
    ``run_id``. A checkpoint of another run, or one without a readable run id, is never deleted."""
    for path in root.glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)
    if run_id is None:
        return
    mine = [path for _, path in list_checkpoints(root.parent) if checkpoint_run_id(path) == run_id]
    for path in mine[: max(0, len(mine) - keep)]:
        shutil.rmtree(path, ignore_errors=True)

"""Checkpoints that survive a crash at any point (DESIGN.md §7).

Layout: ``<output_dir>/checkpoints/step-000010/`` holding ``state/`` (accelerate's ``save_state``:
model, optimizer, scheduler and every rank's RNG), ``model/`` (an HF-format export with the
tokenizer, loadable by ``from_pretrained``) and ``trainer.json`` (step, sampler state). Under LoRA
``adapter/`` holds the peft adapter and ``model/`` the base with the adapter merged in, so
``model/`` is always a plain HF model. Under DeepSpeed the weights are gathered from all ranks
(ZeRO-3 needs ``zero3_save_16bit_model: true``, as in ``launch/zero3.yaml``). Everything
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
                    trainer_state: dict[str, Any], keep: int, trust_remote_code: bool = False) -> Path:
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
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    if accelerator.is_main_process:
        export_model(accelerator, unwrapped, state_dict, tokenizer, tmp, trust_remote_code)
        atomic_write_json(tmp / "trainer.json", {"step": step, **trainer_state})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


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

    from rltk.config import ConfigError

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(checkpoint / "model"))
        if (checkpoint / "adapter").is_dir():
            api.upload_folder(repo_id=repo_id, folder_path=str(checkpoint / "adapter"), path_in_repo="adapter")
    except Exception as exc:  # offline, no token, no permission: one line, the checkpoint stays on disk
        raise ConfigError(f"trainer.push_to_hub: cannot upload to '{repo_id}': {str(exc).splitlines()[0]} "
                          f"(the checkpoint is intact at {checkpoint})") from None


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale partial ones."""
    for path in root.glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)
    complete = list_checkpoints(root.parent)
    for _, path in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(path, ignore_errors=True)

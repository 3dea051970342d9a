"""SFT warm start on worked solutions, built on TRL's ``SFTTrainer`` (``rltk sft RECIPE``).

The completion is the example's worked solution (or ``\\boxed{answer}`` when a dataset has none)
followed by EOS; the loss is on completion tokens only. The result is an HF directory at
``<trainer.output_dir>/<sft.output_subdir>``, written to a temporary directory, fsynced and renamed
(an earlier one is replaced whole: :func:`rltk.io.replace_dir`), and reused when it already exists
(so ``rltk compare`` warm-starts every variant from one model). ``sft.output_subdir`` must name a
subdirectory strictly inside the run directory (:func:`rltk.trainer.run_dir.subdir`), and a
directory there that rltk's SFT did not write is never replaced.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path

from rltk.schema import ConfigError, Recipe, flatten_keys
from rltk.data.recipe import build_prompts, load_split
from rltk.io import atomic_write_json, check_writable, replace_dir
from rltk.models import load_model, load_tokenizer, resolve_model_path
from rltk.trainer.run_dir import output_dir, subdir

log = logging.getLogger(__name__)


def sft_output_dir(recipe: Recipe) -> Path:
    """``<trainer.output_dir>/<sft.output_subdir>``, confined to the run directory (else a ConfigError)."""
    return subdir(recipe, "sft.output_subdir")


def _fingerprint(recipe: Recipe) -> dict:
    """Everything the warm start depends on; a cached warm start is reused only when it matches."""
    import rltk

    return {"model": dataclasses.asdict(recipe.model), "data": dataclasses.asdict(recipe.data),
            "sft": dataclasses.asdict(recipe.sft), "seed": recipe.trainer.seed,
            "max_new_tokens": recipe.rollout.max_new_tokens, "rltk": rltk.__version__}


def _changed_settings(stored: dict | None, current: dict, limit: int = 5) -> str:
    """The dotted keys whose values differ, ``key: old -> new``, at most ``limit`` of them."""
    if stored is None:
        return "no rltk_sft.json record"
    old, new = flatten_keys(stored), flatten_keys(current)
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]
    return ", ".join(changed[:limit]) + (f", and {len(changed) - limit} more" if len(changed) > limit else "")


def run_sft(recipe: Recipe, *, force: bool = False) -> Path:
    """Warm-start the recipe's model; returns the directory of the fine-tuned model."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = sft_output_dir(recipe)
    fingerprint = _fingerprint(recipe)
    marker = out / "rltk_sft.json"
    if (out / "config.json").is_file() and not force:
        stored = json.loads(marker.read_text()) if marker.is_file() else None
        if stored == fingerprint:
            log.info("SFT warm start: reusing %s", out)
            return out
        log.warning("SFT warm start: %s was made with other settings (%s); training it again", out,
                    _changed_settings(stored, fingerprint))
    if out.exists() and not marker.is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"sft.output_subdir: {out} exists and is not an SFT model written by rltk; it is not "
                          "replaced: choose another sft.output_subdir or move it")
    check_writable(out.parent)
    base = resolve_model_path(recipe.model, output_dir(recipe))
    tokenizer = load_tokenizer(base, recipe.model.trust_remote_code)
    model = load_model(base, recipe.model)
    s = recipe.sft
    examples = load_split(recipe.data, recipe.data.train_split, s.num_examples, seed=recipe.trainer.seed)
    prompts = build_prompts(examples, recipe.data, tokenizer)
    rows = [
        {"prompt": p, "completion": (e.solution or f"\\boxed{{{e.answer}}}") + tokenizer.eos_token}
        for e, p in zip(examples, prompts)
    ]
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        args = SFTConfig(
            output_dir=str(work / "trainer"),
            max_steps=s.steps,
            per_device_train_batch_size=s.batch_size,
            learning_rate=s.lr,
            lr_scheduler_type="cosine",
            warmup_steps=int(s.warmup_ratio * s.steps),
            logging_steps=max(1, s.steps // 10),
            save_strategy="no",
            report_to=[],
            seed=recipe.trainer.seed,
            completion_only_loss=True,
            max_length=recipe.data.max_prompt_length + recipe.rollout.max_new_tokens,
            disable_tqdm=not recipe.logging.progress,
            dataloader_num_workers=0,
            bf16=recipe.model.dtype == "bfloat16",  # autocast over the float32 weights load_model gives
            fp16=recipe.model.dtype == "float16",
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        trainer.train()
        trainer.model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        atomic_write_json(work / "model" / "rltk_sft.json", fingerprint)
        replace_dir(work / "model", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out

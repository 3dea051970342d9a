"""REDI, reinforcement distillation from a teacher's correct and wrong traces (``rltk redi RECIPE``).

Xu et al. 2025, "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM
Reasoning" (arXiv 2505.24850; ALGORITHMS.md §6). Two offline stages:

1. SFT on correct traces: the existing warm start (:func:`rltk.trainer.sft.run_sft`) when
   ``sft.enabled``, on the recipe's data or on ``redi.sft_data`` (prompt/completion rows, e.g. from
   ``rltk data pairs --sft-out``);
2. the REDI objective on ``redi.data``: mean over pairs of −log π(y_w|x)/|y_w| + α·log π(y_l|x)/|y_l|
   (:func:`rltk.algos.distill.redi_loss`; unpaired rows use :func:`redi_unpaired_loss`).

Stage 2 runs on accelerate. An optimizer step takes ``redi.batch_size`` rows (pairs, or traces for
unpaired data) over all processes, split by rows between processes and into micro-batches of
``redi.micro_batch_size`` rows. Each micro-batch's loss (a mean over its rows) is scaled by its
share of the step's rows, and by the number of processes because DDP averages gradients, so the
step's loss and gradient are those of the whole batch whatever the cut. Under DeepSpeed, keep the
config's ``gradient_accumulation_steps`` at 1: rltk accumulates micro-batches itself and marks the
last one as the accumulation boundary.

Metrics per optimizer step go to ``<output_dir>/redi_metrics.jsonl``; the final model (HF format,
with the tokenizer) to ``<output_dir>/<redi.output_subdir>``, written to a temporary directory and
renamed. The output directory is a run directory (:mod:`rltk.trainer.run_dir`): a directory that
holds another run is refused unless ``--overwrite`` moves it aside, and both output subdirectories
must lie strictly inside it.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from rltk.algos.distill import normalized_logp, redi_loss, redi_unpaired_loss
from rltk.schema import ConfigError, Recipe
from rltk.data.loaders import DataError
from rltk.data.pairs import read_rows
from rltk.io import atomic_write_json, check_writable
from rltk.models import load_model, load_tokenizer, resolve_model_path
from rltk.trainer.distributed import accelerator_handlers, configure_deepspeed, micro_batch_sync
from rltk.trainer.guard import NonFiniteGuard, check_saveable
from rltk.trainer.logprobs import HeadOptions, TokenBatch, forward_logps
from rltk.precision import compute_dtype, mixed_precision
from rltk.trainer.run_dir import RunDir, claim, output_dir, subdir

log = logging.getLogger(__name__)

PAIRED, UNPAIRED = "preference", "unpaired"
COLUMNS = {PAIRED: ("prompt", "chosen", "rejected"), UNPAIRED: ("prompt", "completion", "label")}
METRICS_FILE = "redi_metrics.jsonl"


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class RediRow:
    """One data row as token ids: a prompt with (chosen, rejected), or with one labelled completion."""

    prompt: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]
    labels: tuple[bool, ...]


@dataclass(frozen=True)
class RediTable:
    """The rows of ``redi.data`` as read, and their format (detected from the columns)."""

    source: str
    fmt: str
    rows: list[tuple[str, dict[str, Any]]]


def read_redi_table(source: str) -> RediTable:
    """Read ``source`` (.jsonl/.json/.parquet or HF dataset id) and detect its format.

    TRL preference rows have ``prompt``, ``chosen``, ``rejected``; unpaired rows ``prompt``,
    ``completion``, ``label``. A missing column is a :class:`DataError` naming the row.
    """
    try:
        rows = list(read_rows(source, "train"))
    except DataError as exc:
        raise DataError(f"redi.data: {exc}") from None
    if not rows:
        raise DataError(f"redi.data '{source}' has no rows")
    first = rows[0][1]
    if "chosen" in first or "rejected" in first:
        fmt = PAIRED
    elif "completion" in first or "label" in first:
        fmt = UNPAIRED
    else:
        raise DataError(f"redi.data '{source}': expected columns prompt/chosen/rejected (TRL preference) or "
                        f"prompt/completion/label (unpaired); {rows[0][0]} has {', '.join(sorted(first)) or 'none'}")
    for where, row in rows:
        missing = [c for c in COLUMNS[fmt] if c not in row]
        if missing:
            raise DataError(f"redi.data '{source}': {where} has no '{missing[0]}' column ({fmt} rows need "
                            f"{', '.join(COLUMNS[fmt])})")
    return RediTable(source, fmt, rows)


@dataclass
class RediData:
    fmt: str
    rows: list[RediRow]
    skipped_long: int = 0  # prompt + completion longer than redi.max_length tokens
    skipped_empty_prompt: int = 0


def _texts(table: RediTable, where: str, row: dict[str, Any], tokenizer, recipe: Recipe) -> dict[str, Any]:
    """The row's prompt and completion texts: conversational rows through the chat template (as TRL
    does), plain prompts formatted with the recipe's template when ``redi.format_prompts``."""
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    example = {c: row[c] for c in COLUMNS[table.fmt]}
    try:
        if is_conversational(example):
            return {**example, **maybe_apply_chat_template(example, tokenizer)}
        for column in COLUMNS[table.fmt]:
            if column != "label" and not isinstance(example[column], str):
                raise DataError(f"'{column}' must be a string or a list of messages, got "
                                f"{type(example[column]).__name__}")
        if recipe.redi.format_prompts:
            from rltk.data.templates import format_prompt

            d = recipe.data
            example["prompt"] = format_prompt(example["prompt"], d.template, tokenizer=tokenizer,
                                              chat_template=d.chat_template, system_prompt=d.system_prompt)
        return example
    except (DataError, ValueError, KeyError, TypeError) as exc:  # e.g. a tokenizer without a chat template
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"redi.data '{table.source}': {where}: {message}") from None


def tokenize_table(table: RediTable, tokenizer, recipe: Recipe) -> RediData:
    """Token ids of every row; completions end with EOS; too-long rows are skipped and counted."""
    eos = tokenizer.eos_token_id
    data = RediData(table.fmt, [])

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    for where, row in table.rows:
        texts = _texts(table, where, row, tokenizer, recipe)
        if table.fmt == PAIRED:
            completions, labels = (texts["chosen"], texts["rejected"]), (True, False)
        else:
            label = row["label"]
            if not isinstance(label, (bool, int)) or label not in (0, 1):
                raise DataError(f"redi.data '{table.source}': {where}: 'label' must be true or false, got {label!r}")
            completions, labels = (texts["completion"],), (bool(label),)
        prompt = ids(texts["prompt"])
        tokens = tuple(c if c[-1:] == (eos,) else c + (eos,) for c in map(ids, completions))
        if not prompt:
            data.skipped_empty_prompt += 1
        elif len(prompt) + max(map(len, tokens)) > recipe.redi.max_length:
            data.skipped_long += 1
        else:
            data.rows.append(RediRow(prompt, tokens, labels))
    if data.skipped_long or data.skipped_empty_prompt:
        log.warning("redi.data: skipped %d rows longer than redi.max_length = %d tokens and %d with an empty "
                    "prompt; kept %d", data.skipped_long, recipe.redi.max_length, data.skipped_empty_prompt,
                    len(data.rows))
    if not data.rows:
        raise DataError(f"redi.data '{table.source}': no usable rows (all longer than redi.max_length = "
                        f"{recipe.redi.max_length} tokens or with an empty prompt)")
    return data


def collate(rows: list[RediRow], fmt: str, pad_id: int) -> tuple[TokenBatch, torch.Tensor]:
    """One batch of sequences: for pairs, every chosen completion then every rejected one (so rows
    ``[:m]`` and ``[m:]`` are aligned); for unpaired data, one sequence per row. Prompts are
    left-padded, completions right-padded. Returns the batch and the per-sequence labels."""
    if fmt == PAIRED:
        seqs = [(r.prompt, r.completions[0], True) for r in rows] + [(r.prompt, r.completions[1], False) for r in rows]
    else:
        seqs = [(r.prompt, r.completions[0], r.labels[0]) for r in rows]
    p_len = max(len(p) for p, _, _ in seqs)
    c_len = max(len(c) for _, c, _ in seqs)
    prompt_ids = torch.full((len(seqs), p_len), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(seqs), p_len), dtype=torch.long)
    completion_ids = torch.full((len(seqs), c_len), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), c_len), dtype=torch.long)
    for i, (p, c, _) in enumerate(seqs):
        prompt_ids[i, p_len - len(p):] = torch.tensor(p)
        prompt_mask[i, p_len - len(p):] = 1
        completion_ids[i, : len(c)] = torch.tensor(c)
        completion_mask[i, : len(c)] = 1
    labels = torch.tensor([label for _, _, label in seqs], dtype=torch.bool)
    return TokenBatch(prompt_ids, prompt_mask, completion_ids, completion_mask), labels


def batch_loss(logps: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, fmt: str, alpha: float,
               reduction: str = "pair") -> torch.Tensor:
    """The REDI loss of one collated batch (a mean over its pairs, or its unpaired reduction)."""
    if fmt == PAIRED:
        m = logps.shape[0] // 2
        return redi_loss(logps[:m], mask[:m], logps[m:], mask[m:], alpha)[0]
    return redi_unpaired_loss(logps, mask, labels.to(logps.device), alpha, reduction=reduction)[0]


# ------------------------------------------------------------------------------------------ trainer


class RediTrainer:
    """Stage 2: the REDI objective over ``redi.epochs`` passes of the data (or ``redi.max_steps``)."""

    def __init__(self, recipe: Recipe, model_path: str, table: RediTable, *, accelerator: Accelerator | None = None,
                 run: RunDir | None = None):
        self.recipe, self.cfg = recipe, recipe.redi
        self.out = output_dir(recipe)
        self.accelerator = accelerator or Accelerator(
            log_with=recipe.logging.report_to or None, project_dir=str(self.out), step_scheduler_with_optimizer=False,
            kwargs_handlers=accelerator_handlers(), mixed_precision=mixed_precision(recipe.model))
        self.run = run or claim(recipe, "redi", resumable=False, ranks=self.accelerator)
        if self.accelerator.is_main_process:
            check_writable(self.out)
        set_seed(recipe.trainer.seed)
        self.head = HeadOptions(recipe.trainer.head_chunk_tokens, compute_dtype(self.accelerator))
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path, recipe.model.trust_remote_code)
        self.data = tokenize_table(table, self.tokenizer, recipe)
        self.micro_batch_size = self.cfg.micro_batch_size
        world = self.accelerator.num_processes
        if len(self.data.rows) < world:
            raise DataError(f"redi.data: {len(self.data.rows)} usable rows cannot be split over {world} processes")
        self.steps_per_epoch = sum(1 for _ in self._epoch_batches(0))
        total = self.cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, self.cfg.max_steps) if self.cfg.max_steps else total
        self._setup_model()
        self.guard = NonFiniteGuard(self.recipe.trainer.max_bad_steps,
                                    "Lower redi.lr or raise trainer.max_bad_steps")
        self.step = 0

    def _setup_model(self) -> None:
        from transformers import get_scheduler

        t, cfg = self.recipe.trainer, self.cfg
        model = load_model(self.model_path, self.recipe.model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_training_steps=self.total_steps,
                                  num_warmup_steps=math.ceil(cfg.warmup_ratio * self.total_steps))
        configure_deepspeed(self.accelerator, self.micro_batch_size, t.max_grad_norm)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)

    # ------------------------------------------------------------------ batches
    def _epoch_batches(self, epoch: int):
        """Global row indices of each optimizer step of ``epoch`` (a seeded shuffle per epoch). A last
        batch with fewer rows than processes is dropped (a process would have nothing to do)."""
        n, size = len(self.data.rows), self.cfg.batch_size
        generator = torch.Generator().manual_seed(self.recipe.trainer.seed + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, size):
            rows = order[start : start + size]
            if len(rows) >= self.accelerator.num_processes:
                yield rows

    def local_rows(self, indices: list[int]) -> list[RediRow]:
        """This process's share of a step's rows."""
        acc = self.accelerator
        return [self.data.rows[i] for i in indices[acc.process_index :: acc.num_processes]]

    # ------------------------------------------------------------------ one optimizer step
    def accumulate_gradients(self, rows: list[RediRow], global_rows: int) -> dict[str, float]:
        """Forward and backward this process's ``rows`` in micro-batches; gradients are left in
        ``.grad``. ``global_rows`` is the step's row count over all processes."""
        acc, cfg, world = self.accelerator, self.cfg, self.accelerator.num_processes
        size = self.micro_batch_size
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        loss_total = torch.zeros((), dtype=torch.float64)
        sums = torch.zeros(6, dtype=torch.float64)  # pos sum, pos count, neg sum, neg count, tokens, rows
        for i, chunk in enumerate(chunks):
            with micro_batch_sync(acc, self.model, last=i == len(chunks) - 1):
                batch, labels = collate(chunk, self.data.fmt, self.tokenizer.pad_token_id)
                logps = forward_logps(self.model, batch, head=self.head).logps
                mask = batch.completion_mask.to(logps.device)
                share = len(chunk) / global_rows
                loss = batch_loss(logps, mask, labels, self.data.fmt, cfg.alpha, cfg.reduction) * share * world
                acc.backward(loss)
            loss_total += loss.detach().double().cpu() / world
            norm = normalized_logp(logps.detach(), mask).double().cpu()
            sums += torch.tensor([float(norm[labels].sum()), float(labels.sum()), float(norm[~labels].sum()),
                                  float((~labels).sum()), float(mask.sum()), float(len(chunk))],
                                 dtype=torch.float64)
        totals = acc.reduce(torch.cat([loss_total.view(1), sums]).to(acc.device), "sum").tolist()
        pos = totals[1] / max(totals[2], 1.0)
        neg = totals[3] / max(totals[4], 1.0)
        return {"loss": totals[0], "pos_logp": pos, "neg_logp": neg, "gap": pos - neg,
                "tokens": totals[5], "rows": totals[6]}

    def optimize(self, indices: list[int]) -> dict[str, float]:
        """One optimizer step on the global rows ``indices``."""
        metrics = self.accumulate_gradients(self.local_rows(indices), len(indices))
        max_norm = self.recipe.trainer.max_grad_norm or float("inf")
        metrics["grad_norm"] = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.guard.step(self.optimizer, self.scheduler, metrics, self.step + 1)
        return metrics

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run every optimizer step, log metrics, save the final model; returns paths and counts."""
        acc = self.accelerator
        metrics_path = self.out / METRICS_FILE
        self.run.start()  # the run's identity, before its metrics
        if acc.is_main_process:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")  # a fresh run
            atomic_write_json(self.out / "redi_recipe.json", self.recipe.to_dict())
        if self.recipe.logging.report_to:
            acc.init_trackers(self.recipe.logging.project, config={"redi": self.recipe.to_dict()["redi"]})
        bar = tqdm(total=self.total_steps, desc="redi", unit="step", dynamic_ncols=True,
                   disable=not (self.recipe.logging.progress and acc.is_main_process))
        start_time = time.perf_counter()
        try:
            for epoch in range(self.cfg.epochs):
                for b, indices in enumerate(self._epoch_batches(epoch)):
                    if self.step >= self.total_steps:
                        break
                    start = time.perf_counter()
                    metrics = self.optimize(indices)
                    self.step += 1
                    metrics["epoch"] = epoch + (b + 1) / self.steps_per_epoch
                    metrics["time/step"] = time.perf_counter() - start
                    self._log(metrics_path, metrics)
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", gap=f"{metrics['gap']:.3f}")
        finally:
            bar.close()
        model_dir = self.save()
        if self.recipe.logging.report_to:
            acc.end_training()
        return {"model_dir": str(model_dir), "steps": self.step, "rows": len(self.data.rows), "format": self.data.fmt,
                "skipped_long_rows": self.data.skipped_long, "skipped_empty_prompts": self.data.skipped_empty_prompt,
                "train_seconds": time.perf_counter() - start_time}

    def _log(self, path: Path, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        clean = {k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v for k, v in metrics.items()}
        with path.open("a") as handle:
            handle.write(json.dumps({"step": self.step, **clean}) + "\n")
        if self.recipe.logging.report_to:
            self.accelerator.log({f"redi/{k}": v for k, v in metrics.items()}, step=self.step)

    def save(self) -> Path:
        """The final model + tokenizer in HF format, written under a temporary name and renamed;
        refused with one line when the weights or optimizer state are not finite."""
        acc = self.accelerator
        final = subdir(self.recipe, "redi.output_subdir")
        check_saveable(self.model, self.optimizer, self.step, None)
        tmp = final.with_name(f".{final.name}.tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)  # every rank: gathers ZeRO-3 shards
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(tmp, state_dict=state_dict)
            self.tokenizer.save_pretrained(tmp)
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final


# ------------------------------------------------------------------------------------------ the two stages


def _check_source(key: str, source: str) -> None:
    """Fail before any training when a local data file named in the recipe is missing."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet") and not path.exists():
        raise DataError(f"{key}: file not found: {source}")


def sft_recipe(recipe: Recipe) -> Recipe:
    """The recipe stage 1 runs with: ``redi.sft_data`` (prompt/completion rows) in place of the data
    section when set, and ``sft.steps`` from ``redi.sft_epochs`` when set."""
    from rltk.data.recipe import load_split

    r = copy.deepcopy(recipe)
    if recipe.redi.sft_data:
        d = r.data
        d.source, d.subset, d.train_split = recipe.redi.sft_data, None, "train"
        d.eval_source = recipe.data.eval_source or recipe.data.source  # the recipe's held-out set: none carved from the traces
        d.prompt_field, d.answer_field, d.solution_field = "prompt", "completion", "completion"
        d.extract_boxed_answer = False
        if not recipe.redi.format_prompts:  # prompts as written (run_sft appends the EOS to completions)
            d.template, d.chat_template, d.system_prompt = "{question}", False, None
        r.sft.num_examples = None  # every row of the file
    if recipe.redi.sft_epochs:
        rows = len(load_split(r.data, r.data.train_split, r.sft.num_examples, seed=r.trainer.seed))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        r.sft.steps = max(1, math.ceil(recipe.redi.sft_epochs * rows / (r.sft.batch_size * world)))
        log.info("stage 1: %g epochs over %d examples = %d steps of %d", recipe.redi.sft_epochs, rows, r.sft.steps,
                 r.sft.batch_size * world)
    return r


def _check_scheduler(name: str) -> None:
    from transformers.trainer_utils import SchedulerType

    try:
        SchedulerType(name)
    except ValueError:
        names = ", ".join(s.value for s in SchedulerType)
        raise ConfigError(f"redi.lr_scheduler: unknown scheduler '{name}'; use one of {names}") from None


def run_redi(recipe: Recipe, *, evaluate: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Stage 1 (SFT, when ``sft.enabled``), stage 2 (REDI, when ``redi.data``), then optionally the
    held-out pass@k of the start and final models. Returns paths, counts and (with ``evaluate``)
    the pass@k table. ``overwrite`` moves a run already in ``trainer.output_dir`` aside."""
    cfg = recipe.redi
    from rltk.trainer.run_dir import check_recipe_paths

    check_recipe_paths(recipe)  # both stages' directories, before anything is read or written
    _check_scheduler(cfg.lr_scheduler)
    if cfg.data is None and not recipe.sft.enabled:
        raise ConfigError("redi.data: not set and sft.enabled is false, so there is nothing to train; point "
                          "redi.data at a pairs file (`rltk data pairs`) or enable stage 1")
    if cfg.sft_data and not recipe.sft.enabled:
        log.warning("sft.enabled is false: stage 1 is skipped and redi.sft_data unused")
    elif cfg.sft_data:
        _check_source("redi.sft_data", cfg.sft_data)
    table = read_redi_table(cfg.data) if cfg.data else None  # bad data fails before stage 1
    run = claim(recipe, "redi", overwrite=overwrite, resumable=False)  # before stage 1 writes anything
    out = output_dir(recipe)
    result: dict[str, Any] = {}
    if recipe.sft.enabled:
        from rltk.trainer.sft import run_sft

        start = time.perf_counter()
        result["sft_dir"] = start_model = str(run_sft(sft_recipe(recipe)))
        result["sft_seconds"] = time.perf_counter() - start
    else:
        start_model = resolve_model_path(recipe.model, out)
    result["start_model"] = start_model
    result["model_dir"] = start_model
    if table is not None:
        result.update(RediTrainer(recipe, start_model, table, run=run).train())
    run.start()  # (stage 1 only: the identity goes with the result)
    if evaluate:
        result["table"] = _evaluate(recipe, result, with_start=table is not None)
    from accelerate import PartialState

    if PartialState().is_main_process:
        atomic_write_json(out / "redi_result.json", result)
    return result


def _evaluate(recipe: Recipe, result: dict[str, Any], *, with_start: bool) -> str:
    """pass@k of the start model (SFT or base) and the final model; ``<output_dir>/report``."""
    from accelerate import PartialState

    from rltk.eval.report import write_comparison
    from rltk.workflows import evaluate_model

    out = output_dir(recipe)
    start_name = "SFT (stage 1)" if "sft_dir" in result else "start"
    reports = {}
    if with_start:
        reports[start_name] = evaluate_model(recipe, result["start_model"], out / "eval" / "start")
        reports["SFT + REDI" if "sft_dir" in result else "REDI"] = evaluate_model(recipe, result["model_dir"],
                                                                                  out / "eval" / "redi")
    else:
        reports[start_name] = evaluate_model(recipe, result["model_dir"], out / "eval" / "start")
    result["eval"] = {name: r["summary"] for name, r in reports.items()}
    if not PartialState().is_main_process:
        return ""
    return write_comparison(out / "report", reports, f"REDI, held-out pass@k (seed {recipe.trainer.seed})")

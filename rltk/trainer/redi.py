"""REDI, reinforcement distillation from a teacher's correct and wrong traces: the stage-2 trainer.

Xu et al. 2025, "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM
Reasoning" (arXiv 2505.24850; docs/algorithms/reference.md §6). Stage 2 minimises, over ``redi.data``, the mean over
pairs of −log π(y_w|x)/|y_w| + α·log π(y_l|x)/|y_l| (:func:`rltk.algos.distill.redi_loss`; unpaired
rows use :func:`redi_unpaired_loss`). The data are read and tokenised by :mod:`rltk.data.redi`; the
command (stage 1, the SFT warm start, then this trainer, then evaluation) is
:func:`rltk.workflows.run_redi`; the accelerator, seed, optimizer, scheduler and guard are those of
every trainer (:class:`rltk.trainer.base.BaseTrainer`).

An optimizer step takes ``redi.batch_size`` rows (pairs, or traces for unpaired data) over all
processes, split by rows between processes and into micro-batches of ``redi.micro_batch_size``
rows. Each micro-batch's loss (a mean over its rows) is scaled by its share of the step's rows,
and by the number of processes because DDP averages gradients, so the step's loss and gradient are
those of the whole batch whatever the cut. Under DeepSpeed, keep the config's
``gradient_accumulation_steps`` at 1: rltk accumulates micro-batches itself and marks the last one
as the accumulation boundary.

Metrics per optimizer step go to ``<output_dir>/redi_metrics.jsonl``; the final model (HF format,
with the tokenizer) to ``<output_dir>/<redi.output_subdir>``, written to a temporary directory and
renamed whole (:func:`rltk.io.replace_dir`).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from rltk.algos.distill import normalized_logp, redi_loss, redi_unpaired_loss
from rltk.data.loaders import DataError
from rltk.data.redi import PAIRED, RediRow, RediTable, tokenize_table
from rltk.io import atomic_write_json, replace_dir
from rltk.models import load_model, load_tokenizer
from rltk.schema import Recipe
from rltk.trainer.base import BaseTrainer
from rltk.trainer.distributed import micro_batch_sync
from rltk.trainer.guard import check_saveable
from rltk.trainer.logprobs import TokenBatch, forward_logps
from rltk.trainer.metrics import progress_bar
from rltk.trainer.run_dir import RunDir, subdir

METRICS_FILE = "redi_metrics.jsonl"


# ------------------------------------------------------------------------------------------ batches


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


class RediTrainer(BaseTrainer):
    """Stage 2: the REDI objective over ``redi.epochs`` passes of the data (or ``redi.max_steps``)."""

    def __init__(self, recipe: Recipe, model_path: str, table: RediTable, *, accelerator: Accelerator | None = None,
                 run: RunDir | None = None):
        super().__init__(recipe, "redi", hint="Lower redi.lr or raise trainer.max_bad_steps", accelerator=accelerator,
                         run=run, resumable=False)
        self.cfg = cfg = recipe.redi
        self.tokenizer = load_tokenizer(model_path, recipe.model.trust_remote_code)
        self.data = tokenize_table(table, self.tokenizer, recipe)
        self.micro_batch_size = cfg.micro_batch_size
        world = self.accelerator.num_processes
        if len(self.data.rows) < world:
            raise DataError(f"redi.data: {len(self.data.rows)} usable rows cannot be split over {world} processes")
        self.steps_per_epoch = sum(1 for _ in self._epoch_batches(0))
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        model = load_model(model_path, recipe.model)
        self.prepare(model, lr=cfg.lr, scheduler=cfg.lr_scheduler, warmup_ratio=cfg.warmup_ratio,
                     steps=self.total_steps, micro_batch_size=cfg.micro_batch_size)

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
                logps = forward_logps(self.model, batch, options=self.forward_options).logps
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
        self.run.start()  # the run's identity, before its metrics
        metrics_log = self.metrics_log({"redi": self.recipe.to_dict()["redi"]}, name=METRICS_FILE, prefix="redi/")
        if acc.is_main_process:
            atomic_write_json(self.out / "redi_recipe.json", self.recipe.to_dict())
        bar = progress_bar(self.total_steps, 0, self.recipe.logging.progress and acc.is_main_process, desc="redi")
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
                    metrics_log.log(self.step, metrics)
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", gap=f"{metrics['gap']:.3f}")
        finally:
            bar.close()
        model_dir = self.save()
        metrics_log.close()
        return {"model_dir": str(model_dir), "steps": self.step, "rows": len(self.data.rows), "format": self.data.fmt,
                "skipped_long_rows": self.data.skipped_long, "skipped_empty_prompts": self.data.skipped_empty_prompt,
                "train_seconds": time.perf_counter() - start_time}

    def save(self) -> Path:
        """The final model + tokenizer in HF format, written under a temporary name and renamed
        whole; refused with one line when the weights or optimizer state are not finite."""
        acc = self.accelerator
        final = subdir(self.recipe, "redi.output_subdir")
        check_saveable(self.model, self.optimizer, self.step, None)
        state_dict = acc.get_state_dict(self.model)  # every rank: gathers ZeRO-3 shards
        if acc.is_main_process:
            tmp = final.with_name(f".{final.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            acc.unwrap_model(self.model).save_pretrained(tmp, state_dict=state_dict)
            self.tokenizer.save_pretrained(tmp)
            replace_dir(tmp, final)
        acc.wait_for_everyone()
        return final

"""What every rltk trainer shares (the REDI trainer now, the RL trainer next): :class:`BaseTrainer`.

One place builds the Accelerator, claims the run directory, seeds, sets up AdamW with its scheduler
(and DeepSpeed), guards against non-finite steps, sums over processes and opens the metrics log, so
the trainers cannot drift apart in how they do it. The loop itself stays in each trainer.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rltk.io import check_writable
from rltk.precision import compute_dtype, mixed_precision
from rltk.schema import Recipe, TrainerConfig
from rltk.trainer.distributed import accelerator_handlers, configure_deepspeed
from rltk.trainer.guard import NonFiniteGuard
from rltk.trainer.logprobs import ForwardOptions, Layout, chunkable_head
from rltk.trainer.metrics import MetricsLog
from rltk.trainer.packing import packing_unavailable
from rltk.trainer.run_dir import RunDir, claim, output_dir


log = logging.getLogger(__name__)


def warmup_steps(ratio: float, steps: int) -> int:
    """The scheduler's warmup steps for ``ratio`` of ``steps``: the whole part of the product, and
    at least one step when ``ratio`` is positive (a short run keeps the warmup it asks for)."""
    count = int(ratio * steps)
    return max(count, 1) if ratio > 0 else count


def forward_layout(t: TrainerConfig, model: torch.nn.Module) -> Layout:
    """How the log-prob forwards lay out their rows (rltk/trainer/logprobs.py), logged once:
    ``packed`` with ``trainer.padding_free`` where the model supports it (else ``trimmed``, saying
    why), ``trimmed`` with a token budget, ``padded`` otherwise. ``model`` is the unwrapped model."""
    if t.padding_free:
        why = "the dense LM head (trainer.head_chunk_tokens: 0)" if t.head_chunk_tokens == 0 else None
        why = why or packing_unavailable(model) or (
            None if chunkable_head(model) is not None else "its LM head is not a plain Linear")
        if why is None:
            log.info("forwards: padding-free, sequences packed without padding (trainer.padding_free)")
            return "packed"
        log.warning("trainer.padding_free: packing is unavailable (%s); each forward is trimmed to its rows' own "
                    "widths instead", why)
        return "trimmed"
    if t.max_tokens_per_micro_batch is not None:
        log.info("forwards: at most %d tokens each, rows sorted by length and padded to each forward's own widths "
                 "(trainer.max_tokens_per_micro_batch)", t.max_tokens_per_micro_batch)
        return "trimmed"
    return "padded"


class BaseTrainer:
    """The start of a training run and the pieces its loop uses.

    ``__init__`` builds the Accelerator (unless one is given), claims ``trainer.output_dir`` for a
    ``kind`` run (unless ``run`` is an earlier claim; ``claim_options`` go to
    :func:`rltk.trainer.run_dir.claim`), checks that it is writable, seeds every process
    (``trainer.seed`` + process index) and makes the non-finite-step guard (``hint`` ends its
    error) and the options of every log-prob forward. :meth:`prepare` then sets ``model``, ``optimizer`` and
    ``scheduler``. ``step`` counts optimizer steps taken.
    """

    def __init__(self, recipe: Recipe, kind: str, *, hint: str, accelerator: Accelerator | None = None,
                 run: RunDir | None = None, **claim_options: Any):
        self.recipe = recipe
        t = recipe.trainer
        self.out = output_dir(recipe)
        self.accelerator = accelerator or Accelerator(
            log_with=recipe.logging.report_to or None, project_dir=str(self.out), step_scheduler_with_optimizer=False,
            kwargs_handlers=accelerator_handlers(), mixed_precision=mixed_precision(recipe.model),
        )
        # the run directory contract (rltk/trainer/run_dir.py): checked before anything is written
        self.run = run or claim(recipe, kind, ranks=self.accelerator, **claim_options)
        if self.accelerator.is_main_process:
            check_writable(self.out)
        set_seed(t.seed, device_specific=True)
        self.step = 0
        # every log-prob forward; prepare() adds the layout and the token budget
        self.forward_options = ForwardOptions(t.head_chunk_tokens, compute_dtype(self.accelerator))
        self.guard = NonFiniteGuard(t.max_bad_steps, hint)

    def prepare(self, model: torch.nn.Module, *, lr: float, scheduler: str, warmup_ratio: float, steps: int,
                micro_batch_size: int) -> None:
        """AdamW over ``model``'s trainable parameters (``trainer.adam_betas``, ``trainer.weight_decay``),
        the transformers scheduler ``scheduler`` over ``steps`` with :func:`warmup_steps`, DeepSpeed's
        micro-batch and clipping when it is in use, then ``accelerator.prepare``; sets ``self.model``,
        ``self.optimizer`` and ``self.scheduler``."""
        from transformers import get_scheduler

        t = self.recipe.trainer
        model.train()  # from_pretrained returns eval mode, in which transformers skips gradient checkpointing
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        schedule = get_scheduler(scheduler, optimizer, num_warmup_steps=warmup_steps(warmup_ratio, steps),
                                 num_training_steps=steps)
        configure_deepspeed(self.accelerator, micro_batch_size, t.max_grad_norm)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, schedule)
        self.forward_options = replace(self.forward_options, layout=forward_layout(t, model),
                                       max_tokens=t.max_tokens_per_micro_batch, count_over_ranks=self.max_over_ranks)

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every value of ``metrics`` averaged over processes (every process must call it)."""
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(keys, self.accelerator.reduce(values, "mean").tolist()))

    def max_over_ranks(self, count: int) -> int:
        """The largest ``count`` over processes (every process must call it when there are several)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return count
        return int(acc.gather(torch.tensor([count], device=acc.device)).max())

    def reduce_sum(self, value: float) -> float:
        """``value`` summed over all processes (in float64); every process must call it."""
        acc = self.accelerator
        return float(acc.reduce(torch.tensor(value, dtype=torch.float64, device=acc.device), "sum"))

    def metrics_log(self, config: dict[str, Any], *, name: str = "metrics.jsonl", prefix: str = "") -> MetricsLog:
        """The run's metrics log ``<output_dir>/name``: lines after the current ``step`` (all of them
        when starting at step 0) are dropped; trackers get ``config`` and ``prefix``ed names."""
        logging = self.recipe.logging
        return MetricsLog(self.accelerator, self.out, logging.report_to, logging.project, config,
                          resume_step=self.step or -1, name=name, prefix=prefix)

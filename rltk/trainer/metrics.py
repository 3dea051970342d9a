"""Step metrics: a JSONL file (``metrics.jsonl``; REDI's ``redi_metrics.jsonl``) always, accelerate
trackers when asked, and a progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rltk.schema import flatten_keys


def truncate_after(path: Path, step: int) -> None:
    """Drop the JSON lines of ``path`` logged after ``step``, the checkpoint a run resumes from (they
    will be logged again); ``step`` −1 (a fresh start) drops every line of an earlier attempt."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLog:
    """Appends one JSON line per step to ``output_dir/name`` on the main process and forwards the
    numbers to accelerate trackers, under ``prefix`` (e.g. ``redi/``)."""

    def __init__(self, accelerator, output_dir: str | Path, report_to: list[str], project: str,
                 config: dict[str, Any], resume_step: int = 0, *, name: str = "metrics.jsonl", prefix: str = ""):
        self.accelerator = accelerator
        self.path = Path(output_dir) / name
        self.trackers = bool(report_to)
        self.prefix = prefix
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_after(self.path, resume_step)
        if self.trackers:
            accelerator.init_trackers(project, config=_tracker_config(config))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **clean}) + "\n")
        if self.trackers:
            self.accelerator.log({self.prefix + k: v for k, v in clean.items() if isinstance(v, (int, float))},
                                 step=step)

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


class CompletionLog:
    """Every ``every`` rollout batches, the main process's first ``rows`` sampled completions —
    prompt, completion, total reward, each reward, correctness, advantage — as JSON lines in
    ``output_dir/completions.jsonl`` and as a table in the trackers that have tables (wandb,
    trackio). ``every`` 0: off. Lines after the step a run resumes from are dropped, as in
    :class:`MetricsLog`."""

    COLUMNS = ("step", "prompt", "completion", "reward", "correct", "advantage")

    def __init__(self, accelerator, output_dir: str | Path, every: int, rows: int, resume_step: int = -1):
        self.accelerator, self.every, self.rows = accelerator, every, rows
        self.path = Path(output_dir) / "completions.jsonl"
        if every and accelerator.is_main_process:
            truncate_after(self.path, resume_step)

    def log(self, step: int, batch) -> None:
        """Log ``batch`` (a RolloutBatch trained up to optimizer step ``step``) when the step is due."""
        if not self.every or step % self.every or not self.accelerator.is_main_process:
            return
        advantages = batch.advantages.values
        if advantages.dim() == 2:  # per token: the mean over the completion's tokens
            mask = batch.rollouts.completion_mask
            advantages = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        lines = []
        for i in range(min(self.rows, len(batch.texts))):
            lines.append({"step": step, "prompt": batch.prompts[i], "completion": batch.texts[i],
                          "reward": float(batch.rollouts.rewards[i]), "correct": bool(batch.rollouts.correct[i]),
                          "advantage": float(advantages[i]),
                          "rewards": {k: _plain(float(v[i])) for k, v in batch.rewards_by_function.items()}})
        with self.path.open("a") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table("completions", columns=list(self.COLUMNS),
                                  data=[[line[c] for c in self.COLUMNS] for line in lines], step=step)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe as trackers take it: dotted keys, scalar values (others as JSON text)."""
    return {name: value if isinstance(value, (int, float, str, bool)) else json.dumps(value, default=str)
            for name, value in flatten_keys(config).items()}


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "rl"):
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)

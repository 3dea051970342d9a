"""Step metrics: a JSONL file (``metrics.jsonl``; REDI's ``redi_metrics.jsonl``) always, accelerate
trackers when asked, and a progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rltk.schema import flatten_keys


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
            self._truncate_after(resume_step)
        if self.trackers:
            accelerator.init_trackers(project, config=_tracker_config(config))

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again);
        ``step`` −1 (a fresh start) drops every line of an earlier attempt."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.path.write_text("".join(line + "\n" for line in kept))

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

"""``--resume``: which checkpoint a run continues from (rltk/trainer/checkpoint.py verifies them).

The main process chooses the newest checkpoint that verifies against its manifest and sets damaged
newer ones aside with a warning naming the file and the reason; every process loads it, and a load
that fails on any process falls back the same way. A checkpoint whose manifest vouches for its files
but which does not load is the recipe's fault, not the checkpoint's: that is a one-line error.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rltk.schema import ConfigError
from rltk.trainer.checkpoint import choose_checkpoint, has_manifest, set_damaged_aside

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run continues from and its ``trainer.json``."""

    checkpoint: Path
    state: dict[str, Any]


def load_latest_checkpoint(accelerator, out: Path, reduce_sum: Callable[[float], float]) -> Resumed | None:
    """Load the newest usable checkpoint under ``out`` into ``accelerator``'s objects (model,
    optimizer, scheduler, random states); ``None`` (with a warning) when there is none."""
    from accelerate.utils import broadcast_object_list

    acc, excluded = accelerator, set()
    while True:
        choice = [None, [], False]
        if acc.is_main_process:
            path, problems = choose_checkpoint(out, frozenset(excluded))
            choice = [None if path is None else str(path), [str(p) for p in problems],
                      path is not None and has_manifest(path)]
        broadcast_object_list(choice)
        if choice[0] is None:
            log.warning("--resume: no usable complete checkpoint under %s; starting from step 0", out)
            return None
        checkpoint, error = Path(choice[0]), None
        try:
            acc.load_state(str(checkpoint / "state"))
        except Exception as exc:  # noqa: BLE001  (reported below, on one line)
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        if not reduce_sum(1.0 if error else 0.0):
            break
        if choice[2]:  # its files are as saved: the recipe, not the checkpoint, is at fault
            raise ConfigError(f"--resume: checkpoint {checkpoint} is intact but does not load into this run "
                              f"({error or 'on another process'}); a recipe change accepted with "
                              "--allow-changes may not fit it")
        excluded.add(checkpoint.name)  # no manifest vouched for it: treat it as damaged
        if acc.is_main_process:
            try:
                where = f"set aside as {set_damaged_aside(checkpoint).name}"
            except OSError as exc:
                where = f"left in place ({exc.strerror or exc})"
            log.warning("--resume: checkpoint %s does not load (%s); %s; falling back to the previous complete "
                        "checkpoint", checkpoint.name, error or "on another process", where)
        acc.wait_for_everyone()
    for problem in choice[1]:
        log.warning("--resume: %s/%s; resuming from this checkpoint, but its random state is not restored as "
                    "saved, so this resume is not bit-reproducible", checkpoint.name, problem)
    return Resumed(checkpoint, json.loads((checkpoint / "trainer.json").read_text()))

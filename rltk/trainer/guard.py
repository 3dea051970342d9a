"""Skip an optimizer update whose loss or gradient is not finite; stop after too many in a row."""
from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many consecutive non-finite steps); one-line message."""


class NonFiniteGuard:
    """Counts consecutive non-finite steps; the trainers share it so both behave the same."""

    def __init__(self, max_bad_steps: int, hint: str):
        self.max_bad_steps = max_bad_steps
        self.hint = hint
        self.bad_steps = 0

    def step(self, optimizer, scheduler, metrics: dict[str, float], step: int) -> bool:
        """Apply the update when ``metrics['loss']`` and ``metrics['grad_norm']`` are finite;
        otherwise mark the step ``skipped_nonfinite``. Gradients are cleared either way. Raises
        :class:`TrainingError` after ``max_bad_steps`` skipped steps in a row."""
        applied = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        if applied:
            optimizer.step()
            scheduler.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            metrics["skipped_nonfinite"] = 1.0
            log.warning("step %d: non-finite loss or gradient (%s, %s); update skipped",
                        step, metrics["loss"], metrics["grad_norm"])
        optimizer.zero_grad(set_to_none=True)
        if self.bad_steps >= self.max_bad_steps:
            raise TrainingError(f"{self.bad_steps} consecutive steps with a non-finite loss or gradient; stopped at "
                                f"step {step}. {self.hint}")
        return applied

"""The non-finite guard: an optimizer update is applied only when the loss, the gradient *and the
updated weights and optimizer state* are finite; too many skipped steps in a row stop training.

How the updated weights are checked without a copy of the model (docs/reliability.md, "Crashes and
numerical faults"). A whole pre-step copy of the trainable weights and the Adam moments costs 12
bytes per parameter (84 GB at 7B), so the guard never keeps one. Before the real step it runs a
*shadow step*: the optimizer's own ``step`` (same class, same hyper-parameters and learning rate)
on clones of at most ``chunk_elements`` elements at a time — slices of the weights, of their
gradients (views, not copies) and of their optimizer state — and checks the shadow's results. Only
when every updated weight and every updated state tensor is finite does the real step run, so a bad
update is never applied and nothing needs restoring: the pre-step weights and optimizer state are
simply kept. AdamW is elementwise, so a slice steps exactly as inside the whole tensor; for other
optimizers a parameter is never split. Cost: one extra optimizer step of compute and, at a time,
3 × ``chunk_elements`` elements of memory (≈ 200 MB at the default 2**24 float32 elements,
whatever the model size).

Under DeepSpeed the engine applies the update inside the last micro-batch's backward, before the
guard sees the step, and its fp32 master weights and optimizer state are partitioned over the
ranks: the guard checks them right after the step (every rank its own partition, then a MAX
all-reduce) and, since the update cannot be undone without a copy, a non-finite result stops the
run at once (:class:`TrainingError`, exit 1) with the last good checkpoint intact; so does an
overflow the engine raises while stepping (:meth:`NonFiniteGuard.engine_step`).

:func:`check_saveable` refuses to write a checkpoint from non-finite weights or optimizer state.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import defaultdict
from typing import Iterable, Iterator

import torch

log = logging.getLogger(__name__)

SHADOW_CHUNK_ELEMENTS = 2**24
_ELEMENTWISE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many consecutive non-finite steps); one-line message."""


class NonFiniteGuard:
    """Counts consecutive non-finite steps; the trainers share it so both behave the same."""

    def __init__(self, max_bad_steps: int, hint: str, *, chunk_elements: int = SHADOW_CHUNK_ELEMENTS):
        self.max_bad_steps = max_bad_steps
        self.hint = hint
        self.chunk_elements = chunk_elements
        self.bad_steps = 0

    def step(self, optimizer, scheduler, metrics: dict[str, float], step: int) -> bool:
        """Apply the update when ``metrics['loss']``, ``metrics['grad_norm']`` and the updated
        weights and optimizer state are finite; otherwise keep the pre-step weights and state and
        mark the step ``skipped_nonfinite``. Gradients are cleared either way. Raises
        :class:`TrainingError` after ``max_bad_steps`` skipped steps in a row, and at once when a
        DeepSpeed step (already applied by the engine) left non-finite weights or state."""
        reason = None
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            reason = f"non-finite loss or gradient ({metrics['loss']}, {metrics['grad_norm']})"
        elif is_deepspeed(optimizer):
            optimizer.step()  # a no-op: the engine stepped inside the last backward
            if _any_rank(_nonfinite_state(base_optimizer(optimizer))):
                raise TrainingError(f"step {step}: the optimizer step left non-finite weights or optimizer state; "
                                    "DeepSpeed applies the update inside its engine, so it cannot be undone. "
                                    f"{self.hint}")
        elif _any_rank(self.update_is_nonfinite(optimizer)):
            reason = "the update would make the weights or the optimizer state non-finite"
        else:
            optimizer.step()
        if reason is None:
            scheduler.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            metrics["skipped_nonfinite"] = 1.0
            _reset_grad_scaler(optimizer)
            log.warning("step %d: %s; update skipped, weights and optimizer state unchanged", step, reason)
        optimizer.zero_grad(set_to_none=True)
        if self.bad_steps >= self.max_bad_steps:
            raise TrainingError(f"{self.bad_steps} consecutive steps with a non-finite loss or gradient or weight "
                                f"update; stopped at step {step}. {self.hint}")
        return reason is None

    @contextlib.contextmanager
    def engine_step(self, optimizer, step: int) -> Iterator[None]:
        """Around a step's backward passes: DeepSpeed steps inside the last one, and on CPU its
        torch AdamW raises ("value cannot be converted to type float without overflow") for an lr
        like 1e38 after part of the update is written. That becomes the one-line stop of a
        non-finite DeepSpeed step instead of a traceback."""
        try:
            yield
        except RuntimeError as exc:
            if not (is_deepspeed(optimizer) and "overflow" in str(exc)):
                raise
            text = " ".join(str(exc).split())[:200]
            raise TrainingError(f"step {step}: the optimizer step overflowed inside DeepSpeed's engine ({text}); "
                                f"the update cannot be undone. {self.hint}") from exc

    def update_is_nonfinite(self, optimizer) -> bool:
        """Whether the optimizer's next step would leave a non-finite weight or state value (or
        overflow while computing it), found by the shadow step of this module's docstring. The
        real optimizer, its weights and its state are not touched."""
        base = base_optimizer(optimizer)
        if base is None:
            return False
        split = isinstance(base, _ELEMENTWISE)
        flags: dict[torch.device, torch.Tensor] = {}
        for group in base.param_groups:
            batch: list[tuple[torch.Tensor, int, int]] = []
            size = 0
            for piece in _pieces(group["params"], self.chunk_elements if split else None):
                length = piece[2] - piece[1]
                if batch and size + length > self.chunk_elements:
                    if _shadow_step(base, group, batch, flags):
                        return True
                    batch, size = [], 0
                batch.append(piece)
                size += length
            if batch and _shadow_step(base, group, batch, flags):
                return True
        return any(bool(flag) for flag in flags.values())


def _pieces(params: Iterable[torch.Tensor], chunk: int | None):
    """``(param, start, end)`` element ranges of the parameters that have a gradient."""
    for p in params:
        if p.grad is None:
            continue
        n = p.numel()
        step = chunk or max(n, 1)
        for start in range(0, max(n, 1), step):
            yield p, start, min(n, start + step)


def _shadow_step(base, group: dict, pieces: list[tuple[torch.Tensor, int, int]],
                 flags: dict[torch.device, torch.Tensor]) -> bool:
    """Step clones of ``pieces`` with a copy of ``base`` (its class and ``group``'s settings) and
    fold the finiteness of the results into ``flags``. True when the step itself overflowed."""
    clones, states = [], {}
    for p, start, end in pieces:
        whole = start == 0 and end == p.numel()
        clone = (p.detach().clone() if whole else p.detach().reshape(-1)[start:end].clone())
        clone.grad = p.grad.detach() if whole else p.grad.detach().reshape(-1)[start:end]
        state = base.state.get(p)
        if state:
            states[clone] = {k: _slice_state(v, p, start, end, whole) for k, v in state.items()}
        clones.append(clone)
    shadow = copy.copy(base)  # the same class and step(); its own groups and state below
    shadow.param_groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": clones}]
    shadow.state = defaultdict(dict, states)
    try:
        shadow.step()
    except RuntimeError as exc:  # e.g. lr · m / (√v + ε) "cannot be converted to type float without overflow"
        if "overflow" in str(exc):
            return True
        raise
    tensors = [*clones, *(v for state in shadow.state.values() for v in state.values())]
    _fold_nonfinite(tensors, flags)
    return False


def _slice_state(value, p: torch.Tensor, start: int, end: int, whole: bool):
    if not torch.is_tensor(value):
        return copy.deepcopy(value)
    if whole or value.dim() == 0 or value.numel() != p.numel():
        return value.detach().clone()
    return value.detach().reshape(-1)[start:end].clone()


def _fold_nonfinite(tensors: Iterable, flags: dict[torch.device, torch.Tensor]) -> None:
    """OR "has a NaN or inf" of each floating tensor into its device's flag (no host sync; min/max
    propagate NaN, so no tensor-sized temporary is allocated)."""
    for t in tensors:
        if not (torch.is_tensor(t) and t.is_floating_point() and t.numel()):
            continue
        lo, hi = torch.aminmax(t.detach().reshape(-1))
        bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
        flags[t.device] = bad if t.device not in flags else flags[t.device] | bad


def _nonfinite(tensors: Iterable) -> bool:
    flags: dict[torch.device, torch.Tensor] = {}
    _fold_nonfinite(tensors, flags)
    return any(bool(flag) for flag in flags.values())


def _nonfinite_state(base) -> bool:
    """Whether the (local) weights the optimizer updates or its state hold a NaN or inf."""
    if base is None:
        return False
    params = [p for group in base.param_groups for p in group["params"]]
    return _nonfinite([*params, *(v for state in base.state.values() for v in state.values())])


def _any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over the ranks of an initialised process group (every rank must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def base_optimizer(optimizer):
    """The innermost ``torch.optim.Optimizer`` (below accelerate's wrapper and DeepSpeed's ZeRO
    optimizer, whose base optimizer holds the fp32 master partitions); None if there is none."""
    current = optimizer
    while getattr(current, "optimizer", None) is not None and current.optimizer is not current:
        current = current.optimizer
    return current if isinstance(current, torch.optim.Optimizer) else None


def is_deepspeed(optimizer) -> bool:
    try:
        from accelerate.utils import DeepSpeedOptimizerWrapper
    except ImportError:  # pragma: no cover - accelerate without DeepSpeed support
        return False
    return isinstance(optimizer, DeepSpeedOptimizerWrapper)


def _reset_grad_scaler(optimizer) -> None:
    """Under fp16 mixed precision accelerate's GradScaler has unscaled this step's gradients; a
    skipped step must still end its bookkeeping (and lower the scale after an overflow), or the
    next step's unscale fails."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        try:
            scaler.update()
        except AssertionError:  # no unscale_ this step (nothing was recorded): nothing to end
            pass


def check_saveable(model, optimizer, step: int, last_good) -> None:
    """Refuse (one-line :class:`TrainingError`) to write a checkpoint of non-finite weights or
    optimizer state; collective: every rank checks its own tensors (its ZeRO partition)."""
    tensors = list(model.parameters())  # buffers do not train (and a mask buffer may hold -inf on purpose)
    base = base_optimizer(optimizer)
    if base is not None:
        tensors += [p for group in base.param_groups for p in group["params"]]
        tensors += [v for state in base.state.values() for v in state.values()]
    if _any_rank(_nonfinite(tensors)):
        kept = f"the last good checkpoint {last_good} is kept" if last_good else "no checkpoint was written yet"
        raise TrainingError(f"step {step}: refusing to save a checkpoint: the weights or the optimizer state hold "
                            f"NaN or inf; {kept}")

"""DeepSpeed ZeRO-2/3 (through accelerate configs) for the trainers: how rltk's own gradient
accumulation maps onto the DeepSpeed engine, frozen models (reference, teacher) under ZeRO-3, and
generation with gathered ZeRO-3 parameters. Without DeepSpeed every function here falls back to
what plain accelerate (DDP or one process) does, so callers never branch on the backend.

Stepping under DeepSpeed. rltk calls ``accelerator.backward`` once per micro-batch and steps once
per optimizer step, with its own global normaliser (``RLTrainer.accumulate_gradients``). The
DeepSpeed config therefore keeps ``gradient_accumulation_steps: 1`` (so DeepSpeed never rescales a
micro-batch loss) and :func:`micro_batch_sync` marks every micro-batch but the last as *not* a
gradient-accumulation boundary: DeepSpeed only accumulates there (no reduce, no step), and the last
backward reduces the gradients across ranks (an average, as DDP's) and runs ``engine.step()``:
clipping to ``gradient_clipping`` (set from ``trainer.max_grad_norm`` by
:func:`configure_deepspeed`), the optimizer step and zeroing. ZeRO skips a step whose gradient norm
is not finite and reports an infinite norm, which ``accelerator.clip_grad_norm_`` returns, so the
trainer's non-finite guard counts the skip and holds the scheduler back exactly as without DeepSpeed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from rltk.schema import ConfigError


def accelerator_handlers() -> list:
    """``kwargs_handlers`` for the trainers' ``Accelerator``: under a DeepSpeed launch on a machine
    without CUDA the process group must be gloo (accelerate would otherwise find no backend and run
    every process as a separate single-process job). Nothing elsewhere."""
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


def deepspeed_plugin(accelerator) -> Any | None:
    """The accelerator's DeepSpeed plugin, or None when DeepSpeed is not in use."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin


def zero_stage(accelerator) -> int:
    """The ZeRO stage of the run: 0 without DeepSpeed."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_zero3(accelerator) -> bool:
    return zero_stage(accelerator) == 3


def configure_deepspeed(accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config from the recipe before ``accelerator.prepare``.

    * ``train_micro_batch_size_per_gpu``: rltk passes no dataloader, so accelerate cannot infer it;
      it is the recipe's ``micro_batch_size`` (DeepSpeed uses it only for its own bookkeeping).
    * ``gradient_clipping``: ``trainer.max_grad_norm`` (0 = off), the single source of truth; an
      explicit different value in the accelerate config is an error.
    * ``gradient_accumulation_steps`` must be 1 (or auto): rltk accumulates micro-batches itself.
    """
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    cfg = plugin.deepspeed_config
    steps = cfg.get("gradient_accumulation_steps", "auto")
    if steps not in ("auto", 1):
        raise ConfigError(f"DeepSpeed gradient_accumulation_steps is {steps}: rltk accumulates micro-batches itself "
                          "(trainer.micro_batch_size); set it to 1 in the accelerate config")
    cfg["gradient_accumulation_steps"] = 1
    clip = cfg.get("gradient_clipping", "auto")
    if clip != "auto" and float(clip) != float(max_grad_norm):
        raise ConfigError(f"DeepSpeed gradient_clipping ({clip}) differs from trainer.max_grad_norm ({max_grad_norm}); "
                          "drop gradient_clipping from the accelerate config, rltk sets it from the recipe")
    cfg["gradient_clipping"] = float(max_grad_norm)
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    if cfg.get("train_batch_size", "auto") == "auto":
        cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * accelerator.num_processes


@contextlib.contextmanager
def _not_a_boundary(accelerator) -> Iterator[None]:
    state = accelerator.gradient_state
    previous = state.sync_gradients
    state._set_sync_gradients(False)
    try:
        yield
    finally:
        state._set_sync_gradients(previous)


def micro_batch_sync(accelerator, model, last: bool):
    """The context for one micro-batch's forward and backward: gradients are reduced across ranks
    only on the ``last`` micro-batch of an optimizer step (DDP ``no_sync``; under DeepSpeed, not a
    gradient-accumulation boundary, so the engine neither reduces nor steps)."""
    if last:
        return contextlib.nullcontext()
    if deepspeed_plugin(accelerator) is not None:
        return _not_a_boundary(accelerator)
    return accelerator.no_sync(model)


def prepare_frozen(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Place a frozen model (the reference policy, a teacher) for no-grad forwards on every rank.

    Under ZeRO-3 it is sharded like the policy (trl's ``prepare_deepspeed``: a DeepSpeed inference
    engine with the run's ZeRO-3 config); under ZeRO-1/2 it is a whole copy per rank in the run's
    precision (a stage-0 engine); otherwise it is moved to the device. Forwards of a ZeRO-3 model
    are collective: every rank must run the same number of them (rltk's forwards are, by
    construction: equal rows per rank). Call after ``accelerator.prepare`` of the policy.
    """
    model.requires_grad_(False)
    model.eval()
    if deepspeed_plugin(accelerator) is None:
        return model.to(accelerator.device)
    from trl.models.utils import prepare_deepspeed

    return prepare_deepspeed(model, accelerator)


def whole_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's whole shape: under ZeRO-3 a rank holds an empty placeholder between uses and
    DeepSpeed keeps the real shape in ``ds_shape``."""
    return getattr(param, "ds_shape", param.shape)


def gathered(*params: torch.Tensor) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory under which ``params`` are whole on every rank: for ZeRO-3 partitioned
    ones a ``deepspeed.zero.GatheredParameters`` (read-only, re-sharded on exit; entering and leaving
    are collective, so every rank must use it the same number of times); a no-op for others. A
    parameter passed twice (a privileged teacher is the student) is gathered once."""
    partitioned = list({id(p): p for p in params if hasattr(p, "ds_id")}.values())
    if not partitioned:
        return contextlib.nullcontext
    import deepspeed

    return lambda: deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


@contextlib.contextmanager
def generation_model(accelerator, model) -> Iterator[torch.nn.Module]:
    """The unwrapped policy for ``generate``. Under ZeRO-3 its parameters are gathered on every rank
    for the duration and DeepSpeed's hooks removed (trl's ``unwrap_model_for_generation``), so
    sampling runs at full speed with no collectives inside ``generate``; entering and leaving are
    collective."""
    if not is_zero3(accelerator):
        yield accelerator.unwrap_model(model)
        return
    from trl.models.utils import unwrap_model_for_generation

    with unwrap_model_for_generation(model, accelerator, gather_deepspeed3_params=True) as unwrapped:
        yield unwrapped


def attach_generation(engine, accelerator, get_model: Callable[[], torch.nn.Module]) -> None:
    """Make the ``hf`` engine sample through :func:`generation_model` under ZeRO-3 (other engines
    and backends need nothing: without ZeRO-3 the unwrapped model already holds whole weights)."""
    if is_zero3(accelerator) and hasattr(engine, "model_context"):
        engine.model_context = lambda: generation_model(accelerator, get_model())


def generation_session(engine):
    """A context over several ``generate`` calls that gathers ZeRO-3 parameters once (evaluation
    and probing shard problems unevenly, so ranks may call ``generate`` a different number of
    times; one collective gather around them all keeps the ranks in step)."""
    hold = getattr(engine, "hold", None)
    return hold() if hold is not None else contextlib.nullcontext()


@contextlib.contextmanager
def whole_model_loading(accelerator) -> Iterator[None]:
    """Load a model whole on this rank only (e.g. the base of a merged LoRA export on the main
    rank). Under ZeRO-3 accelerate registers its DeepSpeed config with transformers, which makes
    every ``from_pretrained`` a collective ``deepspeed.zero.Init``; it is unregistered meanwhile."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None or not is_zero3(accelerator):
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def shutdown_process_group(completed: bool) -> None:
    """Tear the process group down before the interpreter does. Left to interpreter finalization,
    gloo's worker threads can still hold work objects whose destruction needs the (gone) GIL, and a
    rank aborts ("terminate called without an active exception") after a run that succeeded.
    ``completed``: every rank reached the end, so they meet at a barrier first and none leaves while
    another still talks to it; after an error only this process's group is destroyed (a barrier
    there could wait forever on a rank that failed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if completed and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()

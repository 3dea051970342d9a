"""Training precision: float32 master weights and optimizer state on every backend, bf16 (or fp16)
compute by autocast (docs/distributed.md, "Precision").

``model.dtype`` of the trained policy is its *compute* dtype. Its weights load in float32 — the
optimizer's masters, updated in float32 — and ``bfloat16`` or ``float16`` turn on accelerate's
``mixed_precision`` (autocast around the forward, as ``launch/*.yaml``'s ``mixed_precision: bf16``
does; under DeepSpeed its bf16 mode, which keeps float32 masters itself). Frozen models (the
reference, a teacher, an evaluated checkpoint) load in ``model.dtype`` directly: they have no
optimizer. A LoRA base is frozen too and stays in ``model.dtype``; its adapters are float32.

Pure bf16 — the bf16 weights updated in place, no master copy — exists only as the explicit
``model.pure_bf16: true``: at lr ≈ 1e-6 most bf16 weights of magnitude ~0.02 do not change at all
(an update below half a bf16 ulp, ~2⁻⁹ relative, rounds away).
"""
from __future__ import annotations

import torch

from rltk.schema import ConfigError, ModelConfig

_MIXED = {"bfloat16": "bf16", "float16": "fp16"}
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision(cfg: ModelConfig) -> str | None:
    """accelerate's ``mixed_precision`` for a trainer's ``Accelerator``: the recipe's compute dtype
    (``bf16``/``fp16``), or ``None`` — the launch config's setting — for float32/auto and pure bf16."""
    if cfg.pure_bf16:
        return None
    return _MIXED.get(cfg.dtype)


def trainable_load_dtype(cfg: ModelConfig) -> str:
    """The dtype the trained policy's weights load in: float32 masters, bf16 only under
    ``pure_bf16``; a LoRA base (frozen) in ``model.dtype``."""
    if cfg.pure_bf16:
        return "bfloat16"
    return cfg.dtype if cfg.lora is not None else "float32"


def compute_dtype(accelerator) -> torch.dtype | None:
    """The autocast dtype of ``accelerator`` (bf16/fp16), or ``None`` without mixed precision."""
    return _AUTOCAST_DTYPES.get(str(accelerator.mixed_precision))


def check_master_weights(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Every trainable parameter is float32 — the optimizer updates masters, not bf16 copies —
    unless ``model.pure_bf16`` asks otherwise; a one-line ``ConfigError`` names the first one."""
    if cfg.pure_bf16:
        return
    low = [(name, p.dtype) for name, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if low:
        name, dtype = low[0]
        raise ConfigError(f"model: {len(low)} trainable parameters are {str(dtype).removeprefix('torch.')} "
                          f"(e.g. {name}), so the optimizer would update them without float32 masters; "
                          "load them in float32 (rltk does unless the model code forces a dtype) or set "
                          "model.pure_bf16: true to train them so on purpose")

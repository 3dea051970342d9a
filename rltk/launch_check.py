"""Dry run of a recipe together with an accelerate launch config (``rltk check``), with no download.

``rltk train`` validates a recipe on its own before any model loads; some problems only show once
it meets the machine layout: how many training processes there are (minus the GPUs a vLLM server
holds), whether batches split over them, whether ZeRO stage, offload, LoRA and a reference model go
together, whether vLLM's colocated share of GPU memory leaves room for training, and whether the
lengths fit the model's context. :func:`check_recipe` runs those checks and raises the first
problem as a one-line :class:`ConfigError`; it returns human-readable summary lines otherwise.

Any accelerate YAML is read (``distributed_type``, ``num_processes``, ``num_machines``,
``deepspeed_config`` with ``zero_stage`` / ``offload_*_device`` or a ``deepspeed_config_file``).
Model sizes and contexts come from a small table of the models the recipes use, a local
``config.json``, or the built-in tiny model; for other models those checks are skipped and the
summary says so. The memory figure adds the model states (float32 masters and optimizer state:
rltk/precision.py), the reference and teacher models, vLLM's reserved share, and one
micro-batch's activations and log-prob working set (:mod:`rltk.memory`, validated on CPU within
±25%); fragmentation, CUDA context and communication buffers are not counted.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
import yaml

from rltk.schema import ConfigError, Recipe

from rltk.validate import check_layout, load_recipe, micro_batch_rows
from rltk.memory import GIB, ModelShape, StepShape, bytes_per_value, step_working_set


# the models the recipes use: their config.json sizes (context = max_position_embeddings)
_QWEN25_1_5B = dict(hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2, vocab=151936, tied=True)
_QWEN25_7B = dict(hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, vocab=152064, tied=False)
KNOWN_MODELS: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-Math-1.5B": ModelShape(**_QWEN25_1_5B, context=4096),
    "Qwen/Qwen2.5-Math-7B": ModelShape(**_QWEN25_7B, context=4096),
    "Qwen/Qwen2.5-Math-1.5B-Instruct": ModelShape(**_QWEN25_1_5B, context=4096),
    "Qwen/Qwen2.5-Math-7B-Instruct": ModelShape(**_QWEN25_7B, context=4096),
    "Qwen/Qwen2.5-Math-72B-Instruct": ModelShape(hidden=8192, layers=80, intermediate=29568, heads=64, kv_heads=8,
                                                 vocab=152064, tied=False, context=4096),
    "Qwen/Qwen2.5-1.5B-Instruct": ModelShape(**_QWEN25_1_5B, context=32768),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(**_QWEN25_7B, context=32768),
    "Qwen/Qwen3-4B": ModelShape(hidden=2560, layers=36, intermediate=9728, heads=32, kv_heads=8, head_dim=128,
                                vocab=151936, tied=True, context=40960),
}

_LAUNCH_COMMENT = re.compile(r"^#\s*launch:\s*(\S+)(?:\s+--num-processes\s+(\d+))?")


@dataclass(frozen=True)
class LaunchLayout:
    """What a recipe needs to know of an accelerate config."""

    path: str
    num_processes: int
    num_machines: int = 1
    distributed_type: str = "MULTI_GPU"
    zero_stage: int | None = None  # DeepSpeed ZeRO stage, None without DeepSpeed
    offload_optimizer: bool = False
    offload_params: bool = False
    mixed_precision: str = "no"  # accelerate's mixed_precision: no | bf16 | fp16

    @property
    def per_machine(self) -> int:
        return max(1, self.num_processes // max(1, self.num_machines))


def read_launch_config(path: str | Path, num_processes: int | None = None) -> LaunchLayout:
    """Parse an accelerate config YAML (and its DeepSpeed JSON, if it names one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"launch config '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"launch config '{path}' is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"launch config '{path}' must be a mapping of accelerate settings")
    processes = num_processes or data.get("num_processes")
    if not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"launch config '{path}': num_processes must be a positive integer, got "
                          f"{processes!r}; set it there or pass --num-processes")
    kind = str(data.get("distributed_type", "NO")).upper()
    stage, off_opt, off_param = None, False, False
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            ds_path = Path(ds["deepspeed_config_file"])
            ds_path = ds_path if ds_path.is_absolute() or ds_path.exists() else path.parent / ds_path
            if not ds_path.is_file():
                raise ConfigError(f"launch config '{path}': deepspeed_config_file '{ds_path}' does not exist")
            zero = json.loads(ds_path.read_text()).get("zero_optimization", {})
            stage = int(zero.get("stage", 0))
            off_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
            off_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
        else:
            stage = int(ds.get("zero_stage", 0))
            off_opt = str(ds.get("offload_optimizer_device", "none")).lower() != "none"
            off_param = str(ds.get("offload_param_device", "none")).lower() != "none"
    return LaunchLayout(str(path), int(processes), int(data.get("num_machines", 1) or 1), kind, stage, off_opt,
                        off_param, str(data.get("mixed_precision", "no") or "no").lower())


def intended_launch(recipe_path: str | Path) -> tuple[str, int | None] | None:
    """The ``# launch: <accelerate config> [--num-processes N]`` comment among the recipe's leading
    comment lines: (config path, processes or None)."""
    for line in Path(recipe_path).read_text().splitlines():
        if not line.startswith("#"):
            break
        match = _LAUNCH_COMMENT.match(line)
        if match:
            return match.group(1), int(match.group(2)) if match.group(2) else None
    return None


def model_facts(recipe: Recipe) -> tuple[ModelShape | None, int | None]:
    """(shape, context length) of the recipe's model without downloading; None when unknown."""
    m = recipe.model
    if m.name_or_path == "tiny":
        return None, m.tiny.max_position_embeddings
    shape = KNOWN_MODELS.get(m.name_or_path) or ModelShape.from_directory(m.name_or_path)
    return shape, shape.context if shape else None


def _training_processes(recipe: Recipe, layout: LaunchLayout, explicit: bool) -> tuple[int, int]:
    """(training processes, GPUs held by a vLLM server)."""
    r = recipe.rollout
    if r.engine != "vllm" or r.vllm.mode != "server":
        return layout.num_processes, 0
    server = r.vllm.tensor_parallel_size * r.vllm.server_data_parallel_size
    if explicit:
        return layout.num_processes, server
    world = layout.num_processes - server
    if world < 1:
        raise ConfigError(f"rollout.vllm: the vLLM server takes {server} GPUs (tensor_parallel_size × "
                          f"server_data_parallel_size) of the launch config's {layout.num_processes}; none is left "
                          "for training")
    return world, server


def _check_batches(recipe: Recipe, world: int) -> list[str]:
    if recipe.redi.data is not None or recipe.redi.sft_data is not None:  # a REDI recipe: its own batch rules
        c = recipe.redi
        if c.batch_size % world:
            raise ConfigError(f"redi.batch_size ({c.batch_size}) must be a multiple of the {world} processes")
        return [f"REDI: {c.batch_size // world} rows per process per step, micro-batches of {c.micro_batch_size}"]
    return check_layout(recipe, world)


def _check_parallelism(recipe: Recipe, layout: LaunchLayout, world: int, server: int) -> list[str]:
    r, m = recipe.rollout, recipe.model
    stage = layout.zero_stage
    if layout.offload_params and stage != 3:
        raise ConfigError(f"launch config '{layout.path}': parameter offload needs ZeRO stage 3, got {stage}")
    if m.lora is not None and m.lora.load_in_4bit and stage == 3:
        raise ConfigError("model.lora.load_in_4bit (QLoRA) cannot be sharded by ZeRO-3 here; use a ZeRO-2 or DDP "
                          "launch config, or drop load_in_4bit")
    lines = [f"launch: {layout.path} ({layout.distributed_type}"
             + (f", ZeRO-{stage}" if stage is not None else "")
             + (", optimizer offload" if layout.offload_optimizer else "")
             + (", parameter offload" if layout.offload_params else "")
             + f"), {world} training processes" + (f" + {server} vLLM server GPUs" if server else "")]
    if r.engine != "vllm":
        return lines
    v = r.vllm
    if v.mode == "colocate" and world % v.tensor_parallel_size:
        raise ConfigError(f"rollout.vllm.tensor_parallel_size ({v.tensor_parallel_size}) must divide the "
                          f"{world} training processes in colocate mode")
    if v.mode == "server" and server > layout.per_machine:
        raise ConfigError(f"rollout.vllm: the server's {server} GPUs do not fit on one machine of "
                          f"{layout.per_machine} GPUs")
    if v.mode == "colocate" and v.enable_sleep_mode is False and v.gpu_memory_utilization > 0.9:
        raise ConfigError(f"rollout.vllm.gpu_memory_utilization {v.gpu_memory_utilization} leaves training no "
                          "memory in colocate mode; lower it or set rollout.vllm.enable_sleep_mode=true")
    return lines


def _check_lengths(recipe: Recipe, context: int | None) -> list[str]:
    d, r, e = recipe.data, recipe.rollout, recipe.eval
    declared = r.vllm.max_model_length if r.engine == "vllm" else None
    limit = declared or context
    if limit is None:
        return [f"context: not checked ({recipe.model.name_or_path} is not a known model)"]
    what = "rollout.vllm.max_model_length" if declared else f"{recipe.model.name_or_path}'s context"
    pairs = [("rollout.max_new_tokens", r.max_new_tokens), ("eval.max_new_tokens", e.max_new_tokens or r.max_new_tokens)]
    for key, value in pairs:
        if d.max_prompt_length + value > limit:
            raise ConfigError(f"data.max_prompt_length + {key} = {d.max_prompt_length} + {value} exceeds {what} "
                              f"({limit}); lower one of them")
    if recipe.redi.data is not None or recipe.redi.sft_data is not None:
        if recipe.redi.max_length > limit:
            raise ConfigError(f"redi.max_length ({recipe.redi.max_length}) exceeds {what} ({limit})")
    if declared and context and declared > context:
        return [f"context: {limit} tokens declared by rollout.vllm.max_model_length (the model's config says "
                f"{context}: use a checkpoint whose config was extended)"]
    return [f"context: prompt ≤ {d.max_prompt_length} + completion ≤ {max(v for _, v in pairs)} fits {limit}"]


def compute_dtype(recipe: Recipe, layout: LaunchLayout) -> str:
    """The training forward's compute dtype: the recipe's bf16/fp16, else the launch config's."""
    m = recipe.model
    if m.dtype in ("bfloat16", "float16"):
        return m.dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(layout.mixed_precision, "float32")


def model_state_bytes(recipe: Recipe, layout: LaunchLayout, world: int, params: float) -> dict[str, float]:
    """Weights, gradients and optimizer state per GPU (rltk/precision.py): float32 masters
    with float32 Adam moments (16 bytes/param) without DeepSpeed, bf16 weights and gradients plus a
    sharded float32 master + moments (12 bytes/param) under DeepSpeed mixed precision; a LoRA base
    is frozen in ``model.dtype`` (adapters are not counted); ``pure_bf16`` keeps everything bf16."""
    m, stage, n = recipe.model, layout.zero_stage, world
    shard_w = n if stage == 3 else 1
    if m.lora is not None:
        return {"weights": (0.5 if m.lora.load_in_4bit else bytes_per_value(m.dtype)) * params / shard_w}
    if stage is None:
        b = 2 if m.pure_bf16 else 4
        return {"weights": b * params, "gradients": b * params, "optimizer": 2 * b * params}  # torch AdamW
    half = compute_dtype(recipe, layout) != "float32"
    b = 2 if half else 4
    return {"weights": 0.0 if layout.offload_params else b * params / shard_w,
            "gradients": b * params / (n if stage >= 2 else 1),
            "optimizer": 0.0 if layout.offload_optimizer else (12 if half else 8) * params / n}


def _micro_batch(recipe: Recipe, shape: ModelShape, layout: LaunchLayout, world: int) -> StepShape:
    """The largest micro-batch a training forward sees on one GPU."""
    t, r, m = recipe.trainer, recipe.rollout, recipe.model
    common = dict(compute_dtype=compute_dtype(recipe, layout), gradient_checkpointing=m.gradient_checkpointing,
                  attn_implementation=m.attn_implementation, head_chunk=t.head_chunk_tokens,
                  weight_dtype="float32" if compute_dtype(recipe, layout) == "float32" or (
                      layout.zero_stage is None and not m.pure_bf16) else "bfloat16")  # DeepSpeed's bf16 module
    if recipe.redi.data is not None or recipe.redi.sft_data is not None:
        return StepShape(rows=recipe.redi.micro_batch_size, prompt=0, completion=recipe.redi.max_length, **common)
    per_rank = max(1, t.prompts_per_step // t.mini_batches // world) * r.group_size
    micro = micro_batch_rows(t.micro_batch_size, r.group_size)
    if t.max_tokens_per_micro_batch is not None:  # at most that many tokens: as many longest sequences, rounded up
        micro = -(-t.max_tokens_per_micro_batch // (recipe.data.max_prompt_length + r.max_new_tokens))
    return StepShape(rows=min(micro, per_rank), prompt=recipe.data.max_prompt_length, completion=r.max_new_tokens,
                     **common)


def memory_estimate(recipe: Recipe, layout: LaunchLayout, world: int, shape: ModelShape) -> dict[str, float]:
    """Bytes per training GPU: model states, the frozen reference and teacher models (whole on every
    process, sharded under ZeRO-3: :func:`rltk.trainer.distributed.prepare_frozen`; a teacher of
    unknown size is not counted), and one micro-batch's activations and log-prob working set
    (:mod:`rltk.memory`). vLLM's colocated share is added by the caller."""
    m, params = recipe.model, shape.params
    shard_w = world if layout.zero_stage == 3 else 1
    parts = model_state_bytes(recipe, layout, world, params)

    a, teacher = recipe.algorithm, recipe.teacher
    if "ref_logps" in recipe.algorithm_stages.needs() and m.lora is None:
        parts["reference model"] = bytes_per_value(m.dtype) * params / shard_w
    if a.paced is not None and teacher.name_or_path in KNOWN_MODELS:
        parts["teacher model"] = bytes_per_value(teacher.dtype) * KNOWN_MODELS[teacher.name_or_path].params / shard_w
    parts.update(step_working_set(shape, _micro_batch(recipe, shape, layout, world)))
    return parts


def _precision_line(recipe: Recipe, layout: LaunchLayout) -> str:
    m = recipe.model
    if m.pure_bf16:
        return ("precision: pure bf16 (model.pure_bf16) — no float32 master weights: an update below ~2^-9 of a "
                "weight rounds away (at lr 1e-6 most do)")
    compute = compute_dtype(recipe, layout)
    if compute == "float32":
        return "precision: float32 weights, optimizer state and compute"
    return f"precision: {compute} compute (autocast) over float32 master weights and optimizer state"


def _check_memory(recipe: Recipe, layout: LaunchLayout, world: int, shape: ModelShape | None,
                  gpu_memory_gb: float) -> list[str]:
    if shape is None:
        return ["memory: not checked (model size unknown)"]
    parts = memory_estimate(recipe, layout, world, shape)
    total_gpu = gpu_memory_gb * GIB
    r = recipe.rollout
    if r.engine == "vllm" and r.vllm.mode == "colocate":
        share = r.vllm.gpu_memory_utilization * total_gpu
        weights = 2 * shape.params / r.vllm.tensor_parallel_size
        if share < 1.1 * weights:
            raise ConfigError(f"rollout.vllm.gpu_memory_utilization {r.vllm.gpu_memory_utilization} × "
                              f"{gpu_memory_gb:g} GiB = {share / GIB:.1f} GiB cannot hold vLLM's copy of the weights "
                              f"({weights / GIB:.1f} GiB) plus a KV cache; raise it or the tensor_parallel_size")
        parts["vLLM (gpu_memory_utilization)"] = share
    need = sum(parts.values())
    if r.engine == "vllm" and r.vllm.mode == "colocate" and r.vllm.enable_sleep_mode:
        # vLLM sleeps (weights offloaded, KV cache dropped) while training runs: the two peaks alternate
        step = parts["activations"] + parts["log-prob working set"]
        need -= min(step, parts["vLLM (gpu_memory_utilization)"])
    detail = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items() if v)
    if need > total_gpu:
        raise ConfigError(f"memory: about {need / GIB:.1f} GiB per GPU ({detail}) exceeds {gpu_memory_gb:g} GiB; "
                          "lower trainer.micro_batch_size (or max_tokens_per_micro_batch) or trainer.head_chunk_tokens, "
                          "turn on model.gradient_checkpointing, or use ZeRO-3, offload, LoRA or a lower "
                          "rollout.vllm.gpu_memory_utilization")
    teacher = recipe.teacher.name_or_path if recipe.algorithm.paced is not None else None
    unknown = f"; teacher '{teacher}' not counted (size unknown)" if teacher and "teacher model" not in parts else ""
    asleep = "; vLLM sleeps while training, so the larger of its share and the micro-batch counts" \
        if r.engine == "vllm" and r.vllm.mode == "colocate" and r.vllm.enable_sleep_mode else ""
    return [f"memory: about {need / GIB:.1f} of {gpu_memory_gb:g} GiB per GPU ({detail}){unknown}{asleep}"]


def layout_of(accelerator) -> LaunchLayout:
    """The running job's layout, as :func:`read_launch_config` would read its launch config."""
    from rltk.trainer.distributed import deepspeed_plugin, zero_stage

    plugin = deepspeed_plugin(accelerator)
    zero = plugin.deepspeed_config.get("zero_optimization", {}) if plugin is not None else {}

    def offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "")

    return LaunchLayout("the running job", accelerator.num_processes, 1, str(accelerator.distributed_type),
                        zero_stage(accelerator) if plugin is not None else None, offloaded("offload_optimizer"),
                        offloaded("offload_param"), str(accelerator.mixed_precision))


def check_memory_at_start(recipe: Recipe, accelerator) -> str | None:
    """On a GPU, the memory figure of ``rltk check`` for the running job and this GPU's size: a
    one-line ConfigError when it does not fit, the summary line otherwise; ``None`` on CPU or for a
    model of unknown size."""
    import torch

    if not torch.cuda.is_available():
        return None
    shape, _ = model_facts(recipe)
    if shape is None:
        return None
    total = round(torch.cuda.get_device_properties(accelerator.device).total_memory / GIB, 1)
    return _check_memory(recipe, layout_of(accelerator), accelerator.num_processes, shape, total)[0]


def check_recipe(recipe: Recipe, layout: LaunchLayout, *, explicit_processes: bool = False,
                 gpu_memory_gb: float = 80.0) -> list[str]:
    """Every check of the module docstring; the first failure is a one-line ConfigError."""
    world, server = _training_processes(recipe, layout, explicit_processes)
    shape, context = model_facts(recipe)
    lines = _check_parallelism(recipe, layout, world, server)
    lines += _check_batches(recipe, world)
    lines += _check_lengths(recipe, context)
    lines.append(_precision_line(recipe, layout))
    lines += _check_memory(recipe, layout, world, shape, gpu_memory_gb)
    if recipe.rollout.engine == "vllm":
        from rltk.engines.vllm import vllm_available
        from rltk.trainer.sampler_correction import correction_enabled

        i = recipe.rollout.importance_sampling
        lines.append(f"vllm: {recipe.rollout.vllm.mode} mode; importance sampling "
                     + (f"{i.level}/{i.mode}, cap {i.cap:g}" if correction_enabled(recipe.rollout) else "off")
                     + ("" if vllm_available() else '; vLLM is not installed on this machine (from the rltk checkout: '
                                                  'pip install -e ".[vllm]")'))
    return lines


def check_recipe_file(path: str | Path, overrides: list[str] = (), *, launch: str | None = None,
                      num_processes: int | None = None, gpu_memory_gb: float = 80.0) -> list[str]:
    """``rltk check``: load and validate the recipe, read its launch config, run :func:`check_recipe`."""
    recipe = load_recipe(path, list(overrides))
    if launch is None and intended_launch(path) is not None:
        launch, comment_processes = intended_launch(path)
        num_processes = num_processes or comment_processes
    if launch is None:
        raise ConfigError(f"recipe '{path}' names no launch config: pass --launch or add a '# launch: "
                          "launch/ddp.yaml' comment line at its top")
    if not Path(launch).exists():  # a path relative to the repository the recipe lives in
        found = [parent / launch for parent in Path(path).resolve().parents if (parent / launch).exists()]
        launch = str(found[0]) if found else launch
    layout = read_launch_config(launch, num_processes)
    return [f"recipe: {path}", *check_recipe(recipe, layout, explicit_processes=num_processes is not None,
                                             gpu_memory_gb=gpu_memory_gb)]


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
summary says so. The memory check is a lower bound (weights, gradients, optimizer states, the
reference and teacher models, vLLM's reserved share; activations are not counted), so exceeding
it is a certain out-of-memory, and passing it is not a promise.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
import yaml

from rltk.config import ConfigError, Recipe, load_recipe

GIB = 1024**3

# name -> (parameters, context length = max_position_embeddings of the model's config.json)
KNOWN_MODELS: dict[str, tuple[float, int]] = {
    "Qwen/Qwen2.5-Math-1.5B": (1.54e9, 4096),
    "Qwen/Qwen2.5-Math-7B": (7.62e9, 4096),
    "Qwen/Qwen2.5-Math-1.5B-Instruct": (1.54e9, 4096),
    "Qwen/Qwen2.5-Math-7B-Instruct": (7.62e9, 4096),
    "Qwen/Qwen2.5-Math-72B-Instruct": (72.7e9, 4096),
    "Qwen/Qwen2.5-1.5B-Instruct": (1.54e9, 32768),
    "Qwen/Qwen2.5-7B-Instruct": (7.62e9, 32768),
    "Qwen/Qwen3-4B": (4.02e9, 40960),
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
                        off_param)


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


def model_facts(recipe: Recipe) -> tuple[float | None, int | None]:
    """(parameters, context length) of the recipe's model without downloading; None when unknown."""
    m = recipe.model
    if m.name_or_path == "tiny":
        return None, m.tiny.max_position_embeddings
    if m.name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[m.name_or_path]
    config = Path(m.name_or_path).expanduser() / "config.json"
    if config.is_file():
        return None, json.loads(config.read_text()).get("max_position_embeddings")
    return None, None


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
    from rltk.algos.pipeline import StageCall

    t, r = recipe.trainer, recipe.rollout
    if recipe.redi.data is not None or recipe.redi.sft_data is not None:  # a REDI recipe: its own batch rules
        c = recipe.redi
        if c.batch_size % world:
            raise ConfigError(f"redi.batch_size ({c.batch_size}) must be a multiple of the {world} processes")
        return [f"REDI: {c.batch_size // world} rows per process per step, micro-batches of {c.micro_batch_size}"]
    per_update = t.prompts_per_step // t.mini_batches
    if per_update % world:
        raise ConfigError(f"trainer.prompts_per_step / mini_batches = {per_update} prompts per optimizer step cannot "
                          f"be split over {world} training processes; make it a multiple of {world}")
    per_rank = per_update // world
    sampler = StageCall.from_spec("sampler", recipe.algorithm.sampler).stage.fn
    if getattr(sampler, "provides_roles", False) and per_rank % 2:
        raise ConfigError(f"trainer.prompts_per_step: the pairing sampler needs an even number of prompts per "
                          f"process and optimizer step, got {per_rank} on each of {world} processes")
    completions = per_rank * r.group_size
    micro = t.micro_batch_size // r.group_size * r.group_size if t.micro_batch_size >= r.group_size else \
        t.micro_batch_size
    lines = [f"batches: {per_rank} prompts × {r.group_size} = {completions} completions per process per optimizer "
             f"step, in micro-batches of {min(micro, completions)} ({-(-completions // micro)} per step)"]
    if t.micro_batch_size > r.group_size and t.micro_batch_size % r.group_size:
        lines.append(f"note: micro_batch_size {t.micro_batch_size} is rounded down to {micro} (whole groups)")
    return lines


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


def memory_lower_bound(recipe: Recipe, layout: LaunchLayout, world: int, params: float) -> dict[str, float]:
    """Bytes per training GPU that cannot be avoided: weights, gradients, optimizer, the frozen
    reference and teacher models (whole on every process, sharded under ZeRO-3:
    :func:`rltk.trainer.distributed.prepare_frozen`; a teacher of unknown size is not counted)."""
    m, wb = recipe.model, _bytes_per_weight(recipe.model.dtype)
    stage, n = layout.zero_stage, world
    parts: dict[str, float] = {}
    shard_w = n if stage == 3 else 1
    if m.lora is not None:
        parts["weights"] = (0.5 if m.lora.load_in_4bit else wb) * params / shard_w
    elif stage is None:
        parts.update(weights=wb * params, gradients=wb * params, optimizer=2 * wb * params)  # torch AdamW
    else:  # DeepSpeed mixed precision: fp32 master weights + Adam moments (12 bytes/param)
        parts["weights"] = 0.0 if layout.offload_params else 2 * params / shard_w
        parts["gradients"] = 2 * params / (n if stage >= 2 else 1)
        parts["optimizer"] = 0.0 if layout.offload_optimizer else 12 * params / n
    from rltk.algos.pipeline import AlgorithmPipeline

    a, teacher = recipe.algorithm, recipe.teacher
    if "ref_logps" in AlgorithmPipeline(a.advantage, a.loss, a.aggregation, a.terms).needs() and m.lora is None:
        parts["reference model"] = wb * params / shard_w
    if a.paced is not None and teacher.name_or_path in KNOWN_MODELS:
        parts["teacher model"] = _bytes_per_weight(teacher.dtype) * KNOWN_MODELS[teacher.name_or_path][0] / shard_w
    return parts


def _bytes_per_weight(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _check_memory(recipe: Recipe, layout: LaunchLayout, world: int, params: float | None,
                  gpu_memory_gb: float) -> list[str]:
    if params is None:
        return ["memory: not checked (model size unknown)"]
    parts = memory_lower_bound(recipe, layout, world, params)
    total_gpu = gpu_memory_gb * GIB
    r = recipe.rollout
    if r.engine == "vllm" and r.vllm.mode == "colocate":
        share = r.vllm.gpu_memory_utilization * total_gpu
        weights = 2 * params / r.vllm.tensor_parallel_size
        if share < 1.1 * weights:
            raise ConfigError(f"rollout.vllm.gpu_memory_utilization {r.vllm.gpu_memory_utilization} × "
                              f"{gpu_memory_gb:g} GiB = {share / GIB:.1f} GiB cannot hold vLLM's copy of the weights "
                              f"({weights / GIB:.1f} GiB) plus a KV cache; raise it or the tensor_parallel_size")
        parts["vLLM (gpu_memory_utilization)"] = share
    need = sum(parts.values())
    detail = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items() if v)
    if need > total_gpu:
        raise ConfigError(f"memory: at least {need / GIB:.1f} GiB per GPU ({detail}) exceeds {gpu_memory_gb:g} GiB "
                          "before activations; use a ZeRO-3 launch config, offload, LoRA, or a lower "
                          "rollout.vllm.gpu_memory_utilization")
    teacher = recipe.teacher.name_or_path if recipe.algorithm.paced is not None else None
    unknown = f"; teacher '{teacher}' not counted (size unknown)" if teacher and "teacher model" not in parts else ""
    return [f"memory: ≥ {need / GIB:.1f} of {gpu_memory_gb:g} GiB per GPU before activations ({detail}){unknown}"]


def check_recipe(recipe: Recipe, layout: LaunchLayout, *, explicit_processes: bool = False,
                 gpu_memory_gb: float = 80.0) -> list[str]:
    """Every check of the module docstring; the first failure is a one-line ConfigError."""
    world, server = _training_processes(recipe, layout, explicit_processes)
    params, context = model_facts(recipe)
    lines = _check_parallelism(recipe, layout, world, server)
    lines += _check_batches(recipe, world)
    lines += _check_lengths(recipe, context)
    lines += _check_memory(recipe, layout, world, params, gpu_memory_gb)
    if recipe.rollout.engine == "vllm":
        from rltk.rollout.vllm import vllm_available
        from rltk.trainer.sampler_correction import correction_enabled

        i = recipe.rollout.importance_sampling
        lines.append(f"vllm: {recipe.rollout.vllm.mode} mode; importance sampling "
                     + (f"{i.level}/{i.mode}, cap {i.cap:g}" if correction_enabled(recipe.rollout) else "off")
                     + ("" if vllm_available() else "; vLLM is not installed on this machine (pip install 'rltk[vllm]')"))
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


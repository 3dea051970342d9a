"""Every cross-field rule of a recipe, in one place (docs/design.md §1, "Floors"): ranges, sizes,
templates, sources, trackers, the batch layout (:func:`check_layout`, which the trainer and
``rltk check`` use too) and the algorithm's stages, resolved against their registries. It sits above
the schema and the registries (algos, data, rewards) and below the trainer; :func:`load_recipe` and
:func:`build_recipe` are how every command gets a recipe.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from rltk.schema import AlgorithmConfig, ConfigError, Recipe, convert_value, load_recipe_data, parse_recipe


def build_recipe(data: dict[str, Any], overrides: list[str] = ()) -> Recipe:
    """Apply overrides, build the typed recipe and validate it."""
    recipe = parse_recipe(data, list(overrides))
    validate(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load, override and validate a recipe file."""
    return build_recipe(load_recipe_data(path), list(overrides))


def _positive(value: float, key: str, fix: str = "") -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}{'; ' + fix if fix else ''}")


# accelerate's trackers and the modules each one imports (tensorboard: either package will do)
_TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",),
             "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",),
             "dvclive": ("dvclive",), "swanlab": ("swanlab",)}
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
PRODUCERS = ("auto", "thread", "process")  # rollout.producer


def _validate_values(recipe: Recipe) -> None:
    """Ranges and names of single fields that need no registry."""
    from transformers import SchedulerType

    from rltk.data.templates import TEMPLATES

    t, d, e, m = recipe.trainer, recipe.data, recipe.eval, recipe.model
    for key, value in [("data.num_train", d.num_train), ("data.num_test", d.num_test),
                       ("data.heldout_size", d.heldout_size),
                       ("data.max_prompt_length", d.max_prompt_length), ("eval.batch_size", e.batch_size),
                       ("eval.max_new_tokens", e.max_new_tokens), ("eval.num_problems", e.num_problems),
                       ("eval.temperature", e.temperature), ("trainer.keep_checkpoints", t.keep_checkpoints),
                       ("verifier.num_workers", recipe.verifier.num_workers), ("sft.lr", recipe.sft.lr),
                       ("model.tiny.hidden_size", m.tiny.hidden_size), ("model.tiny.num_layers", m.tiny.num_layers),
                       ("model.tiny.num_heads", m.tiny.num_heads),
                       ("model.tiny.intermediate_size", m.tiny.intermediate_size),
                       ("model.lora.r", m.lora.r if m.lora else None)]:
        if value is not None:
            _positive(value, key)
    for key, value in [("rollout.top_k", recipe.rollout.top_k), ("trainer.max_grad_norm", t.max_grad_norm),
                       ("trainer.save_every", t.save_every), ("trainer.eval_every", t.eval_every),
                       ("trainer.weight_decay", t.weight_decay)]:
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if m.tiny.hidden_size % m.tiny.num_heads:
        raise ConfigError(f"model.tiny.hidden_size ({m.tiny.hidden_size}) must be a multiple of "
                          f"model.tiny.num_heads ({m.tiny.num_heads})")
    if e.ks is not None and (not e.ks or min(e.ks) < 1):
        raise ConfigError(f"eval.ks: every k must be >= 1, got {e.ks}")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"trainer.adam_betas: expected two numbers in [0, 1), got {t.adam_betas}")
    if not 0 <= recipe.sft.warmup_ratio < 1:
        raise ConfigError(f"sft.warmup_ratio: must be in [0, 1), got {recipe.sft.warmup_ratio}")
    _validate_rollout_engine(recipe)
    schedulers = sorted(s.value for s in SchedulerType)
    if t.lr_scheduler not in schedulers:
        close = difflib.get_close_matches(t.lr_scheduler, schedulers, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"trainer.lr_scheduler: unknown scheduler '{t.lr_scheduler}'{hint}; one of {', '.join(schedulers)}")
    _validate_trackers(recipe.logging.report_to)
    if d.template not in TEMPLATES and "{question}" not in d.template:
        raise ConfigError(f"data.template: unknown template '{d.template}'; use one of {', '.join(sorted(TEMPLATES))} "
                          "or a string containing {question}")
    _check_format("data.template", TEMPLATES.get(d.template, d.template), question="q")
    _check_format("data.answer_template", d.answer_template, answer="a")
    _check_format("teacher.privileged_template", recipe.teacher.privileged_template, solution="s", prompt="p")
    _validate_sources(recipe)


def _check_format(key: str, template: str, **fields: str) -> None:
    """``template.format(**fields)`` works: every ``{name}`` is one of ``fields``, literal braces doubled."""
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        names = ", ".join("{" + f + "}" for f in fields)
        raise ConfigError(f"{key}: {template!r} is not a valid template ({type(exc).__name__}: {exc}); it may name "
                          f"only {names}, and literal braces are doubled, e.g. \\boxed{{{{}}}}") from None


def _validate_trackers(report_to: list[str]) -> None:
    """Every tracker is one accelerate knows and its package is installed (looked up, not imported)."""
    for name in report_to:
        if name not in _TRACKERS:
            close = difflib.get_close_matches(name, list(_TRACKERS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"logging.report_to: unknown tracker '{name}'{hint}; "
                              f"one of {', '.join(sorted(_TRACKERS))}")
        if not any(importlib.util.find_spec(module) is not None for module in _TRACKERS[name]):
            raise ConfigError(f"logging.report_to: tracker '{name}' is not installed; pip install {_TRACKERS[name][0]} "
                              "or drop it from logging.report_to")


def _validate_rollout_engine(recipe: Recipe) -> None:
    """vLLM and importance-sampling knobs; whether vLLM is installed is checked when the engine is made."""
    v, i = recipe.rollout.vllm, recipe.rollout.importance_sampling
    if not 0 < v.gpu_memory_utilization <= 1:
        raise ConfigError("rollout.vllm.gpu_memory_utilization: must be in (0, 1]")
    for key, value in [("tensor_parallel_size", v.tensor_parallel_size), ("server_timeout", v.server_timeout),
                       ("server_data_parallel_size", v.server_data_parallel_size),
                       ("max_model_length", v.max_model_length), ("max_num_seqs", v.max_num_seqs)]:
        if value is not None:
            _positive(value, f"rollout.vllm.{key}")
    if i.cap <= 1:
        raise ConfigError(f"rollout.importance_sampling.cap: must be > 1 (a ratio of 1 is on-policy), got {i.cap}")
    names = [s.name for s in recipe.eval.sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.sets: names must be unique, got {names}")
    for k, s in enumerate(recipe.eval.sets):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name):
            raise ConfigError(f"eval.sets[{k}].name: {s.name!r} must be letters, digits, '_', '-' or '.'")
        if s.num_problems is not None:
            _positive(s.num_problems, f"eval.sets[{k}].num_problems")


def _validate_sources(recipe: Recipe) -> None:
    """Local files and directories named in the recipe exist; built-in levels are known."""
    from rltk.data.synthetic import LEVELS

    d = recipe.data
    for key, source in [("data.source", d.source), ("data.eval_source", d.eval_source)]:
        if source and source != "builtin" and (source.endswith(_DATA_SUFFIXES) or source.startswith((".", "/", "~")))\
                and not Path(source).expanduser().exists():
            raise ConfigError(f"{key}: data file '{source}' does not exist")
    if "builtin" in (d.source, d.eval_source) and (not d.levels or any(level not in LEVELS for level in d.levels)):
        raise ConfigError(f"data.levels: built-in task levels are {sorted(LEVELS)}, got {d.levels}")
    from rltk.data.heldout import oversized_heldout

    problem = oversized_heldout(d)
    if problem:
        raise ConfigError(problem)
    for key, path in [("model.name_or_path", recipe.model.name_or_path), ("model.ref_model", recipe.model.ref_model)]:
        if path and path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise ConfigError(f"{key}: model directory '{path}' does not exist")
    if d.chat_template and not _may_have_chat_template(recipe.model.name_or_path):
        raise ConfigError(f"data.chat_template: the tokenizer of '{recipe.model.name_or_path}' has no chat template; "
                          "set data.chat_template=false or use an instruct model's tokenizer")


def _may_have_chat_template(name_or_path: str) -> bool:
    """False when the tokenizer surely has no chat template: the built-in tiny model, or a local
    directory whose tokenizer files carry none. A Hub id is checked when the tokenizer loads."""
    if name_or_path == "tiny":
        return False
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return True
    if any((path / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        return "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return True


# Upper limits on sizes, far above any real run: a typo such as `prompts_per_step: 1000000000` fails here with one
# line instead of allocating gigabytes (or overflowing) later. docs/reliability.md, "Malformed recipes".
SIZE_LIMITS = {
    "trainer.prompts_per_step": 1_000_000,
    "rollout.group_size": 65_536,
    "rollout.max_new_tokens": 1_048_576,
    "eval.max_new_tokens": 1_048_576,
    "eval.n": 65_536,
    "data.max_prompt_length": 1_048_576,
    "verifier.num_workers": 1_024,
    "verifier.deadline_s": 3_600,
    "rollout.vllm.server_timeout": 86_400,
    "model.tiny.hidden_size": 65_536,
    "model.tiny.intermediate_size": 1_048_576,
    "model.tiny.num_layers": 1_024,
    "model.tiny.max_position_embeddings": 1_048_576,
    "trainer.max_tokens_per_micro_batch": 1_073_741_824,
    "rollout.max_tokens_per_batch": 1_073_741_824,
    "rollout.max_refill_rounds": 1_000,
    "rollout.max_staleness": 1_000,
    "rollout.producer_threads": 1_024,
}
MAX_COMPLETIONS_PER_STEP = 16_777_216  # trainer.prompts_per_step × rollout.group_size (2**24)
MAX_SEED = 2**31 - 1  # numpy takes seeds < 2**32 and accelerate adds the process index to trainer.seed


def _validate_limits(recipe: Recipe) -> None:
    """Size caps, seeds and the run directory's name: checks that must pass before anything is allocated."""
    t = recipe.trainer
    for key, limit in SIZE_LIMITS.items():
        value = _walk_attrs(recipe, key)
        if value is not None and value > limit:
            raise ConfigError(f"{key}: {value} is above the limit of {limit:,}")
    completions = t.prompts_per_step * recipe.rollout.group_size
    if completions > MAX_COMPLETIONS_PER_STEP:
        raise ConfigError(f"trainer.prompts_per_step × rollout.group_size = {completions:,} completions per rollout "
                          f"batch is above the limit of {MAX_COMPLETIONS_PER_STEP:,}")
    for key, seed in [("trainer.seed", t.seed), ("model.tiny.seed", recipe.model.tiny.seed)]:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{key}: must be in [0, 2**31 - 1] (numpy and accelerate seed with it), got {seed}")
    if not t.output_dir.strip():
        raise ConfigError("trainer.output_dir: must name a directory, got an empty string")


def _walk_attrs(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def validate(recipe: Recipe) -> None:
    """Cross-field rules. The algorithm section is resolved once against the registries into
    ``recipe.algorithm_stages`` (an :class:`rltk.algos.Algorithm`), which the trainer uses."""
    from rltk.algos.pipeline import Algorithm
    from rltk.algos.registry import StageError

    t, r = recipe.trainer, recipe.rollout
    for key, value in [
        ("trainer.steps", t.steps),
        ("trainer.prompts_per_step", t.prompts_per_step),
        ("trainer.micro_batch_size", t.micro_batch_size),
        ("trainer.ppo_epochs", t.ppo_epochs),
        ("trainer.mini_batches", t.mini_batches),
        ("trainer.lr", t.lr),
        ("rollout.group_size", r.group_size),
        ("rollout.max_new_tokens", r.max_new_tokens),
        ("rollout.batch_size", r.batch_size),
        ("eval.n", recipe.eval.n),
        ("sft.steps", recipe.sft.steps),
        ("sft.batch_size", recipe.sft.batch_size),
        ("verifier.deadline_s", recipe.verifier.deadline_s),
        ("trainer.max_bad_steps", t.max_bad_steps),
        ("trainer.logprob_chunk_size", t.logprob_chunk_size),
    ]:
        _positive(value, key)
    _validate_limits(recipe)
    if t.head_chunk_tokens < 0:
        raise ConfigError(f"trainer.head_chunk_tokens: must be >= 0 (0 = full logits), got {t.head_chunk_tokens}")
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature: must be > 0 for sampling, got {r.temperature}")
    if not 0 < r.top_p <= 1 or not 0 < recipe.eval.top_p <= 1:
        raise ConfigError("rollout.top_p and eval.top_p must be in (0, 1]")
    if recipe.eval.ks and max(recipe.eval.ks) > recipe.eval.n:
        raise ConfigError(f"eval.ks: k = {max(recipe.eval.ks)} exceeds eval.n = {recipe.eval.n}; raise eval.n")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"trainer.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    _validate_values(recipe)
    _convert_stage_params(recipe.algorithm)
    a = recipe.algorithm
    try:
        algorithm = Algorithm.resolve(a.advantage, a.loss, a.aggregation, a.terms, a.sampler, a.shaping)
        # checks its knobs on a small stand-in dataset: never sized by the recipe, so nothing big is allocated
        algorithm.make_sampler(_DRY_RUN_PROMPTS, t.seed)  # what it raises is one line naming the sampler
        algorithm.pipeline.dry_run()
    except StageError as exc:
        raise ConfigError(f"algorithm: {exc}") from None
    if "roles" in algorithm.needs() and not algorithm.provides_roles:
        raise ConfigError("algorithm.sampler: the selected stages need per-group roles, which the "
                          f"'{algorithm.sampler.name}' sampler does not provide; use sampler: {{name: pairing}}")
    if r.group_size == 1 and algorithm.group_baseline:
        raise ConfigError(
            f"rollout.group_size: 1 gives '{algorithm.pipeline.estimator.name}' a zero advantage for every completion; "
            "use group_size >= 2 or the reinforce estimator"
        )
    recipe.algorithm_stages = algorithm
    check_layout(recipe, world_size=1)
    if recipe.model.pure_bf16 and recipe.model.dtype != "bfloat16":
        raise ConfigError(f"model.pure_bf16: true trains bfloat16 weights, but model.dtype is {recipe.model.dtype}; "
                          "set model.dtype: bfloat16, or drop pure_bf16 for float32 master weights")
    if recipe.model.lora is not None and recipe.model.ref_model is not None:
        raise ConfigError("model.ref_model and model.lora conflict: under LoRA the reference is the base model "
                          "with the adapter disabled; drop model.ref_model")
    _validate_paced(recipe)
    _validate_rewards(recipe)


_DRY_RUN_PROMPTS = 8  # dataset size the sampler is built with when the recipe loads (even, for pairing)


def check_layout(recipe: Recipe, world_size: int) -> list[str]:
    """The batch layout over ``world_size`` training processes: every optimizer step holds whole prompt
    groups on every process, pairs stay together for a sampler with roles, whole groups per micro-batch
    for a loss that reads them. Used when the recipe loads (one process), by the trainer (its world)
    and by ``rltk check`` (the launch's). Raises the first problem as a one-line ConfigError; returns a
    summary of the layout otherwise."""
    t, r, algorithm = recipe.trainer, recipe.rollout, recipe.algorithm_stages
    if t.prompts_per_step % t.mini_batches:
        raise ConfigError(
            f"trainer.prompts_per_step ({t.prompts_per_step}) must be divisible by trainer.mini_batches "
            f"({t.mini_batches}) so every mini-batch holds whole prompt groups"
        )
    updates = t.ppo_epochs * t.mini_batches
    if t.steps % updates:
        raise ConfigError(f"trainer.steps ({t.steps}) must be a multiple of ppo_epochs × mini_batches ({updates})")
    per_update = t.prompts_per_step // t.mini_batches
    if per_update % world_size:
        raise ConfigError(f"trainer.prompts_per_step / mini_batches = {per_update} prompts per optimizer step cannot "
                          f"be split over {world_size} training processes; make it a multiple of {world_size}")
    per_rank = per_update // world_size
    if algorithm.provides_roles and per_rank % 2:
        where = f" on each of {world_size} processes" if world_size > 1 else ""
        raise ConfigError(f"trainer.prompts_per_step: the {algorithm.sampler.name} sampler needs an even number of "
                          f"prompts per process and optimizer step (pairs of q+ and q-), got {per_rank}{where}")
    if algorithm.pipeline.whole_groups and t.micro_batch_size < r.group_size:
        raise ConfigError(f"trainer.micro_batch_size ({t.micro_batch_size}) must be >= rollout.group_size "
                          f"({r.group_size}) with the {algorithm.pipeline.loss.name} loss, which reads whole groups")
    _check_token_budgets(recipe)
    if r.max_staleness > 0 and world_size > 1:
        _check_async_layout(recipe, world_size)
    completions = per_rank * r.group_size
    micro = micro_batch_rows(t.micro_batch_size, r.group_size)
    head = f"batches: {per_rank} prompts × {r.group_size} = {completions} completions per process per optimizer step"
    if t.max_tokens_per_micro_batch is not None:
        packed = ", packed without padding" if t.padding_free else ""
        return [f"{head}, sorted by length into forwards of at most {t.max_tokens_per_micro_batch} tokens{packed}"]
    lines = [f"{head}, in micro-batches of {min(micro, completions)} ({-(-completions // micro)} per step)"]
    if micro != t.micro_batch_size:
        lines.append(f"note: micro_batch_size {t.micro_batch_size} is rounded down to {micro} (whole groups)")
    return lines


def _check_async_layout(recipe: Recipe, world_size: int) -> None:
    """Asynchronous generation on several processes: each process's producer thread runs beside its
    trainer thread, so it must run no collective (two threads' collectives on one process group
    would interleave differently on each process). What would gather in the producer is refused."""
    r, algorithm = recipe.rollout, recipe.algorithm_stages
    sampler = algorithm.sampler.stage
    gathering = [why for why, applies in (
        ("rollout.dynamic_sampling (every process runs as many refill rounds)", r.dynamic_sampling),
        ("rollout.engine: vllm (weight pushes and server generation are collective)", r.engine == "vllm"),
        (f"the {algorithm.sampler.name} sampler (it probes the policy)", sampler.provides_roles),
        (f"the {algorithm.sampler.name} sampler (it observes every process's outcomes)",
         getattr(sampler.fn, "wants_outcomes", False)),
    ) if applies]
    if gathering:
        raise ConfigError(f"rollout.max_staleness ({r.max_staleness}) on {world_size} processes: the producer would "
                          f"gather over processes for {gathering[0]}; that runs on one process only so far "
                          "(or set rollout.max_staleness: 0)")


def _check_token_budgets(recipe: Recipe) -> None:
    """The token budgets must hold the longest sequence the run can produce (one line naming both
    numbers): the policy's micro-batches one prompt + completion (a whole group where the loss reads
    groups), the hf engine's generate calls one prompt + its longest generation."""
    t, r, d = recipe.trainer, recipe.rollout, recipe.data
    longest = d.max_prompt_length + r.max_new_tokens
    budget = t.max_tokens_per_micro_batch
    if budget is not None:
        _positive(budget, "trainer.max_tokens_per_micro_batch")
        if recipe.algorithm_stages.pipeline.whole_groups and budget < r.group_size * longest:
            raise ConfigError(
                f"trainer.max_tokens_per_micro_batch ({budget}) must hold a whole group of the "
                f"{recipe.algorithm_stages.pipeline.loss.name} loss: rollout.group_size × (data.max_prompt_length + "
                f"rollout.max_new_tokens) = {r.group_size} × {longest} = {r.group_size * longest} tokens")
        if budget < longest:
            raise ConfigError(f"trainer.max_tokens_per_micro_batch ({budget}) is smaller than the longest sequence, "
                              f"data.max_prompt_length + rollout.max_new_tokens = {longest} tokens")
    if r.engine != "hf":
        for key, value in (("max_tokens_per_batch", r.max_tokens_per_batch), ("continuous_batching", r.continuous_batching),
                           ("drop_finished", r.drop_finished)):
            if value not in (None, False):
                raise ConfigError(f"rollout.{key}: applies to the hf engine only (vLLM schedules its own batches); "
                                  "remove it or set rollout.engine: hf")
    if r.max_refill_rounds < 0:
        raise ConfigError(f"rollout.max_refill_rounds: {r.max_refill_rounds} is negative (extra generation rounds "
                          "per step; 0 = dynamic sampling without refill)")
    if r.max_staleness < 0:
        raise ConfigError(f"rollout.max_staleness: {r.max_staleness} is negative (optimizer steps a rollout batch may "
                          "lag behind; 0 = synchronous)")
    if r.producer not in PRODUCERS:
        raise ConfigError(f"rollout.producer: {r.producer!r} is not one of {', '.join(PRODUCERS)}")
    if r.producer == "process" and r.engine != "hf":
        raise ConfigError("rollout.producer: process applies to the hf engine only (vLLM samples in its own engine "
                          "or server); remove it")
    if r.producer_threads < 0:
        raise ConfigError(f"rollout.producer_threads: {r.producer_threads} is negative (0 = half the trainer's threads)")
    if r.producer_timeout_s < 0:
        raise ConfigError(f"rollout.producer_timeout_s: {r.producer_timeout_s} is negative (0 = no limit)")
    if r.max_staleness > 0 and r.importance_sampling.enabled is False:
        raise ConfigError("rollout.max_staleness > 0 trains on completions sampled by older weights, which needs the "
                          "importance weights to that behaviour policy: remove rollout.importance_sampling.enabled: "
                          "false (or set rollout.max_staleness: 0)")
    if r.drop_finished and r.continuous_batching:
        raise ConfigError("rollout.drop_finished and rollout.continuous_batching: pick one (continuous batching "
                          "already frees a finished row's slot)")
    if r.max_tokens_per_batch is not None:
        _positive(r.max_tokens_per_batch, "rollout.max_tokens_per_batch")
        generated = max(r.max_new_tokens, recipe.eval.max_new_tokens or r.max_new_tokens)
        if r.max_tokens_per_batch < d.max_prompt_length + generated:
            raise ConfigError(f"rollout.max_tokens_per_batch ({r.max_tokens_per_batch}) is smaller than one row of a "
                              f"generate call, data.max_prompt_length + the longest max_new_tokens = "
                              f"{d.max_prompt_length + generated} tokens")


def micro_batch_rows(micro_batch_size: int, group_size: int) -> int:
    """Rows per micro-batch: ``micro_batch_size`` rounded down to whole groups when it holds at least one."""
    return micro_batch_size // group_size * group_size if micro_batch_size >= group_size else micro_batch_size


def _stage_slots(a: AlgorithmConfig) -> list[tuple[str, str, Any]]:
    """(kind, recipe key, spec) of every stage entry of ``algorithm``."""
    slots = []
    if isinstance(a.advantage, list):
        slots += [("advantage" if i == 0 else "modifier", f"algorithm.advantage[{i}]", spec)
                  for i, spec in enumerate(a.advantage)]
    slots += [("loss", "algorithm.loss", a.loss), ("aggregation", "algorithm.aggregation", a.aggregation),
              ("sampler", "algorithm.sampler", a.sampler)]
    if isinstance(a.terms, list):
        slots += [("term", f"algorithm.terms[{i}]", spec) for i, spec in enumerate(a.terms)]
    if isinstance(a.shaping, list):
        slots += [("shaping", f"algorithm.shaping[{i}]", spec) for i, spec in enumerate(a.shaping)]
    return slots


def _convert_stage_params(a: AlgorithmConfig) -> None:
    """Stage parameters typed like every other field, in place: each value is converted to the type
    its stage annotates (``coef: abc`` for a float is one line naming the key, the stage and the type;
    ``1e-4`` read as a string by YAML 1.1 becomes a float), and a non-finite float is refused even
    where the stage gives no annotation. Unknown stages and parameters are left to the registry,
    which names the valid ones."""
    from rltk.algos.registry import get_stage

    for kind, key, spec in _stage_slots(a):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            continue
        try:
            stage = get_stage(kind, spec["name"])
        except Exception:  # unknown or broken: building the pipeline reports it in one line
            continue
        hints = _stage_hints(stage)
        for name in [k for k in spec if k != "name"]:
            where = f"{key}.{name} ({kind} '{spec['name']}')"
            hint = hints.get(name)
            if hint is not None and _convertible(hint):
                spec[name] = convert_value(spec[name], hint, where)
            else:
                _refuse_non_finite(spec[name], where)


def _stage_hints(stage: Any) -> dict[str, Any]:
    """Resolved annotations of the parameters a recipe may set; {} where they cannot be resolved."""
    import inspect

    target = stage.fn.__init__ if inspect.isclass(stage.fn) else stage.fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # user code with annotations that do not resolve: values are passed as given
        return {}
    return {name: hints[name] for name in stage.parameters() if name in hints}


def _convertible(tp: Any) -> bool:
    """Whether ``_convert`` can check a value against ``tp`` (plain scalars, Literal, unions and lists of them)."""
    if tp in (int, float, str, bool, type(None)):
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType, list):
        return all(_convertible(arg) for arg in typing.get_args(tp))
    return False


def _refuse_non_finite(value: Any, where: str) -> None:
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{where}: must be a finite number, got {item}")


def _validate_paced(recipe: Recipe) -> None:
    """``algorithm.paced`` needs exactly one teacher; ``pg_coef`` 0 needs something else to train."""
    a, teacher = recipe.algorithm, recipe.teacher
    if a.pg_coef < 0:
        raise ConfigError(f"algorithm.pg_coef: must be >= 0, got {a.pg_coef}")
    if a.paced is None:
        if a.pg_coef == 0:
            raise ConfigError("algorithm.pg_coef: 0 leaves nothing to train; set it > 0 or add algorithm.paced")
        if teacher.name_or_path or teacher.privileged:
            raise ConfigError("teacher: is only used by algorithm.paced; add algorithm.paced or drop the teacher "
                              "section")
        return
    if bool(teacher.name_or_path) == teacher.privileged:
        raise ConfigError("teacher: algorithm.paced needs exactly one of teacher.name_or_path (a separate model) "
                          "or teacher.privileged: true (the student with the gold solution in its prompt)")
    if teacher.privileged:
        try:
            teacher.privileged_template.format(solution="", prompt="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"teacher.privileged_template: only {{solution}} and {{prompt}} may appear "
                              f"(double literal braces): {exc}") from None
    path = teacher.name_or_path
    if path and path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise ConfigError(f"teacher.name_or_path: model directory '{path}' does not exist")
    if a.pg_coef == 0 and a.paced.coef == 0:
        raise ConfigError("algorithm.paced.coef: 0 with algorithm.pg_coef 0 leaves nothing to train")


def _validate_rewards(recipe: Recipe) -> None:
    """Each reward is a function that can be called as TRL calls it, or a reward model that exists;
    labels (metric names) are unique."""
    from rewards.registry import load_reward_function

    if not recipe.rewards:
        raise ConfigError("rewards: list at least one reward function, e.g. [{name: math}]")
    for i, spec in enumerate(recipe.rewards):
        if (spec.name is None) == (spec.model is None):
            raise ConfigError(f"rewards[{i}]: give exactly one of name (a reward function) or model (a reward model), "
                              f"got {'both' if spec.name else 'neither'}")
        _refuse_non_finite(spec.weight, f"rewards[{i}].weight")
        if spec.model is not None:
            if spec.kwargs:
                raise ConfigError(f"rewards[{i}].kwargs: only reward functions take kwargs, not model {spec.model!r}")
            _positive(spec.batch_size, f"rewards[{i}].batch_size")
            if spec.model.startswith((".", "/", "~")) and not Path(spec.model).expanduser().is_dir():
                raise ConfigError(f"rewards[{i}].model: reward model directory '{spec.model}' does not exist")
            continue
        try:
            load_reward_function(spec.name, spec.weight, spec.kwargs)
        except ValueError as exc:
            raise ConfigError(f"rewards[{i}]: {exc}") from None
    labels = [spec.label for spec in recipe.rewards]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"rewards: each reward may appear once (its metrics are named after it), got {labels}")

"""The recipe schema (docs/design.md §5): typed sections, conversion of plain data, dotted overrides
and YAML loading. The ground floor: it imports nothing of rltk.

A recipe is a YAML mapping with the sections of :class:`Recipe`. Every field is documented where
it is defined. :func:`parse_recipe` checks unknown keys (with the closest valid key) and types (field,
value and expected type); the cross-field rules live one floor up, in :mod:`rltk.validate`, which
every loader goes through. Every problem is a :class:`ConfigError` whose message is one line, which
the CLI prints before exiting with code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe problem: one line naming the key, the value and the fix."""


class _RangeError(ConfigError):
    """A value of the right type outside what its type may hold (NaN, inf, a 64-bit overflow): the
    most specific message, kept when a ``Union`` tries its other options."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA adapters through peft (Hu et al. 2021). The reference policy is the base model with the
    adapter disabled, so no second copy of the weights is loaded."""

    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator (effective scale alpha / r)
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"  # peft target modules
    load_in_4bit: bool = False  # QLoRA: quantise the frozen base with bitsandbytes (GPU only)


@dataclass
class TinyModelConfig:
    """The built-in tiny Qwen2 model, used when ``model.name_or_path`` is ``tiny``.

    Defaults are the calibrated ones of docs/design.md §9 (0.53M parameters, learns 2-digit addition)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    seed: int = 0  # initialisation seed


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"  # HF model id, local HF directory, or "tiny" (built-in tiny model)
    # compute dtype: bfloat16/float16 = mixed precision (autocast) over float32 master weights and optimizer
    #   state; frozen models (reference, evaluation) load in it directly (docs/distributed.md, "Precision")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    pure_bf16: bool = False  # train bf16 weights in place, no float32 masters: most updates at lr ~1e-6 round away
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False  # off unless a recipe turns it on: remote code is code
    attn_implementation: Union[str, None] = None  # e.g. "sdpa", "flash_attention_2"
    ref_model: Union[str, None] = None  # reference model; default: the initial policy weights
    lora: Union[LoraConfig, None] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    source: str = "builtin"  # "builtin", a local .jsonl/.json/.parquet path, or an HF dataset id
    subset: Union[str, None] = None  # HF dataset configuration name
    levels: list[int] = field(default_factory=lambda: [1])  # built-in task difficulty levels
    train_split: str = "train"
    test_split: str = "test"
    eval_source: Union[str, None] = None  # held-out set if different from ``source``
    prompt_field: str = "problem"
    answer_field: str = "answer"
    solution_field: Union[str, None] = None  # worked solutions, used by SFT
    extract_boxed_answer: bool = False  # answer_field holds a solution; take its last \boxed{}
    template: str = "builtin"  # a name in rltk.data.templates.TEMPLATES or a string with {question}
    answer_template: str = "\\boxed{{{answer}}}"  # how a gold answer is written (GARL likelihood mode)
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template (conversational prompts always are)
    # extra arguments of tokenizer.apply_chat_template, e.g. {enable_thinking: false} for Qwen3
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    system_prompt: Union[str, None] = None  # a system turn (chat) or first line; conversational rows may hold their own
    num_train: Union[int, None] = None  # cap on training prompts (None: all / built-in default)
    num_test: Union[int, None] = 200  # held-out prompts for periodic and final evaluation
    # Rows carved out of the training split and evaluated on instead, when the source has no test split
    # of its own (one file, a directory without test* files, a Hub dataset without it) and no other
    # eval_source is set: the questions with the lowest SHA-1 (no seed: the same at every seed and
    # resume), never trained on. None = num_test. docs/recipes.md, "Held-out data".
    heldout_size: Union[int, None] = None
    max_prompt_length: int = 512  # longer prompts are skipped and counted


@dataclass
class VLLMConfig:
    """vLLM rollouts (GPU only) through trl's ``VLLMGeneration`` (docs/vllm.md).

    ``colocate``: every training process runs its own vLLM engine on its own GPU(s), sharing memory
    with training. ``server``: one ``trl vllm-serve`` process on dedicated GPUs (launch/vllm_server.sh)
    samples for all training processes. Weights are pushed to vLLM before the first generation after
    any optimizer step."""

    mode: Literal["colocate", "server"] = "colocate"
    gpu_memory_utilization: float = 0.3  # colocate: share of each GPU's memory vLLM may take (weights + KV cache)
    tensor_parallel_size: int = 1  # colocate: GPUs per vLLM engine (must divide the process count); server: the
    #                                 server's --tensor-parallel-size, used by `rltk check` to count its GPUs
    enable_sleep_mode: bool = False  # colocate: free vLLM's weights and KV cache while training steps run
    max_model_length: Union[int, None] = None  # vLLM context; None = data.max_prompt_length + longest max_new_tokens
    max_num_seqs: Union[int, None] = None  # cap on sequences vLLM decodes at once (None: vLLM's default)
    server_host: str = "127.0.0.1"  # server mode: where `trl vllm-serve` listens
    server_port: int = 8000
    server_timeout: float = 240.0  # server mode: seconds to wait for the server to answer /health/
    group_port: int = 51216  # server mode: port of the NCCL group that streams weights to the server
    server_data_parallel_size: int = 1  # server mode: the server's --data-parallel-size (GPUs = tp × dp)


@dataclass
class ImportanceSamplingConfig:
    """Truncated importance sampling between the sampler's and the trainer's log-probs
    (rltk.algos.importance; Yao et al. 2025; TRL's ``vllm_importance_sampling_*``). The per-token
    policy loss is multiplied by w = f(exp(old_logp − sampling_logp)), a detached weight."""

    enabled: Union[bool, None] = None  # None: on with rollout.engine=vllm or rollout.max_staleness > 0, else off
    level: Literal["token", "sequence"] = "token"  # one ratio per token, or exp(Σ_t diff) per sequence
    mode: Literal["truncate", "mask"] = "truncate"  # min(ratio, cap), or weight 0 where ratio > cap
    cap: float = 3.0  # TRL's vllm_importance_sampling_clip_max default


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    group_size: int = 8  # completions per prompt (G)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 32
    batch_size: int = 256  # completions generated per call of the hf engine
    # hf engine: completions sorted by prompt length and cut into generate calls of at most this many
    # tokens (rows × (longest prompt + max_new_tokens)); None = batch_size rows per call, in order
    max_tokens_per_batch: Union[int, None] = None
    continuous_batching: bool = False  # hf engine: transformers' continuous batching (a finished row frees its slot)
    drop_finished: bool = False  # hf engine: rltk's decode loop, finished rows leave the batch and the KV cache
    # DAPO's dynamic sampling: further rounds of prompts until every group has rewards that differ,
    # at most max_refill_rounds extra rounds per step (then uninformative groups fill the step)
    dynamic_sampling: bool = False
    max_refill_rounds: int = 4
    # asynchronous generation: a producer samples rollout batches ahead, at most this many optimizer
    # steps behind the weights they are trained on (0 = the synchronous loop); docs/pipeline.md
    max_staleness: int = 0
    # where the hf engine's producer samples: "process" (a worker process with producer_threads torch
    # threads of its own, weights in shared memory), "thread" (in the trainer's process), "auto"
    # (process for a policy on CPU, thread on a GPU); rltk/engines/worker.py
    producer: str = "auto"
    producer_threads: int = 0  # 0: half the trainer's torch threads (at least 1); the trainer keeps the rest
    # the trainer waits at most this long for the producer's next batch (a reward that hangs), 0 = no limit
    producer_timeout_s: float = 1800.0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    importance_sampling: ImportanceSamplingConfig = field(default_factory=ImportanceSamplingConfig)


@dataclass
class PacedConfig:
    """PACED distillation in the RL loop (arXiv 2603.11178; docs/algorithms/reference.md §7; docs/algorithms/paced.md):
    coef · Σ_i w(p_i)·KL_i / Σ_i w(p_i) over the step's completions, KL_i the token mean of the
    full-vocabulary KL to ``teacher`` and w(p) = p^α(1 − p)^β from the group's pass rate p."""

    coef: float = 1.0  # weight of the PACED loss next to pg_coef × the policy loss (rltk)
    alpha: float = 1.0  # exponent of p (paper default 1)
    beta: float = 1.0  # exponent of 1 − p (paper default 1)
    schedule: Literal["forward", "reverse", "forward_then_reverse"] = "forward_then_reverse"  # KL direction
    switch_step: Union[int, None] = None  # optimizer step where forward_then_reverse turns reverse
    chunk_size: int = 4096  # vocabulary entries per KL chunk (memory vs speed; rltk)

    def __post_init__(self) -> None:
        for key in ("coef", "alpha", "beta"):
            if getattr(self, key) < 0:
                raise ConfigError(f"algorithm.paced.{key}: must be >= 0, got {getattr(self, key)}")
        if self.chunk_size < 1:
            raise ConfigError(f"algorithm.paced.chunk_size: must be >= 1, got {self.chunk_size}")
        if self.schedule == "forward_then_reverse" and (self.switch_step is None or self.switch_step < 0):
            raise ConfigError("algorithm.paced.switch_step: schedule forward_then_reverse needs the optimizer step "
                              f"at which to switch to reverse KL (>= 0), got {self.switch_step}")


@dataclass
class AlgorithmConfig:
    """The pluggable stage. Each entry is a name or ``{name: ..., **params}``; a name may be an
    import path ``package.module:function`` for user code."""

    shaping: list[Any] = field(default_factory=list)  # reward-shaping terms, e.g. [{name: length_penalty, coef: 0.1}]
    advantage: list[Any] = field(default_factory=lambda: [{"name": "grpo"}])  # estimator, then modifiers
    loss: Any = "ppo_clip"
    aggregation: Any = "token_mean"
    terms: list[Any] = field(default_factory=list)  # e.g. [{name: kl, coef: 0.04}]
    sampler: Any = "uniform"
    pg_coef: float = 1.0  # weight of the policy loss; 0 with `paced` = distillation only
    paced: Union[PacedConfig, None] = None  # PACED distillation from `teacher` (None: off)


@dataclass
class TeacherConfig:
    """The teacher of ``algorithm.paced``: a separate frozen model, or the student itself reading
    a privileged prompt that holds the gold solution (self-distillation). It must share the
    student's tokenizer; loaded once, in eval mode, placed like the reference model (sharded under
    ZeRO-3)."""

    name_or_path: Union[str, None] = None  # HF id or local directory of a separate teacher
    privileged: bool = False  # teacher = the current student, prompted with privileged_template
    privileged_template: str = "Solution: {solution}\n{prompt}"  # {solution} and {prompt} (the student's)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: Union[str, None] = None


@dataclass
class RewardSpec:
    """One reward: a function (``name``) or a reward model (``model``), exactly one of the two.
    Functions are called as TRL's GRPOTrainer calls them (docs/recipes.md, "Reward functions")."""

    name: Union[str, None] = None  # "math", "format", "overlong", or an import path "pkg.module:function"
    model: Union[str, None] = None  # a sequence-classification reward model: local directory or Hub id
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the function
    batch_size: int = 16  # reward model: (prompt, completion) pairs scored per forward

    @property
    def label(self) -> str:
        """The name metrics and errors use: the function's name, or ``model:<path>``."""
        return self.name if self.name is not None else f"model:{self.model}"


@dataclass
class VerifierConfig:
    deadline_s: float = 5.0  # hard per-answer deadline; an overrunning worker is killed
    num_workers: Union[int, None] = None  # default min(4, cpu count)


@dataclass
class TrainerConfig:
    steps: int = 100  # optimizer steps = rollout batches × ppo_epochs × mini_batches
    prompts_per_step: int = 32  # prompts per rollout batch; × group_size completions
    micro_batch_size: int = 64  # completions per forward/backward
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass (splits prompts_per_step)
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0  # 0 = no clipping
    lr_scheduler: str = "constant"  # any transformers scheduler name
    warmup_ratio: float = 0.0
    seed: int = 0
    output_dir: str = "runs/rltk"
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    push_to_hub: Union[str, None] = None  # Hub repo id ("user/name"): upload the final model/ (+ adapter/)
    eval_every: int = 0  # steps between held-out evaluations (0 = before and after only)
    logprob_chunk_size: int = 64  # rows per no-grad log-prob forward
    head_chunk_tokens: int = 1024  # positions per LM-head chunk in every log-prob forward: the [rows, T, vocab]
    #   logits are never built (docs/distributed.md); 0 = the dense path (full logits, for debugging)
    max_bad_steps: int = 3  # consecutive non-finite steps before training stops
    # Micro-batches cut by token count: each optimizer step's rows sorted by length and packed while a
    # forward holds at most this many tokens (whole groups where a stage needs them); also the no-grad
    # forwards. None = micro_batch_size rows per micro-batch, in order (docs/distributed.md)
    max_tokens_per_micro_batch: Union[int, None] = None
    padding_free: bool = False  # forwards of packed sequences without padding (per-sequence position ids)


@dataclass
class SFTConfig:
    """Supervised warm start on worked solutions (``rltk sft``; before RL when ``enabled``)."""

    enabled: bool = False
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    num_examples: int = 5000
    output_subdir: str = "sft"  # under trainer.output_dir


@dataclass
class EvalSetConfig:
    """A named held-out set for ``rltk eval --recipe`` (one report per set, under ``--out/<name>``).

    Unset fields fall back to the recipe's ``data`` section (fields) or to all rows (num_problems)."""

    name: str  # report subdirectory and table row, e.g. math500, aime24
    source: str  # HF dataset id or local file, as data.eval_source
    split: str = "test"
    subset: Union[str, None] = None
    prompt_field: Union[str, None] = None
    answer_field: Union[str, None] = None
    extract_boxed_answer: Union[bool, None] = None
    num_problems: Union[int, None] = None  # None: every problem of the split


@dataclass
class EvalConfig:
    n: int = 16  # samples per problem
    ks: Union[list[int], None] = None  # default: powers of two up to n
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: Union[int, None] = None  # default: rollout.max_new_tokens
    num_problems: Union[int, None] = None  # default: data.num_test
    batch_size: int = 512  # completions per generation call
    maj: bool = True  # also report maj@k (equivalence-grouped)
    sets: list[EvalSetConfig] = field(default_factory=list)  # named benchmarks for `rltk eval --recipe`


@dataclass
class LoggingConfig:
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb, trackio
    project: str = "rltk"
    progress: bool = True  # live progress bar
    # every N rollout batches, the main process's first log_completions_rows sampled completions (prompt,
    # completion, each reward, advantage) go to <output_dir>/completions.jsonl and a tracker table (0 = off)
    log_completions_every: int = 0
    log_completions_rows: int = 16


@dataclass
class RediConfig:
    """REDI stage 2 (``rltk redi``; Xu et al. 2025, arXiv 2505.24850; docs/algorithms/reference.md §6): raise the
    length-normalised log-likelihood of correct traces and lower α × that of wrong ones, with no
    reference model. Stage 1 is the ``sft`` section, run first when ``sft.enabled``.

    ``data`` holds TRL preference rows (``prompt``/``chosen``/``rejected``) or unpaired rows
    (``prompt``/``completion``/``label``), detected by columns; ``rltk data pairs`` writes either.
    Prompts are used as written (``rltk eval`` samples hold formatted prompts) unless
    ``format_prompts``; conversational rows (lists of messages) get the tokenizer's chat template.
    Defaults are the paper's stage-2 settings, except those marked (rltk).
    """

    data: Union[str, None] = None  # pairs: .jsonl/.json/.parquet or HF id; None = stage 1 only
    sft_data: Union[str, None] = None  # stage-1 prompt/completion rows; None = the data section (rltk)
    sft_epochs: Union[float, None] = None  # stage-1 epochs over sft_data, replacing sft.steps (paper: 5)
    format_prompts: bool = False  # apply data.template/chat_template/system_prompt to raw prompts (rltk)
    alpha: float = 0.8  # weight of the wrong traces; 0 = SFT on the correct ones, 1 = symmetric
    lr: float = 1e-6
    lr_scheduler: str = "linear"  # any transformers scheduler name; linear decay after the warmup
    warmup_ratio: float = 0.1
    batch_size: int = 32  # rows per optimizer step, all processes: pairs, or traces if unpaired
    micro_batch_size: int = 8  # rows per forward/backward on one process (rltk)
    epochs: int = 1
    max_steps: Union[int, None] = None  # cap on optimizer steps; None = `epochs` passes (rltk)
    max_length: int = 4096  # prompt + completion tokens; longer rows are skipped and counted (rltk)
    reduction: Literal["pair", "trace"] = "pair"  # unpaired: Σ/(N/2) = the paired loss, or mean (rltk)
    output_subdir: str = "redi"  # final model directory under trainer.output_dir

    def __post_init__(self) -> None:
        checks = [("alpha", self.alpha >= 0, ">= 0"), ("lr", self.lr > 0, "> 0"),
                  ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
                  ("batch_size", self.batch_size > 0, "> 0"), ("micro_batch_size", self.micro_batch_size > 0, "> 0"),
                  ("epochs", self.epochs > 0, "> 0"), ("max_length", self.max_length > 1, "> 1"),
                  ("max_steps", self.max_steps is None or self.max_steps > 0, "> 0 or null"),
                  ("sft_epochs", self.sft_epochs is None or self.sft_epochs > 0, "> 0 or null")]
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"redi.{key}: must be {rule}, got {getattr(self, key)}")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("math")])
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    redi: RediConfig = field(default_factory=RediConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # The algorithm section resolved into typed stage calls (rltk.algos.Algorithm), set once by
    # rltk.validate when the recipe loads. Not part of the recipe's text: to_dict leaves it out.
    algorithm_stages: Any = field(default=None, init=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The recipe's sections as plain data (what recipe.json holds)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.init:
                value = getattr(self, f.name)
                out[f.name] = [dataclasses.asdict(v) for v in value] if isinstance(value, list) else \
                    dataclasses.asdict(value)
        return out


# --------------------------------------------------------------------------------------------
# Building typed objects from plain data
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = {}
        for option in typing.get_args(tp):
            try:
                return convert_value(value, option, where)
            except ConfigError as exc:
                errors[option] = exc
        for option, exc in errors.items():  # a mapping for a section: its own error names the inner key
            if isinstance(value, dict) and dataclasses.is_dataclass(option):
                raise exc
        for exc in errors.values():  # a number of the right type but not finite / out of range
            if isinstance(exc, _RangeError):
                raise exc
        raise _type_error(where, value, tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(where, value, tp)
        (item,) = typing.get_args(tp)
        return [convert_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _type_error(where, value, tp)
        _, item = typing.get_args(tp)
        return {k: convert_value(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(where, value, tp)
        return from_dict(tp, value, where)
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(where, value, tp)
    if tp in (int, float) and isinstance(value, bool):
        raise _type_error(where, value, tp)
    if tp is float:
        if isinstance(value, (int, float)):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            number = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; "1e400" is inf
        else:
            raise _type_error(where, value, tp)
        if not math.isfinite(number):  # NaN passes every `<= 0` range check, inf most of them
            raise _RangeError(f"{where}: must be a finite number, got {_shown(value)}")
        return number
    if tp is int and isinstance(value, int) and not -_INT_LIMIT < value < _INT_LIMIT:
        raise _RangeError(f"{where}: {_shown(value)} is out of range (integers must lie strictly between -2**63 "
                          "and 2**63)")
    if isinstance(value, tp):
        return value
    raise _type_error(where, value, tp)


_INT_LIMIT = 2**63  # torch and numpy take 64-bit integers; a larger one overflows deep in a run


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _type_error(where: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {_shown(value)} ({type(value).__name__})")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``: unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{path}'{hint}")
        kwargs[key] = convert_value(value, hints[key], path)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or 'recipe'}: missing required key '{missing[0]}'")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Overrides: trainer.lr=2e-6 algorithm.advantage[1].alpha=0.5
# --------------------------------------------------------------------------------------------

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parse_path(path: str) -> list[str | int]:
    tokens: list[str | int] = []
    position = 0
    for match in _TOKEN.finditer(path):
        if match.start() != position and path[position] != ".":
            break
        tokens.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        position = match.end()
        if position < len(path) and path[position] == ".":
            position += 1
    if not tokens or position != len(path):
        raise ConfigError(f"override '{path}': expected a dotted key like trainer.lr or algorithm.advantage[1].alpha")
    return tokens


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``key.path=value`` override (value parsed as YAML) to the raw recipe mapping."""
    if "=" not in override:
        raise ConfigError(f"override '{override}': expected key=value, e.g. trainer.lr=2e-6")
    path, _, raw = override.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    tokens = _parse_path(path.strip())
    node: Any = data
    for i, token in enumerate(tokens[:-1]):
        nxt = tokens[i + 1]
        if isinstance(token, int):
            if not isinstance(node, list) or token >= len(node):
                raise ConfigError(f"override '{path}': index [{token}] is out of range")
            node = node[token]
            continue
        if token not in node or node[token] is None:
            node[token] = [] if isinstance(nxt, int) else {}
        node = node[token]
        if isinstance(node, str) and not isinstance(nxt, int):  # "ppo_clip" -> {name: ppo_clip}
            parent = _walk(data, tokens[: i + 1][:-1])
            node = parent[token] = {"name": node}
    last = tokens[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last > len(node):
            raise ConfigError(f"override '{path}': index [{last}] is out of range")
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override '{path}': cannot set '{last}' inside a {type(node).__name__}")


def flatten_keys(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted key: leaf value}`` (``{"trainer": {"lr": 1e-6}}`` ->
    ``{"trainer.lr": 1e-6}``), the keys as overrides name them; lists are leaves."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _walk(data: Any, tokens: list[str | int]) -> Any:
    for token in tokens:
        data = data[token]
    return data


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain YAML
    keeps the last one silently, so a recipe would not say what it runs)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    """The top-level mapping of one YAML file; ``what`` names the file in every error."""
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of sections, got {type(data).__name__}")
    return data


def merge_recipe_data(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` deep-merged over ``base``: two mappings merge key by key, anything else (lists,
    scalars, a mapping over a scalar) replaces. A stage entry that names another stage (``loss:
    {name: paft, ...}`` over ``{name: ppo_clip, epsilon_low: 0.2}``) replaces the base's entry
    whole, so one stage's parameters never leak into another; without a ``name`` it tunes the
    base's stage."""
    merged = dict(base)
    for key, value in child.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and value.get("name", old.get("name")) == old.get("name"):
            merged[key] = merge_recipe_data(old, value)
        else:
            merged[key] = value
    return merged


def load_recipe_data(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML recipe file, with clear errors for missing or malformed files.

    A recipe may start from another: ``base: other.yaml`` (a path relative to the recipe file)
    loads that recipe first, with its own ``base`` if it has one, and merges this file over it
    (:func:`merge_recipe_data`). Overrides apply after the merge."""
    return _load_with_bases(Path(path), ())


def _load_with_bases(path: Path, children: tuple[Path, ...]) -> dict[str, Any]:
    """``path``'s mapping over its bases; ``children`` are the files that named it, outermost first."""
    what = f"base '{path}' of recipe '{children[-1]}'" if children else f"recipe '{path}'"
    if not path.is_file():
        raise ConfigError(f"{what} does not exist")
    data = _read_mapping(path, what)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"recipe '{path}': base must be the path of another recipe file, relative to this one, "
                          f"got {_shown(base)}")
    base_path = path.parent / os.path.expanduser(base.strip())
    chain = [*children, path]
    if any(base_path.resolve() == p.resolve() for p in chain):
        cycle = " -> ".join(str(p) for p in [*chain, base_path])
        raise ConfigError(f"recipe '{chain[0]}': base cycle {cycle}; a recipe cannot be its own base")
    return merge_recipe_data(_load_with_bases(base_path, tuple(chain)), data)


def parse_recipe(data: dict[str, Any], overrides: list[str] = ()) -> Recipe:
    """Apply ``overrides`` to a copy of ``data`` and build the typed recipe (types and keys checked;
    the cross-field rules are :func:`rltk.validate.validate`'s)."""
    data = yaml.safe_load(yaml.safe_dump(dict(data)))  # deep copy of plain data
    for override in overrides:
        apply_override(data, override)
    if "rewards" in data and isinstance(data["rewards"], list):
        data["rewards"] = [{"name": r} if isinstance(r, str) else r for r in data["rewards"]]
    recipe = from_dict(Recipe, data)
    expand_user_paths(recipe)
    return recipe


def expand_user_paths(recipe: Recipe) -> None:
    """``~`` and ``~user`` at the start of a local path become the home directory, as a shell would:
    ``trainer.output_dir``, the data sources, model directories and ``redi`` files. A Hub id never
    starts with ``~``, so only a value that does is touched."""
    def expand(value: str | None) -> str | None:
        return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value

    t, d, m = recipe.trainer, recipe.data, recipe.model
    t.output_dir = expand(t.output_dir)
    d.source, d.eval_source = expand(d.source), expand(d.eval_source)
    m.name_or_path, m.ref_model = expand(m.name_or_path), expand(m.ref_model)
    recipe.teacher.name_or_path = expand(recipe.teacher.name_or_path)
    recipe.redi.data, recipe.redi.sft_data = expand(recipe.redi.data), expand(recipe.redi.sft_data)
    for s in recipe.eval.sets:
        s.source = expand(s.source)
    for reward in recipe.rewards:
        reward.model = expand(reward.model)

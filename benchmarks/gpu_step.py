"""One GRPO optimizer step at real scale, rltk against TRL's ``GRPOTrainer``, with scripted rollouts.

Built for one GPU (an H100: a few minutes with the defaults, nothing downloaded) and runnable
unchanged on CPU with ``--tiny``. Both sides train the same randomly initialised model — Qwen2.5-1.5B's
configuration (benchmarks/configs/qwen2.5-1.5b.json) or a tiny one (benchmarks/configs/tiny.json) —
with a tokenizer built here with the ``tokenizers``-backed ``Qwen2Tokenizer`` whose vocabulary has
the model's size (every sampled id decodes), on the same batch:

* prompts: ``--prompts`` prompts of random letters, ``--prompt-min``..``--prompt-max`` tokens each;
  the dataset holds exactly these prompts, so every optimizer step of either side trains all of
  them (in its own order), ``--group-size`` completions each;
* completions, scripted rather than generated (generation time would dominate): the length of
  completion ``row`` of the ``call``-th rollout is drawn from a log-normal distribution (median
  ``--length-median``, σ ``--length-sigma``) capped at ``--max-completion`` (a row at the cap is
  truncated: no EOS), its tokens uniform over the non-special vocabulary, each row from its own
  generator seeded by (seed, call, row). rltk's engine is replaced by :class:`ScriptedEngine` (the
  interface of rltk/engines/base.py); TRL gets :class:`ScriptedRollout` as ``rollout_func``. The
  i-th rollout of either side holds the same completions row for row;
* reward: :func:`scripted_reward`, a deterministic function of the completion's token ids with
  values spread over [0, 1] (advantages are non-zero);
* algorithm: group-normalised advantages (rltk ``grpo`` / TRL ``scale_rewards="group"``), PPO-clip
  ε 0.2 / 0.28 with the token mean over the step (rltk ``ppo_clip`` + ``token_mean`` / TRL
  ``loss_type="dapo"``), β = 0, one optimizer step per rollout batch, gradients accumulated over
  micro-batches of ``--micro-batch-size`` rows (rltk ``trainer.micro_batch_size``, or a token budget
  with ``--rltk-set trainer.max_tokens_per_micro_batch=N``; TRL ``per_device_train_batch_size`` ×
  ``gradient_accumulation_steps``), AdamW at a constant learning rate, gradient-norm clip 1.0;
* precision: float32 master weights and Adam state; compute in ``--dtype`` (default bfloat16 on a
  GPU, float32 on CPU): rltk ``model.dtype: bfloat16`` (autocast), TRL ``bf16=True`` over float32
  weights. Activation checkpointing on both sides unless ``--no-gradient-checkpointing``.

Each side runs ``--warmup`` untimed and ``--steps`` timed optimizer steps, on a GPU each in its own
process (``--isolate``), so its peak memory (``torch.cuda.max_memory_allocated``) is its own. Per
side the report gives the step time, training tokens/s (real tokens: prompt + completion, no
padding), peak memory, MFU = 6 · N_params · real tokens / step time / peak FLOP/s (peak from a
table by device name, e.g. H100 SXM bf16 dense 989 TFLOP/s, or ``--peak-tflops``; attention FLOPs
are not counted), the padding share of the training forwards (a forward pre-hook on the decoder,
benchmarks/step_time.py's ``ForwardTokens``) and the ratio rltk / TRL; plus the ``hf`` engine's
generation tokens/s (rltk's own engine, a real ``generate`` of ``--gen-rows`` rows ×
``--gen-tokens`` new tokens after the timed steps).

    python benchmarks/gpu_step.py                 # one GPU, defaults: 64 prompts × 8, up to 3,072 tokens
    python benchmarks/gpu_step.py --tiny          # CPU, seconds
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false"), ("DS_ACCELERATOR", "cpu"),
                     ("TRL_EXPERIMENTAL_SILENCE", "1")):
    os.environ.setdefault(_key, _value)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
FULL_CONFIG = CONFIGS / "qwen2.5-1.5b.json"
TINY_CONFIG = CONFIGS / "tiny.json"

# the batch shape: real scale, and --tiny's (each flag left unset takes the preset's value)
PRESETS = {
    "full": dict(prompts=64, group_size=8, prompt_min=64, prompt_max=256, max_completion=3072, length_median=384,
                 length_sigma=1.0, micro_batch_size=16, gen_rows=8, gen_tokens=256),
    "tiny": dict(prompts=4, group_size=4, prompt_min=8, prompt_max=24, max_completion=64, length_median=12,
                 length_sigma=1.0, micro_batch_size=4, gen_rows=2, gen_tokens=8),
}

# dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity), matched against
# torch.cuda.get_device_name(); the first match wins
PEAK_TFLOPS = (
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # SXM (the "H100 80GB HBM3")
    (("H200",), 989.0),
    (("H800",), 989.0),
    (("GH200",), 989.0),
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("L40S",), 362.0),
)

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"model config JSON (default {FULL_CONFIG.relative_to(ROOT)})")
    p.add_argument("--tiny", action="store_true",
                   help=f"{TINY_CONFIG.relative_to(ROOT)} and the small batch shape (for CPU)")
    p.add_argument("--prompts", type=int, help="prompts per optimizer step (default 64; --tiny 4)")
    p.add_argument("--group-size", type=int, help="completions per prompt (default 8; --tiny 4)")
    p.add_argument("--prompt-min", type=int, help="shortest prompt in tokens (default 64; --tiny 8)")
    p.add_argument("--prompt-max", type=int, help="longest prompt in tokens (default 256; --tiny 24)")
    p.add_argument("--max-completion", type=int,
                   help="completion length cap; a row drawn at or above it is truncated (default 3072; --tiny 64)")
    p.add_argument("--length-median", type=float, help="median completion length (default 384; --tiny 12)")
    p.add_argument("--length-sigma", type=float, help="σ of the log-normal completion lengths (default 1.0)")
    p.add_argument("--micro-batch-size", type=int,
                   help="rows per forward/backward on both sides (default 16; --tiny 4)")
    p.add_argument("--steps", type=int, default=1, help="timed optimizer steps per side (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per side (default 1)")
    p.add_argument("--order", default="rltk,trl", help="the sides in the order they run (default rltk,trl)")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate of both sides (default 1e-6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="compute dtype over float32 master weights (auto: bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="turn activation checkpointing off on both sides (default on)")
    p.add_argument("--rltk-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for the rltk side only, e.g. trainer.max_tokens_per_micro_batch=16384 "
                        "(repeatable; recorded in the report)")
    p.add_argument("--gen-rows", type=int, help="hf generation measurement: rows (default 8; --tiny 2; 0 = skip)")
    p.add_argument("--gen-tokens", type=int, help="hf generation measurement: new tokens per row (default 256)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense FLOP/s of the device in TFLOP/s for MFU (default: from the device name; none on CPU)")
    p.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                   help="run each side in its own process (auto: on a GPU, so peak memory is per side)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    # a side run in its own process: the prepared directory and where to write its result
    p.add_argument("--worker", choices=("rltk", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.config = args.config or str(TINY_CONFIG if args.tiny else FULL_CONFIG)
    for name in ("prompts", "group_size", "prompt_min", "max_completion", "micro_batch_size", "steps", "gen_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.gen_rows < 0:
        p.error("--warmup and --gen-rows must be at least 0")
    if args.group_size < 2:
        p.error("--group-size must be at least 2 (group-normalised advantages)")
    if args.prompt_max < args.prompt_min:
        p.error("--prompt-max must be at least --prompt-min")
    if args.length_median <= 0 or args.length_sigma < 0:
        p.error("--length-median must be positive and --length-sigma at least 0")
    completions = args.prompts * args.group_size
    if completions % args.micro_batch_size or args.micro_batch_size % args.group_size:
        p.error(f"--micro-batch-size ({args.micro_batch_size}) must be a multiple of --group-size "
                f"({args.group_size}) and divide the {completions} completions of a step (whole groups per micro-batch, "
                "the same cut on both sides)")
    order = args.order.split(",")
    if not set(order) <= {"rltk", "trl"} or not order:
        p.error("--order names rltk and/or trl, comma-separated, e.g. rltk,trl")
    from benchmarks.step_time import check_rltk_set

    check_rltk_set(p, args.rltk_set)
    if not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such file")
    return args


def device_and_dtype(args: argparse.Namespace) -> tuple[str, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, dtype


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- the script
class Script:
    """The scripted completions: ``completion(call, row)`` is the token ids (EOS last unless
    truncated) of row ``row`` of the ``call``-th rollout, from a generator seeded by (seed, call, row)."""

    def __init__(self, args: argparse.Namespace, vocab_size: int, eos_id: int, first_plain_id: int):
        self.median, self.sigma, self.cap = args.length_median, args.length_sigma, args.max_completion
        self.seed, self.eos_id = args.seed, eos_id
        self.low, self.high = first_plain_id, vocab_size  # sampled ids: the non-special vocabulary

    def completion(self, call: int, row: int) -> list[int]:
        import numpy as np

        rng = np.random.default_rng([self.seed, 7919, call, row])
        drawn = max(1, int(round(float(rng.lognormal(math.log(self.median), self.sigma)))))
        if drawn >= self.cap:  # truncated: cap tokens, no EOS
            return rng.integers(self.low, self.high, size=self.cap).tolist()
        return rng.integers(self.low, self.high, size=drawn - 1).tolist() + [self.eos_id]


def scripted_reward(completion_ids=None, **_) -> list[float]:
    """A cheap deterministic reward in [0, 1] from the completion's token ids (TRL's reward-function
    signature; rltk calls it by import path ``benchmarks.gpu_step:scripted_reward``)."""
    return [(sum(int(t) for t in ids) % 97) / 96.0 for ids in completion_ids]


class ScriptedEngine:
    """rltk's engine interface (rltk/engines/base.py) over :class:`Script`: the prompts tokenized
    as rltk's ``hf`` engine does, ``params.n`` scripted completions per prompt, row ``j`` of call
    ``i`` = ``script.completion(i, j)``. ``real_tokens`` records each call's prompt + completion tokens."""

    def __init__(self, script: Script, tokenizer):
        self.script, self.tokenizer = script, tokenizer
        self.calls, self.real_tokens = 0, []

    def sync_weights(self) -> None:
        pass

    def generate(self, prompts: list[str], params):
        from rltk.engines.base import Generation, pad_left, pad_right

        tok = self.tokenizer
        encoded = [tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"] for p in prompts]
        prompt_rows = [ids for ids in encoded for _ in range(params.n)]
        completions = [self.script.completion(self.calls, j) for j in range(len(prompt_rows))]
        self.calls += 1
        if max(len(c) for c in completions) > params.max_new_tokens:
            raise ValueError(f"a scripted completion is longer than max_new_tokens {params.max_new_tokens}")
        rows = [torch.tensor([c]) for c in completions]
        completion_ids = pad_right(rows, tok.pad_token_id)
        completion_mask = pad_right([torch.ones_like(r) for r in rows], 0)
        truncated = torch.tensor([c[-1] != tok.eos_token_id for c in completions])
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        self.real_tokens.append(sum(r.shape[1] for r in prompt_rows) + sum(len(c) for c in completions))
        return Generation(pad_left(prompt_rows, tok.pad_token_id), pad_left([torch.ones_like(r) for r in prompt_rows], 0),
                          completion_ids, completion_mask, truncated, texts)


class ScriptedRollout:
    """TRL's ``rollout_func`` over :class:`Script`: one scripted completion per prompt row it is
    given (TRL passes every row of the generation batch, each prompt ``num_generations`` times),
    or ``group_size`` per prompt if it passes each prompt once."""

    def __init__(self, script: Script, tokenizer, group_size: int, completions: int):
        self.script, self.tokenizer = script, tokenizer
        self.group_size, self.completions = group_size, completions
        self.calls, self.real_tokens = 0, []

    def __call__(self, prompts: list, trainer=None) -> dict:
        repeat = self.group_size if len(prompts) * self.group_size == self.completions else 1
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(repeat)]
        completion_ids = [self.script.completion(self.calls, j) for j in range(len(prompt_ids))]
        self.calls += 1
        self.real_tokens.append(sum(len(p) for p in prompt_ids) + sum(len(c) for c in completion_ids))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                "logprobs": [[0.0] * len(c) for c in completion_ids]}


# ---------------------------------------------------------------------------------------------- preparation
def build_tokenizer(vocab_size: int):
    """A byte-level ``Qwen2Tokenizer`` without merges (one token per byte, as rltk's tiny model's)
    padded with plain filler tokens ``<tN>`` to exactly ``vocab_size`` entries; ids 0/1/2 are
    pad/eos/unk. Returns (tokenizer, id of the first plain token)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    first_plain = len(vocab)
    if vocab_size < first_plain + 16:
        raise ValueError(f"the model's vocabulary ({vocab_size}) is too small for a byte-level tokenizer")
    for i in range(vocab_size - len(vocab)):
        vocab[f"<t{i}>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=UNK, eos_token=EOS, pad_token=PAD)
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = 1 << 20
    if len(tokenizer) != vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
    return tokenizer, 3  # byte symbols are plain tokens too; only pad/eos/unk are special


def make_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompts`` texts of lowercase words; prompt i has a length drawn in [prompt_min, prompt_max]
    characters (= tokens: the tokenizer has no merges)."""
    rng = random.Random(f"gpu-step-prompts:{args.seed}")
    prompts = []
    for _ in range(args.prompts):
        length = rng.randint(args.prompt_min, args.prompt_max)
        chars = []
        while len(chars) < length:
            chars.extend(rng.choice(LETTERS) for _ in range(rng.randint(2, 8)))
            chars.append(" ")
        chars = chars[:length]
        chars[0], chars[-1] = rng.choice(LETTERS), rng.choice(LETTERS)  # no space at either end
        prompts.append("".join(chars))
    return prompts


def prepare(args: argparse.Namespace, out: Path) -> dict:
    """The model directory (random init from ``--config``, saved in bfloat16 on a GPU and float32 on
    CPU; both sides load float32 masters from it), the tokenizer and the data files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device, _ = device_and_dtype(args)
    raw = json.loads(Path(args.config).read_text())
    tokenizer, first_plain = build_tokenizer(int(raw["vocab_size"]))
    raw.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(**raw)
    model_dir = out / "model"
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(args)
    with open(data / "train.jsonl", "w") as f:
        for text in prompts:
            f.write(json.dumps({"problem": text, "answer": "0"}) + "\n")
    with open(data / "test.jsonl", "w") as f:  # rltk wants a held-out set; it is never evaluated here
        f.write(json.dumps({"problem": "held out", "answer": "0"}) + "\n")
    prepared = {"model_dir": str(model_dir), "train": str(data / "train.jsonl"), "test": str(data / "test.jsonl"),
                "prompts": prompts, "params": params, "vocab_size": int(raw["vocab_size"]),
                "eos_id": tokenizer.eos_token_id, "first_plain_id": first_plain,
                "prepare_s": time.perf_counter() - start}
    (out / "prepared.json").write_text(json.dumps(prepared))
    return prepared


# ---------------------------------------------------------------------------------------------- rltk
def rltk_recipe_data(args: argparse.Namespace, prepared: dict, out: Path) -> dict:
    _, dtype = device_and_dtype(args)
    completions = args.prompts * args.group_size
    return {
        "model": {"name_or_path": prepared["model_dir"], "dtype": dtype,
                  "gradient_checkpointing": args.gradient_checkpointing},
        "data": {"source": prepared["train"], "eval_source": prepared["test"], "prompt_field": "problem",
                 "answer_field": "answer", "template": "plain", "num_test": 1, "max_prompt_length": args.prompt_max},
        "rollout": {"engine": "hf", "group_size": args.group_size, "temperature": 1.0, "top_p": 1.0,
                    "max_new_tokens": args.max_completion, "batch_size": completions},
        "algorithm": {"advantage": [{"name": "grpo"}],
                      "loss": {"name": "ppo_clip", "epsilon_low": 0.2, "epsilon_high": 0.28},
                      "aggregation": "token_mean"},
        "rewards": [{"name": "benchmarks.gpu_step:scripted_reward"}],
        "verifier": {"num_workers": 1},
        "trainer": {"steps": args.warmup + args.steps, "prompts_per_step": args.prompts,
                    "micro_batch_size": args.micro_batch_size, "lr": args.lr, "max_grad_norm": 1.0,
                    "lr_scheduler": "constant", "seed": args.seed, "output_dir": str(out)},
        "logging": {"progress": False, "report_to": []},
    }


def rltk_recipe(args: argparse.Namespace, prepared: dict, out: Path):
    """The rltk side's validated recipe with the ``--rltk-set`` overrides."""
    from benchmarks.step_time import with_overrides

    return with_overrides(rltk_recipe_data(args, prepared, out), args.rltk_set)


def measure_generation(engine, prompts: list[str], args: argparse.Namespace) -> dict | None:
    """Tokens/s of rltk's ``hf`` engine: one short untimed ``generate``, then ``--gen-rows`` rows ×
    ``--gen-tokens`` new tokens (a random model rarely samples EOS, so rows run to the limit)."""
    from rltk.engines.base import SamplingParams
    from rltk.trainer.distributed import generation_session

    if args.gen_rows == 0:
        return None
    rows = [prompts[i % len(prompts)] for i in range(args.gen_rows)]
    with generation_session(engine):
        engine.generate(rows[:1], SamplingParams(n=1, max_new_tokens=2))
        sync()
        start = time.perf_counter()
        out = engine.generate(rows, SamplingParams(n=1, temperature=1.0, max_new_tokens=args.gen_tokens))
        sync()
        seconds = time.perf_counter() - start
    tokens = int(out.completion_mask.sum())
    return {"rows": args.gen_rows, "max_new_tokens": args.gen_tokens, "new_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


def run_rltk(args: argparse.Namespace, prepared: dict, work: Path) -> dict:
    from benchmarks.step_time import PADDING_METRICS, ForwardTokens
    from rltk.models import load_tokenizer
    from rltk.trainer.rl import RLTrainer

    reset_peak()
    trainer = RLTrainer(rltk_recipe(args, prepared, work / "rltk"))
    hf_engine = trainer.engine
    script = Script(args, prepared["vocab_size"], prepared["eos_id"], prepared["first_plain_id"])
    engine = ScriptedEngine(script, load_tokenizer(prepared["model_dir"]))
    trainer.engine = trainer.collector.engine = engine
    policy = trainer.accelerator.unwrap_model(trainer.model)
    # transformers checkpoints activations only in training mode; rltk's trainer has put its policy in
    # training mode since e8b1614 (before, it stayed in from_pretrained's eval mode and the recipe's
    # gradient checkpointing was silently off): kept as a guard, reported as forced_train_mode
    forced_train = not policy.training
    policy.train()
    counter = ForwardTokens(policy)
    times, tokens, logged, steps = [], [], [], []
    try:
        for i in range(args.warmup + args.steps):
            sync()
            start = time.perf_counter()
            metrics = trainer.train_batch()
            sync()
            times.append(time.perf_counter() - start)
            tokens.append(counter.take())
            logged.append({k: metrics[k] for k in PADDING_METRICS if k in metrics})
            steps.append({k: metrics[k] for k in ("time/generate", "time/score", "time/forward", "time/backward",
                                                  "loss", "grad_norm", "reward/std") if k in metrics})
            print(f"  rltk step {i + 1}: {times[-1]:.2f} s, {engine.real_tokens[-1]} real tokens, "
                  f"{tokens[-1]['positions']} positions in {tokens[-1]['forwards']} forwards", flush=True)
        peak = peak_memory()
        try:
            generation = measure_generation(hf_engine, prepared["prompts"], args)
        except Exception as exc:  # the training figures stand without it
            traceback.print_exc()
            generation = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    finally:
        counter.close()
        trainer.close()
    return {"times": times, "tokens": tokens, "logged": logged, "real_tokens": engine.real_tokens, "steps": steps,
            "peak_memory_bytes": peak, "generation": generation, "forced_train_mode": forced_train}


# ---------------------------------------------------------------------------------------------- TRL
def run_trl(args: argparse.Namespace, prepared: dict, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.step_time import ForwardTokens

    device, dtype = device_and_dtype(args)
    completions = args.prompts * args.group_size
    tokenizer = AutoTokenizer.from_pretrained(prepared["model_dir"])
    script = Script(args, prepared["vocab_size"], prepared["eos_id"], prepared["first_plain_id"])
    rollout = ScriptedRollout(script, tokenizer, args.group_size, completions)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.counter, self._start = [], [], None, 0.0

        def on_step_begin(self, *_, **__):
            sync()
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync()
            self.times.append(time.perf_counter() - self._start)
            self.tokens.append(self.counter.take())
            print(f"  trl  step {len(self.times)}: {self.times[-1]:.2f} s, {rollout.real_tokens[-1]} real tokens, "
                  f"{self.tokens[-1]['positions']} positions in {self.tokens[-1]['forwards']} forwards", flush=True)

    fields = GRPOConfig.__dataclass_fields__
    # transformers ≥ 5.2x names it activation_checkpointing (gradient_checkpointing is its deprecated alias)
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    config = GRPOConfig(
        output_dir=str(work / "trl"), report_to="none", use_cpu=device == "cpu", bf16=dtype == "bfloat16",
        fp16=False, seed=args.seed, model_init_kwargs={"dtype": "float32"},
        max_steps=args.warmup + args.steps, per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=completions // args.micro_batch_size, num_iterations=1,
        num_generations=args.group_size, max_completion_length=args.max_completion,
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28, scale_rewards="group",
        use_vllm=False, eval_strategy="no", save_strategy="no", logging_steps=1, log_completions=False,
        disable_tqdm=True, dataloader_num_workers=0, **{checkpointing: args.gradient_checkpointing},
    )
    dataset = Dataset.from_dict({"prompt": prepared["prompts"], "answer": ["0"] * len(prepared["prompts"])})
    timer = StepTimer()
    reset_peak()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=prepared["model_dir"], reward_funcs=scripted_reward, args=config,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[timer],
                              rollout_func=rollout)
        trainer.remove_callback(PrinterCallback)
        timer.counter = ForwardTokens(trainer.model)
        try:
            trainer.train()
        finally:
            timer.counter.close()
    return {"times": timer.times, "tokens": timer.tokens, "logged": [], "real_tokens": rollout.real_tokens,
            "steps": [], "peak_memory_bytes": peak_memory(), "generation": None, "forced_train_mode": False}


# ---------------------------------------------------------------------------------------------- main
def reset_peak() -> None:
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def peak_flops(args: argparse.Namespace) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) for MFU."""
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, "none on CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name().upper()
    for keys, tflops in PEAK_TFLOPS:
        if all(k in name for k in keys):
            return tflops * 1e12, f"table: {' '.join(keys)} bf16 dense {tflops:g} TFLOP/s"
    return None, f"'{name}' is not in the table (give --peak-tflops)"


def run_side(side: str, args: argparse.Namespace, prepared: dict, work: Path) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return {"rltk": run_rltk, "trl": run_trl}[side](args, prepared, work)


def run_isolated(side: str, argv: list[str], prepared_dir: Path, work: Path) -> dict:
    """Run one side in a fresh Python process (its own CUDA context and peak memory)."""
    result = work / f"{side}-result.json"
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", side,
               "--prepared", str(prepared_dir), "--result", str(result)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(command, check=True, env=env)
    return json.loads(result.read_text())


def summarise(run: dict, args: argparse.Namespace, params: int, flops: float | None) -> dict:
    from benchmarks.step_time import padding_summary

    w = args.warmup
    times, real = run["times"][w:], run["real_tokens"][w:]
    if not times or len(real) < len(times):
        raise RuntimeError(f"expected {args.warmup + args.steps} steps, got {len(run['times'])} timed and "
                           f"{len(run['real_tokens'])} rollouts")
    real = real[: len(times)]
    tokens = run["tokens"][w:]
    hooked_real = [t["real"] for t in tokens if t["unmasked"] == 0]
    positions = [t["positions"] for t in tokens]
    seconds = sum(times)
    out = {
        "step_s": statistics.median(times), "step_s_all": times,
        "real_tokens_per_step": sum(real) / len(real),
        "tokens_per_s": sum(real) / seconds,
        "positions_per_step": sum(positions) / len(positions),
        "peak_memory_gib": None if run["peak_memory_bytes"] is None else run["peak_memory_bytes"] / 2**30,
        "mfu": None if flops is None else 6 * params * sum(real) / seconds / flops,
        # the same over every position processed, padding included: how busy the device was
        "mfu_with_padding": None if flops is None else 6 * params * sum(positions) / seconds / flops,
        "hooked_real_tokens_per_step": sum(hooked_real) / len(hooked_real) if len(hooked_real) == len(tokens) else None,
        "real_tokens_all": real,
    }
    out.update(padding_summary(tokens, run["logged"][w:]))
    # the script knows the real tokens: 1 − real / positions checks the hook's and rltk's figures, and
    # stands in for them where forwards ran packed and no share was logged
    out["padding_share_scripted"] = 1 - sum(real) / sum(positions) if sum(positions) else None
    if out["padding_share"] is None and out["padding_share_scripted"] is not None:
        out.update(padding_share=out["padding_share_scripted"], padding_source="scripted real tokens / positions")
    for key in ("generation", "forced_train_mode"):
        out[key] = run[key]
    if run["steps"]:
        out["rltk_metrics"] = run["steps"][w:]
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:  # one side, in its own process
        prepared = json.loads((Path(args.prepared) / "prepared.json").read_text())
        result = run_side(args.worker, args, prepared, Path(args.prepared) / f"run-{args.worker}")
        Path(args.result).write_text(json.dumps(result))
        return result
    import transformers
    import trl

    from rltk.schema import ConfigError

    device, dtype = device_and_dtype(args)
    isolate = args.isolate == "process" or (args.isolate == "auto" and device == "cuda")
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}, "
          f"compute {dtype} over float32 masters, config {args.config}, "
          f"{'one process per side' if isolate else 'one process'}", flush=True)
    flops, flops_source = peak_flops(args)
    report = {
        "config": {k: getattr(args, k) for k in (
            "config", "prompts", "group_size", "prompt_min", "prompt_max", "max_completion", "length_median",
            "length_sigma", "micro_batch_size", "steps", "warmup", "order", "lr", "seed", "gradient_checkpointing",
            "rltk_set", "gen_rows", "gen_tokens")} | {"dtype": dtype, "isolated": isolate},
        "machine": {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "transformers": transformers.__version__, "trl": trl.__version__},
        "peak_flops": flops, "peak_flops_source": flops_source,
    }
    with tempfile.TemporaryDirectory(prefix="rltk-gpu-step-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepared = prepare(args, work)
        report["params"] = prepared["params"]
        try:
            rltk_recipe(args, prepared, work / "check")  # a bad --rltk-set fails here, in one line, before any run
        except ConfigError as exc:
            raise SystemExit(f"--rltk-set: {exc}") from None
        print(f"model: {prepared['params'] / 1e6:.1f}M parameters, built in {prepared['prepare_s']:.1f} s", flush=True)
        for side in args.order.split(","):
            print(f"{side}: {args.warmup} warm-up + {args.steps} timed steps", flush=True)
            try:
                run = run_isolated(side, argv, work, work) if isolate else \
                    run_side(side, args, prepared, work / f"run-{side}")
                report[side] = summarise(run, args, prepared["params"], flops)
            except Exception as exc:  # a failed side (a subprocess's exit status too): the other still runs
                traceback.print_exc()
                report[side] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            if args.json:  # written after every side: a run stopped later still leaves what it measured
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    done = [side for side in ("rltk", "trl") if side in report and "error" not in report[side]]
    if done == ["rltk", "trl"]:
        report["ratio_step_time_rltk_over_trl"] = report["rltk"]["step_s"] / report["trl"]["step_s"]
        report["ratio_tokens_per_s_rltk_over_trl"] = report["rltk"]["tokens_per_s"] / report["trl"]["tokens_per_s"]
        report["same_real_tokens"] = report["rltk"]["real_tokens_all"] == report["trl"]["real_tokens_all"]
    print_report(report, args, args.prompts * args.group_size)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict, args: argparse.Namespace, completions: int) -> None:
    def fmt(value, spec: str, none: str = "n/a") -> str:
        return none if value is None else format(value, spec)

    print()
    print(f"{report['machine']['device']}: {report['params'] / 1e6:.1f}M parameters, {args.prompts} prompts × "
          f"{args.group_size} = {completions} completions (log-normal lengths, median {args.length_median:g}, "
          f"σ {args.length_sigma:g}, cap {args.max_completion}), micro-batches of {args.micro_batch_size} rows, "
          f"{report['config']['dtype']} compute, checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.steps} timed step(s) after {args.warmup} warm-up")
    if args.rltk_set:
        print("rltk overrides: " + " ".join(args.rltk_set))
    print(f"MFU peak: {report['peak_flops_source']}")
    header = f"{'':6s}{'step s':>9s}{'real tok/step':>15s}{'tokens/s':>11s}{'peak GiB':>10s}{'MFU':>8s}" \
             f"{'pad share':>11s}{'positions':>11s}"
    print(header)
    for side in ("rltk", "trl"):
        if side not in report:
            continue
        r = report[side]
        if "error" in r:
            print(f"{side:6s} failed: {r['error']}")
            continue
        print(f"{side:6s}{r['step_s']:9.2f}{r['real_tokens_per_step']:15.0f}{r['tokens_per_s']:11.0f}"
              f"{fmt(r['peak_memory_gib'], '10.1f', '       n/a')}{fmt(r['mfu'], '8.1%', '     n/a')}"
              f"{fmt(r['padding_share'], '11.1%', '        n/a')}{r['positions_per_step']:11.0f}")
    for side in ("rltk", "trl"):
        if side in report and "error" not in report[side]:
            r = report[side]
            print(f"{side} padding share: {r['padding_source'] or r.get('padding_note')}"
                  + (f"; rltk's tokens/padding_share {r['logged_padding_share']:.1%}" if "logged_padding_share" in r
                     else "") + f"; 1 − scripted real tokens / positions {fmt(r['padding_share_scripted'], '.1%')}")
    if "rltk" in report and "error" not in report["rltk"]:
        if "logged_note" in report["rltk"]:
            print(f"note: {report['rltk']['logged_note']}")
        if report["rltk"]["forced_train_mode"]:
            print("note: rltk left its policy in eval mode (no activation checkpointing in transformers); the "
                  "benchmark put it in training mode")
        g = report["rltk"]["generation"]
        if g and "error" in g:
            print(f"hf generation failed: {g['error']}")
        elif g:
            print(f"hf generation (rltk's engine): {g['rows']} rows × {g['max_new_tokens']} new tokens, "
                  f"{g['new_tokens']} tokens in {g['seconds']:.2f} s = {g['tokens_per_s']:.0f} tokens/s")
    if "ratio_step_time_rltk_over_trl" in report:
        print(f"rltk / TRL: step time {report['ratio_step_time_rltk_over_trl']:.3f}, tokens/s "
              f"{report['ratio_tokens_per_s_rltk_over_trl']:.3f}; same real tokens on both sides: "
              f"{report['same_real_tokens']}")


if __name__ == "__main__":
    main()

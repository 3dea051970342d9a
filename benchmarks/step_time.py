"""Optimizer-step time of rltk's RL loop against TRL's ``GRPOTrainer`` on the same tiny config.

Both sides start from the same model directory and the same prompts, and do the same work per
optimizer step: sample ``prompts × group_size`` completions with transformers ``generate`` (HF
engine, temperature 1.0, top-p 1.0, at most ``max_new_tokens`` new tokens), score them with the same
math reward (``rewards.math``), compute group-normalised advantages, run one forward/backward over
the whole batch (no micro-batching, no gradient accumulation, no old/ref log-prob forwards: one
update per rollout batch, β = 0) with the PPO-clip loss and a global token-mean aggregation
(rltk ``token_mean`` ↔ TRL ``loss_type="dapo"``), clip the gradient norm to 1.0 and take an AdamW
step at a constant learning rate. No evaluation, no checkpoints, no trackers.

* rltk: ``RLTrainer.train_batch()`` in a loop, each call timed with ``time.perf_counter``.
* TRL: ``trainer.train()`` with ``max_steps``, each optimizer step timed by a ``TrainerCallback``
  from ``on_step_begin`` to ``on_step_end`` (generation, scoring, loss, backward and optimizer step;
  the dataloader fetch and TRL's logging fall outside, which favours TRL slightly). TRL's settings
  that would add work rltk does not do are turned off: activation checkpointing (TRL's default is
  on), ``steps_per_generation``/``num_iterations`` > 1, completion logging. TRL always computes the
  token entropy in its training forward (for its metrics); that cost is TRL's and stays in.

The first ``--warmup`` steps of each run are discarded; ``--order rltk,trl,trl,rltk`` runs each side
twice (fresh trainers from the same weights) and pools their timed steps, which cancels slow drift
of the machine. The script prints the median, mean and min of the timed steps and the ratio of
medians rltk / TRL (below 1 means rltk is faster).
It is a benchmark, not a test: run it alone on an otherwise idle machine (two torch jobs on the
same cores slow each other several-fold). See benchmarks/README.md for measured figures.

``--lengths heavy`` gives both sides the same heavy-tailed completion lengths: inside this process
``transformers.GenerationMixin.generate`` is wrapped so that each call gets a logits processor
that suppresses EOS before each row's drawn length and forces it there (90% of the rows drawn
uniformly in [1, L], 10% in [L + 1, 16·L], L = ``--max-new-tokens``; both sides then generate up to
16·L tokens). Both sides get the same lengths in every step: the n-th row a run generates has its
own seeded draw, however a side cuts its rows into ``generate`` calls (each side makes one call of
``prompts × group_size`` rows per step here). ``--lengths uniform`` (the default) leaves ``generate`` alone.

Both sides report the padding share of their training forwards: a forward pre-hook on the
decoder counts, in every forward with gradients on (the training forwards), the positions processed
(``input_ids.numel()``, padding included) and the real tokens (the attention mask's sum). A forward
without a 2-D attention mask (packed sequences) has no countable padding: rltk's share is then its
own ``tokens/padding_share`` metric. ``--rltk-set KEY=VALUE`` passes recipe overrides to the rltk
side only (e.g. ``trainer.max_tokens_per_micro_batch=2048``, ``trainer.padding_free=true``).

    python benchmarks/step_time.py --steps 10 --warmup 2 --prompts 32 --group-size 8 \
        --max-new-tokens 24 --threads 2 --order rltk,trl,trl,rltk
    python benchmarks/step_time.py --lengths heavy --rltk-set trainer.max_tokens_per_micro_batch=2048 \
        --rltk-set trainer.padding_free=true
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false"), ("DS_ACCELERATOR", "cpu")):
    os.environ.setdefault(_key, _value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per side (default 2)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step (default 32)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="generation length limit (default 24)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of both sides (default 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None,
                   help="HF model directory used by both sides (default: build rltk's tiny random Qwen2)")
    p.add_argument("--order", default="rltk,trl",
                   help="runs in order, each a fresh trainer from the same weights; a side named twice has its "
                        "timed steps pooled, e.g. rltk,trl,trl,rltk cancels drift (default rltk,trl)")
    p.add_argument("--lengths", choices=("uniform", "heavy"), default="uniform",
                   help="completion lengths: uniform = as sampled, at most --max-new-tokens (default); heavy = the "
                        "same heavy-tailed lengths forced on both sides, up to --long-factor × --max-new-tokens")
    p.add_argument("--long-share", type=float, default=0.1,
                   help="heavy: share of long completions (default 0.1)")
    p.add_argument("--long-factor", type=int, default=16,
                   help="heavy: long completions are drawn in [L + 1, factor·L], L = --max-new-tokens (default 16)")
    p.add_argument("--rltk-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for the rltk side only, e.g. trainer.max_tokens_per_micro_batch=2048 "
                        "(repeatable; recorded in the report)")
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if not 0.0 <= args.long_share <= 1.0:
        p.error("--long-share must be within [0, 1]")
    if args.long_factor < 2:
        p.error("--long-factor must be at least 2")
    check_rltk_set(p, args.rltk_set)
    for name in ("steps", "prompts", "group_size", "max_new_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    if args.group_size < 2:
        p.error("--group-size must be at least 2 (group-normalised advantages)")
    order = args.order.split(",")
    if not set(order) <= {"rltk", "trl"} or not {"rltk", "trl"} <= set(order):
        p.error("--order must name both sides, comma-separated, e.g. rltk,trl or rltk,trl,trl,rltk")
    return args


def generation_limit(args: argparse.Namespace) -> int:
    """Both sides' ``max_new_tokens``: ``--max-new-tokens``, or the longest heavy-tailed length."""
    return args.max_new_tokens * (args.long_factor if args.lengths == "heavy" else 1)


# ---------------------------------------------------------------------------------------------- lengths
def draw_lengths(first_row: int, rows: int, short_max: int, *, long_share: float = 0.1, long_factor: int = 16,
                 seed: int = 0) -> list[int]:
    """Completion lengths (EOS included) of rows ``first_row`` … ``first_row + rows − 1`` of a run
    (rows counted over all its ``generate`` calls): with probability ``long_share`` uniform in
    [short_max + 1, long_factor·short_max], else uniform in [1, short_max]. Each row has its own
    generator seeded by (seed, row) (string seeds hash with SHA-512, the same in every process), so
    a row's length depends on nothing else: two sides that generate the same number of rows per step
    get the same lengths in every step, however each cuts its rows into ``generate`` calls."""
    lengths = []
    for row in range(first_row, first_row + rows):
        rng = random.Random(f"rltk-bench:{seed}:{row}")
        if rng.random() < long_share:
            lengths.append(rng.randint(short_max + 1, long_factor * short_max))
        else:
            lengths.append(rng.randint(1, short_max))
    return lengths


def _eos_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def length_processor(lengths: list[int], prompt_width: int, eos_ids: list[int]):
    """A ``LogitsProcessor`` that makes row i of a ``generate`` call end at exactly ``lengths[i]``
    new tokens (EOS included): every EOS id is suppressed before that and the first one forced
    there. ``prompt_width`` is the (padded) prompt width of the call's ``input_ids``. rltk's own decode
    loop (``rollout.drop_finished``) calls its ``apply`` with ``rows``, the call's row of each
    running row."""
    from transformers import LogitsProcessor

    if not eos_ids:
        raise ValueError("forced completion lengths need an EOS token id")

    class ForceLengths(LogitsProcessor):
        def __init__(self):
            self.target = torch.tensor(lengths, dtype=torch.long)
            self.columns = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return self.apply(input_ids, scores, None)

        def apply(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            if self.columns is None:
                self.target = self.target.to(scores.device)
                self.columns = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
                self.columns[eos_ids] = True  # every EOS id
                self.first = torch.zeros_like(self.columns)
                self.first[eos_ids[0]] = True  # the one forced
            produced = input_ids.shape[1] - prompt_width  # new tokens so far; this step makes token produced + 1
            target = self.target if rows is None else self.target[rows]
            early = (produced < target - 1).unsqueeze(1)
            at = (produced == target - 1).unsqueeze(1)
            scores = scores.masked_fill(early & self.columns, -float("inf"))
            return scores.masked_fill(at & ~self.first, -float("inf")).masked_fill(at & self.first, 0.0)

    return ForceLengths()


@contextlib.contextmanager
def forced_lengths(draw):
    """Within the block every ``generate`` call of any transformers model (``GenerationMixin.generate``)
    and every call of rltk's own decode loop (``rollout.drop_finished``) gets :func:`length_processor`
    with ``draw(first_row, rows)`` lengths, ``first_row`` the rows of the block's earlier calls;
    yields a record of the calls (their drawn lengths) and of ``rows``. Restores both on exit.
    Generation that bypasses both (transformers' continuous batching) is not forced: compare
    ``rows`` with the rows the run generated."""
    from transformers import GenerationMixin, LogitsProcessorList

    from rltk.engines import hf

    original = GenerationMixin.generate
    original_decode = hf.sample_dropping_finished
    record = {"calls": [], "rows": 0}

    def draw_call(rows: int) -> list[int]:
        lengths = draw(record["rows"], rows)
        record["calls"].append(lengths)
        record["rows"] += rows
        return lengths

    def generate(self, *args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("forced completion lengths need input_ids")
        rows, width = input_ids.shape
        lengths = draw_call(rows)
        config = kwargs.get("generation_config") or self.generation_config
        eos = _eos_ids(kwargs["eos_token_id"]) if kwargs.get("eos_token_id") is not None else \
            _eos_ids(config.eos_token_id)
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(length_processor(lengths, width, eos))
        return original(self, *args, logits_processor=processors, **kwargs)

    def decode(model, prompt_ids, prompt_mask, **kwargs):
        lengths = draw_call(prompt_ids.shape[0])
        kwargs["row_processor"] = length_processor(lengths, prompt_ids.shape[1], [kwargs["eos_token_id"]]).apply
        return original_decode(model, prompt_ids, prompt_mask, **kwargs)

    GenerationMixin.generate = generate
    hf.sample_dropping_finished = decode
    try:
        yield record
    finally:
        GenerationMixin.generate = original
        hf.sample_dropping_finished = original_decode


# ---------------------------------------------------------------------------------------------- padding
class ForwardTokens:
    """Counts the token positions (padding included) and real tokens of a model's training forwards.

    A forward pre-hook on the decoder (``model.get_decoder()``; both trainers reach it through the
    causal LM's forward) counts every call made with gradients enabled, so generation and no-grad
    log-prob forwards are left out (generation runs with the model in eval mode, but no-grad
    log-prob forwards do not): positions = ``input_ids.numel()``, real
    tokens = the 2-D attention mask's sum. A forward without such a mask (packed sequences) adds its
    positions to ``unmasked``: its padding cannot be counted here. The mask sums stay tensors until
    :meth:`take`, so counting adds no device synchronisation inside a step."""

    def __init__(self, model: torch.nn.Module):
        inner = getattr(model, "module", model)
        decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner
        self.handle = decoder.register_forward_pre_hook(self._count, with_kwargs=True)
        self._reset()

    def _reset(self) -> None:
        self.positions, self.unmasked, self.forwards, self._real = 0, 0, 0, []

    def _count(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                return
            shape = tuple(embeds.shape[:2])
        else:
            shape = tuple(ids.shape)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        count = shape[0] * shape[1] if len(shape) == 2 else int(torch.Size(shape).numel())
        self.forwards += 1
        self.positions += count
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == shape:
            self._real.append(mask.detach().sum())
        else:
            self.unmasked += count

    def take(self) -> dict[str, int]:
        """The counts since the last call: positions, real (masked forwards only), unmasked, forwards."""
        out = {"positions": self.positions, "real": int(sum(int(r) for r in self._real)),
               "unmasked": self.unmasked, "forwards": self.forwards}
        self._reset()
        return out

    def close(self) -> None:
        self.handle.remove()


PADDING_METRICS = ("tokens/forward", "tokens/padding_share")


# ---------------------------------------------------------------------------------------------- rltk
BREAKDOWN = ("time/generate", "time/score", "time/extra_forwards", "time/forward", "time/backward")


def rltk_recipe_data(args: argparse.Namespace, model_dir: str, out: Path) -> dict:
    """The rltk recipe both sides mirror: quickstart's GRPO settings without SFT or evaluation."""
    completions = args.prompts * args.group_size
    return {
        "model": {"name_or_path": model_dir},
        "data": {"source": "builtin", "levels": [1], "template": "compact", "num_train": 1024, "num_test": 8},
        "rollout": {"engine": "hf", "group_size": args.group_size, "temperature": 1.0, "top_p": 1.0,
                    "max_new_tokens": generation_limit(args), "batch_size": completions},
        "algorithm": {"advantage": [{"name": "grpo"}],
                      "loss": {"name": "ppo_clip", "epsilon_low": 0.2, "epsilon_high": 0.2},
                      "aggregation": "token_mean"},
        "rewards": [{"name": "math"}],
        "verifier": {},  # defaults, the same as rewards.math.math_reward's verifier on the TRL side
        "trainer": {"steps": args.warmup + args.steps, "prompts_per_step": args.prompts,
                    "micro_batch_size": completions, "lr": args.lr, "max_grad_norm": 1.0,
                    "lr_scheduler": "constant", "seed": args.seed, "output_dir": str(out)},
        "logging": {"progress": False, "report_to": []},
    }


def check_rltk_set(parser: argparse.ArgumentParser, overrides: list[str]) -> None:
    """Every ``--rltk-set`` is KEY=VALUE (its key and value are checked when the recipe is built)."""
    for override in overrides:
        if "=" not in override or not override.partition("=")[0].strip():
            parser.error(f"--rltk-set {override!r}: expected KEY=VALUE, e.g. trainer.padding_free=true")


def with_overrides(data: dict, overrides: list[str]):
    """The validated recipe of ``data`` with the ``--rltk-set`` ``overrides`` applied."""
    from rltk.schema import apply_override
    from rltk.validate import build_recipe

    for override in overrides:
        apply_override(data, override)
    return build_recipe(data)


def rltk_recipe(args: argparse.Namespace, model_dir: str, out: Path):
    """The rltk side's validated recipe: :func:`rltk_recipe_data` with the ``--rltk-set`` overrides."""
    return with_overrides(rltk_recipe_data(args, model_dir, out), args.rltk_set)


def run_rltk(args: argparse.Namespace, model_dir: str, work: Path) -> dict:
    from rltk.trainer.rl import RLTrainer

    trainer = RLTrainer(rltk_recipe(args, model_dir, work / "rltk"))
    counter = ForwardTokens(trainer.accelerator.unwrap_model(trainer.model))
    times, cpu, lengths, parts, tokens, logged = [], [], [], [], [], []
    try:
        for _ in range(args.warmup + args.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = trainer.train_batch()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
            lengths.append(metrics["completion/length_mean"])
            parts.append({k.split("/", 1)[1]: v for k, v in metrics.items() if k in BREAKDOWN})
            tokens.append(counter.take())
            logged.append({k: metrics[k] for k in PADDING_METRICS if k in metrics})
            print(f"  rltk step {len(times):3d}: {times[-1]:.3f} s  (completion length {lengths[-1]:.1f})", flush=True)
    finally:
        counter.close()
        trainer.close()
    return {"times": times[args.warmup:], "cpu": cpu[args.warmup:], "lengths": lengths[args.warmup:],
            "parts": parts[args.warmup:], "tokens": tokens[args.warmup:], "logged": logged[args.warmup:]}


# ---------------------------------------------------------------------------------------------- TRL
def trl_dataset(args: argparse.Namespace, model_dir: str, work: Path):
    """The same prompts (rltk's template) and gold answers, as a ``datasets.Dataset``."""
    from datasets import Dataset

    from rltk.validate import build_recipe
    from rltk.data.recipe import build_prompts, load_split
    from rltk.models import load_tokenizer

    recipe = build_recipe(rltk_recipe_data(args, model_dir, work / "rltk"))
    examples = load_split(recipe.data, recipe.data.train_split, recipe.data.num_train, seed=args.seed)
    prompts = build_prompts(examples, recipe.data, load_tokenizer(model_dir))
    return Dataset.from_dict({"prompt": prompts, "answer": [e.answer for e in examples]})


def run_trl(args: argparse.Namespace, model_dir: str, work: Path) -> dict:
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.math import math_reward

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu, self.lengths, self.tokens, self._start = [], [], [], [], (0.0, 0.0)
            self.counter: ForwardTokens | None = None

        def on_step_begin(self, *_, **__):
            self._start = (time.perf_counter(), time.process_time())

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self._start[0])
            self.cpu.append(time.process_time() - self._start[1])
            self.tokens.append(self.counter.take())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])
                print(f"  trl  step {len(self.times):3d}: {self.times[-1]:.3f} s  "
                      f"(completion length {self.lengths[-1]:.1f})", flush=True)

    completions = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=str(work / "trl"), report_to="none", use_cpu=True, bf16=False, fp16=False, seed=args.seed,
        max_steps=args.warmup + args.steps, per_device_train_batch_size=completions,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=args.group_size, max_completion_length=generation_limit(args),
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.2, scale_rewards="group",
        activation_checkpointing=False, use_vllm=False,
        eval_strategy="no", save_strategy="no", logging_steps=1, log_completions=False, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model_dir, reward_funcs=math_reward, args=config,
                              train_dataset=trl_dataset(args, model_dir, work), callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # logging_steps=1 only feeds the timer's completion lengths
        timer.counter = ForwardTokens(trainer.model)
        try:
            trainer.train()
        finally:
            timer.counter.close()
    return {"times": timer.times[args.warmup:], "cpu": timer.cpu[args.warmup:], "lengths": timer.lengths[args.warmup:],
            "parts": [], "tokens": timer.tokens[args.warmup:], "logged": []}


# ---------------------------------------------------------------------------------------------- main
def summarise(runs: list[dict]) -> dict:
    """Pool the timed steps of every run of one side."""
    times = [t for run in runs for t in run["times"]]
    cpu = [t for run in runs for t in run["cpu"]]
    out = {"median_s": statistics.median(times), "mean_s": statistics.mean(times), "min_s": min(times),
           "steps": len(times), "runs": len(runs),
           # process CPU seconds per wall second; it drops well below --threads when another job shares the cores
           "cpu_per_wall": sum(cpu) / sum(times),
           "completion_length": statistics.mean(x for run in runs for x in run["lengths"])}
    parts = [p for run in runs for p in run["parts"]]
    if parts:
        out["breakdown_median_s"] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    if any("forced_rows" in run for run in runs):  # --lengths heavy: [rows forced, rows generated] per run
        out["forced_rows"] = [list(run["forced_rows"]) for run in runs]
    out.update(padding_summary([t for run in runs for t in run["tokens"]],
                               [m for run in runs for m in run["logged"]]))
    return out


def padding_summary(tokens: list[dict], logged: list[dict]) -> dict:
    """The padding share of the timed steps' training forwards (:class:`ForwardTokens` counts per
    step; ``logged``: rltk's per-step ``tokens/forward`` and ``tokens/padding_share``, empty for TRL).

    ``padding_share`` comes from the attention masks when every forward had one; when some ran
    packed (no 2-D mask) it is rltk's logged ``tokens/padding_share`` (weighted by
    ``tokens/forward``), or None with ``padding_note`` saying why."""
    positions = sum(t["positions"] for t in tokens)
    unmasked = sum(t["unmasked"] for t in tokens)
    real = sum(t["real"] for t in tokens)
    out = {"tokens_forward_per_step": positions / max(1, len(tokens)), "unmasked_positions": unmasked,
           "training_forwards": sum(t["forwards"] for t in tokens)}
    logged_share = None
    if logged and all("tokens/padding_share" in m for m in logged):
        weights = [m.get("tokens/forward", 1.0) for m in logged]
        logged_share = sum(w * m["tokens/padding_share"] for w, m in zip(weights, logged)) / max(sum(weights), 1e-12)
        out["logged_padding_share"] = logged_share
        if all("tokens/forward" in m for m in logged):
            out["logged_tokens_forward_per_step"] = sum(weights) / len(weights)
    if positions == 0:
        out.update(padding_share=None, padding_source=None, padding_note="no training forward was counted")
    elif unmasked == 0:
        out.update(padding_share=1.0 - real / positions, padding_source="attention masks",
                   real_tokens_per_step=real / len(tokens))
    elif logged_share is not None:
        out.update(padding_share=logged_share, padding_source="rltk metric tokens/padding_share")
    else:
        out.update(padding_share=None, padding_source=None,
                   padding_note=f"{unmasked} of {positions} positions ran without an attention mask (packed) and the "
                                "trainer logged no tokens/padding_share: padding share unknown")
    if logged is not None and logged and logged_share is None:
        out["logged_note"] = ("rltk logged no tokens/padding_share (its trainer predates the metric); the padding "
                              "share comes from the forward hook alone")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    import rltk
    from rltk.models import build_tiny_model

    from rltk.schema import ConfigError

    with tempfile.TemporaryDirectory(prefix="rltk-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        model_dir = args.model_dir or str(build_tiny_model(work / "tiny"))
        try:
            rltk_recipe(args, model_dir, work / "check")  # a bad --rltk-set fails here, in one line, before any run
        except ConfigError as exc:
            raise SystemExit(f"--rltk-set: {exc}") from None
        runners = {"rltk": run_rltk, "trl": run_trl}
        results = {"rltk": [], "trl": []}
        for i, side in enumerate(args.order.split(",")):
            print(f"{side}: {args.warmup} warm-up + {args.steps} timed steps", flush=True)
            torch.manual_seed(args.seed)
            forced = forced_lengths(lambda first, rows: draw_lengths(
                first, rows, args.max_new_tokens, long_share=args.long_share, long_factor=args.long_factor,
                seed=args.seed)) if args.lengths == "heavy" else contextlib.nullcontext()
            with forced as record:
                results[side].append(runners[side](args, model_dir, work / f"run{i}"))
            if record is not None:  # every row generated in the run must have had its length forced
                expected = (args.warmup + args.steps) * args.prompts * args.group_size
                results[side][-1]["forced_rows"] = (record["rows"], expected)
                if record["rows"] != expected:
                    print(f"WARNING: {side} generated {expected} rows but {record['rows']} went through "
                          "GenerationMixin.generate with forced lengths (continuous batching bypasses it): the "
                          "two sides did not get the same lengths", flush=True)
    report = {
        "config": {k: getattr(args, k) for k in ("steps", "warmup", "prompts", "group_size", "max_new_tokens",
                                                   "threads", "lr", "seed", "order", "lengths", "rltk_set")}
        | {"model_dir": args.model_dir, "generation_limit": generation_limit(args)}
        | ({"long_share": args.long_share, "long_factor": args.long_factor} if args.lengths == "heavy" else {}),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "trl": trl.__version__,
                    "rltk": getattr(rltk, "__version__", "dev")},
        "rltk": summarise(results["rltk"]),
        "trl": summarise(results["trl"]),
    }
    report["ratio_median_rltk_over_trl"] = report["rltk"]["median_s"] / report["trl"]["median_s"]
    print()
    lengths = (f"heavy lengths ({1 - args.long_share:.0%} in [1, {args.max_new_tokens}], {args.long_share:.0%} in "
               f"[{args.max_new_tokens + 1}, {generation_limit(args)}]), max_new_tokens {generation_limit(args)}"
               if args.lengths == "heavy" else f"max_new_tokens {args.max_new_tokens}")
    print(f"{args.prompts} prompts × {args.group_size} completions, {lengths}, "
          f"{args.threads} thread(s), {args.steps} timed steps after {args.warmup} warm-up per run, order {args.order}")
    if args.rltk_set:
        print("rltk overrides: " + " ".join(args.rltk_set))
    print(f"{'':6s}{'median s':>10s}{'mean s':>10s}{'min s':>10s}{'compl. len':>12s}{'cpu/wall':>10s}"
          f"{'pad share':>11s}")
    for side in ("rltk", "trl"):
        r = report[side]
        share = "n/a" if r["padding_share"] is None else f"{r['padding_share']:.1%}"
        print(f"{side:6s}{r['median_s']:10.3f}{r['mean_s']:10.3f}{r['min_s']:10.3f}{r['completion_length']:12.1f}"
              f"{r['cpu_per_wall']:10.2f}{share:>11s}")
    print("rltk breakdown (median s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in report["rltk"]["breakdown_median_s"].items()))
    for side in ("rltk", "trl"):
        r = report[side]
        print(f"{side} padding share: {r['padding_source'] or r['padding_note']}"
              + (f"; rltk's tokens/padding_share {r['logged_padding_share']:.1%}" if "logged_padding_share" in r else ""))
    if "logged_note" in report["rltk"]:
        print(f"note: {report['rltk']['logged_note']}")
    print(f"ratio of medians rltk / TRL: {report['ratio_median_rltk_over_trl']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

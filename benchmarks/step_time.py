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

    python benchmarks/step_time.py --steps 10 --warmup 2 --prompts 32 --group-size 8 \
        --max-new-tokens 24 --threads 2 --order rltk,trl,trl,rltk
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
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


# ---------------------------------------------------------------------------------------------- rltk
BREAKDOWN = ("time/generate", "time/score", "time/extra_forwards", "time/forward", "time/backward")


def rltk_recipe_data(args: argparse.Namespace, model_dir: str, out: Path) -> dict:
    """The rltk recipe both sides mirror: quickstart's GRPO settings without SFT or evaluation."""
    completions = args.prompts * args.group_size
    return {
        "model": {"name_or_path": model_dir},
        "data": {"source": "builtin", "levels": [1], "template": "compact", "num_train": 1024, "num_test": 8},
        "rollout": {"engine": "hf", "group_size": args.group_size, "temperature": 1.0, "top_p": 1.0,
                    "max_new_tokens": args.max_new_tokens, "batch_size": completions},
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


def run_rltk(args: argparse.Namespace, model_dir: str, work: Path) -> dict:
    from rltk.validate import build_recipe
    from rltk.trainer.rl import RLTrainer

    trainer = RLTrainer(build_recipe(rltk_recipe_data(args, model_dir, work / "rltk")))
    times, cpu, lengths, parts = [], [], [], []
    try:
        for _ in range(args.warmup + args.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = trainer.train_batch()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
            lengths.append(metrics["completion/length_mean"])
            parts.append({k.split("/", 1)[1]: v for k, v in metrics.items() if k in BREAKDOWN})
            print(f"  rltk step {len(times):3d}: {times[-1]:.3f} s  (completion length {lengths[-1]:.1f})", flush=True)
    finally:
        trainer.close()
    return {"times": times[args.warmup:], "cpu": cpu[args.warmup:], "lengths": lengths[args.warmup:],
            "parts": parts[args.warmup:]}


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
            self.times, self.cpu, self.lengths, self._start = [], [], [], (0.0, 0.0)

        def on_step_begin(self, *_, **__):
            self._start = (time.perf_counter(), time.process_time())

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self._start[0])
            self.cpu.append(time.process_time() - self._start[1])

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
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
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
        trainer.train()
    return {"times": timer.times[args.warmup:], "cpu": timer.cpu[args.warmup:], "lengths": timer.lengths[args.warmup:],
            "parts": []}


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
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    import rltk
    from rltk.models import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="rltk-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        model_dir = args.model_dir or str(build_tiny_model(work / "tiny"))
        runners = {"rltk": run_rltk, "trl": run_trl}
        results = {"rltk": [], "trl": []}
        for i, side in enumerate(args.order.split(",")):
            print(f"{side}: {args.warmup} warm-up + {args.steps} timed steps", flush=True)
            torch.manual_seed(args.seed)
            results[side].append(runners[side](args, model_dir, work / f"run{i}"))
    report = {
        "config": {k: getattr(args, k) for k in ("steps", "warmup", "prompts", "group_size", "max_new_tokens",
                                                   "threads", "lr", "seed", "order")} | {"model_dir": args.model_dir},
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "trl": trl.__version__,
                    "rltk": getattr(rltk, "__version__", "dev")},
        "rltk": summarise(results["rltk"]),
        "trl": summarise(results["trl"]),
    }
    report["ratio_median_rltk_over_trl"] = report["rltk"]["median_s"] / report["trl"]["median_s"]
    print()
    print(f"{args.prompts} prompts × {args.group_size} completions, max_new_tokens {args.max_new_tokens}, "
          f"{args.threads} thread(s), {args.steps} timed steps after {args.warmup} warm-up per run, order {args.order}")
    print(f"{'':6s}{'median s':>10s}{'mean s':>10s}{'min s':>10s}{'compl. len':>12s}{'cpu/wall':>10s}")
    for side in ("rltk", "trl"):
        r = report[side]
        print(f"{side:6s}{r['median_s']:10.3f}{r['mean_s']:10.3f}{r['min_s']:10.3f}{r['completion_length']:12.1f}"
              f"{r['cpu_per_wall']:10.2f}")
    print("rltk breakdown (median s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in report["rltk"]["breakdown_median_s"].items()))
    print(f"ratio of medians rltk / TRL: {report['ratio_median_rltk_over_trl']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

"""Wall time per optimizer step, synchronous loop vs asynchronous generation (``rollout.max_staleness``).

On 2 CPU cores a local ``hf`` producer competes with training for the same cores, which says little
about a GPU run where a vLLM server generates on other GPUs. So the main comparison uses a **remote
engine stand-in**: an engine that returns completions of the same model after a fixed wall-clock
latency without using the trainer's cores (it sleeps), as a vLLM server elsewhere would. The
completions are generated beforehand, outside the timed runs, for exactly the prompts the sampler
will ask for (the same seed draws the same prompts), with their sampling log-probs.

1. ``calibrate``: the synchronous loop with the stand-in at latency 0 gives the training time per
   step T (collection after generation, forwards, backward, update);
2. ``sync`` and ``async`` (``max_staleness`` = ``--staleness``, default 1), both with the stand-in at
   latency T (``--latency`` sets it instead): wall time per optimizer step over ``--steps`` steps
   after ``--warmup``; the ideal ratio async / sync is 1/2 (generation hidden behind training);
3. ``--local``: also the loops with the real ``hf`` engine, whatever the ratios are: synchronous,
   with the producer in a worker process of its own (``rollout.producer: process``, half the
   threads each; the default on CPU), and with the producer as a thread of the trainer's process
   (``rollout.producer: thread``, sharing its threads and interpreter lock).

The recipe is step_time.py's (the quickstart's GRPO shape: 32 prompts × 8, ``max_new_tokens`` 24) on
rltk's tiny model or ``--model-dir``. Run alone (docs/design.md §9). Figures: benchmarks/README.md.

    python benchmarks/async_step.py --steps 20 --warmup 2 --local
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--staleness", type=int, default=1, help="rollout.max_staleness of the async runs (default 1)")
    p.add_argument("--latency", type=float, default=None,
                   help="the stand-in's seconds per batch (default: the calibrated training time per step)")
    p.add_argument("--local", action="store_true", help="also time both loops with the real hf engine")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None, help="a model directory (default: build rltk's tiny model)")
    return p.parse_args(argv)


def recipe_data(args: argparse.Namespace, model_dir: str, out: Path, staleness: int, producer: str = "auto") -> dict:
    from benchmarks.step_time import rltk_recipe_data

    shape = argparse.Namespace(prompts=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                               lengths="uniform", warmup=args.warmup, steps=args.steps, lr=args.lr, seed=args.seed)
    data = rltk_recipe_data(shape, model_dir, out)
    data["rollout"]["max_staleness"] = staleness
    data["rollout"]["producer"] = producer
    # the same loss on both sides: the importance weights are on in the synchronous runs too (the
    # stand-in's completions come from the initial weights, so they are off-policy there as well)
    data["rollout"]["importance_sampling"] = {"enabled": True}
    return data


class RemoteStandIn:
    """A rollout engine that answers after ``latency`` seconds of sleep with completions generated
    beforehand (``prepare``), keyed by the batch's prompts; it uses none of the trainer's cores."""

    def __init__(self, latency: float):
        self.latency = latency
        self.answers: dict[tuple, object] = {}
        self.misses = 0

    def prepare(self, engine, batches: list[list[str]], params) -> None:
        for prompts in batches:
            self.answers[tuple(prompts)] = engine.generate(prompts, params)

    def generate(self, prompts: list[str], params):
        start = time.perf_counter()
        answer = self.answers.get(tuple(prompts))
        if answer is None:
            raise RuntimeError("the stand-in has no completions for this batch's prompts")
        time.sleep(max(0.0, self.latency - (time.perf_counter() - start)))
        return answer

    def sync_weights(self) -> None:
        """A remote server would receive the weights here; the stand-in's completions are fixed."""


def batches_of(trainer, count: int) -> list[list[str]]:
    """The prompts of the trainer's next ``count`` rollout batches (a copy of its sampler draws them)."""
    import copy

    sampler = copy.deepcopy(trainer.sampler)
    n = trainer.recipe.trainer.prompts_per_step
    return [[trainer.collector.data.prompts[i] for i in sampler.next_indices(n)] for _ in range(count)]


def run(args: argparse.Namespace, model_dir: str, work: Path, name: str, staleness: int,
        latency: float | None, producer: str = "auto") -> dict:
    """One run: per-step wall times of ``warmup + steps`` optimizer steps (the stand-in when
    ``latency`` is not None, else the recipe's own hf engine with ``rollout.producer``)."""
    from rltk.engines.base import SamplingParams
    from rltk.trainer.rl import RLTrainer
    from rltk.validate import build_recipe

    torch.manual_seed(args.seed)
    trainer = RLTrainer(build_recipe(recipe_data(args, model_dir, work / name, staleness, producer)))
    try:
        r = trainer.recipe.rollout
        if latency is not None:
            stand_in = RemoteStandIn(latency)
            params = SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                    max_new_tokens=r.max_new_tokens, return_logps=True)
            stand_in.prepare(trainer.engine, batches_of(trainer, args.warmup + args.steps), params)
            trainer.behaviour_engine = stand_in
            if staleness == 0:  # the synchronous loop samples with the collector's engine
                trainer.collector.engine = stand_in
        torch.manual_seed(args.seed)
        marks, metrics = [], []
        for _ in range(args.warmup + args.steps):
            metrics.append(trainer.train_batch())
            marks.append(time.perf_counter())
    finally:
        trainer.close()
    timed = [b - a for a, b in zip(marks[args.warmup - 1:], marks[args.warmup:])] if args.warmup else \
        [b - a for a, b in zip(marks, marks[1:])]
    # the trainer's own time: its step less the wait for the producer (async), or less generation and
    # scoring (sync, which runs them in the step)
    train_s = [m["time/step"] - (m["async/wait"] if "async/wait" in m else m["time/generate"] + m["time/score"])
               for m in metrics[args.warmup:]]
    return {"name": name, "staleness": staleness, "latency": latency, "step_s": statistics.median(timed),
            "train_s": statistics.median(train_s),
            "staleness_seen": sorted({m.get("async/staleness", 0.0) for m in metrics}),
            "wait_s": statistics.median(m.get("async/wait", 0.0) for m in metrics[args.warmup:])}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from rltk.models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model_dir or str(build_tiny_model(work / "tiny"))
        calibration = run(args, model_dir, work, "calibrate", 0, 0.0)
        latency = args.latency if args.latency is not None else calibration["train_s"]
        runs = [run(args, model_dir, work, "sync", 0, latency), run(args, model_dir, work, "async", args.staleness,
                                                                      latency)]
        if args.local:
            runs += [run(args, model_dir, work, "sync-local", 0, None),
                     run(args, model_dir, work, "async-process", args.staleness, None, "process"),
                     run(args, model_dir, work, "async-thread", args.staleness, None, "thread")]
    print(f"{args.prompts} prompts × {args.group_size} completions, max_new_tokens {args.max_new_tokens}, "
          f"{args.threads} thread(s), {args.steps} timed steps after {args.warmup} per run; stand-in latency "
          f"{latency:.3f} s (calibrated training time per step {calibration['train_s']:.3f} s)")
    print(f"{'run':<14}{'staleness':>10}{'latency s':>11}{'step s':>9}{'train s':>9}{'wait s':>9}  staleness seen")
    for r in runs:
        lat = "-" if r["latency"] is None else f"{r['latency']:.3f}"
        print(f"{r['name']:<14}{r['staleness']:>10}{lat:>11}{r['step_s']:>9.3f}{r['train_s']:>9.3f}"
              f"{r['wait_s']:>9.3f}  {r['staleness_seen']}")
    by = {r["name"]: r for r in runs}
    report = {"calibration": calibration, "latency": latency, "runs": runs,
              "ratio_stand_in": by["async"]["step_s"] / by["sync"]["step_s"]}
    print(f"ratio async / sync, remote stand-in: {report['ratio_stand_in']:.3f} (ideal 0.5)")
    if args.local:
        for producer in ("process", "thread"):
            report[f"ratio_{producer}"] = by[f"async-{producer}"]["step_s"] / by["sync-local"]["step_s"]
            print(f"ratio async / sync, local hf producer ({producer}): {report[f'ratio_{producer}']:.3f}")
    return report


if __name__ == "__main__":
    main()

"""ResRL's weight computation against the forward+backward of the same batch.

ResRL (``rltk/algos/resrl.py``) runs once per rollout batch on detached hidden states; the question
is what it adds to a training step. Both sides see the same batch: ``--groups × --group-size``
completions of ``--tokens`` tokens (default 8 × 8 × 512) at hidden size 896, the size of
Qwen2.5-0.5B.

* ResRL: the ``resrl`` modifier with its defaults (rank 64, at most 4096 correct-completion rows per
  group, so every group here is under the cap) after a ``grpo`` advantage, given random hidden
  states [N, T, 896] and correctness with mixed groups: group g has 1 + (g mod (group_size − 1))
  correct completions, so every group is used and both of resrl's bases occur (the exact Gram
  eigendecomposition for one correct completion of 512 rows, min(rows, H) ≤ 512; the randomized
  subspace iteration from 1,024 rows, min(rows, H) = 896). Values of the hidden states do not change
  the work. Time spent in ``positive_basis`` (exact / randomized basis) and in
  ``residual_distance`` (the projection) is measured by wrapping the two functions.
* Model: a random-init Qwen2 with Qwen2.5-0.5B's widths (hidden 896, MLP 4864, 14 heads, 2 KV heads,
  tied embeddings) but ``--layers`` layers and a ``--vocab``-token vocabulary, forward with gradient
  and backward as the trainer does it (``rltk.trainer.logprobs.forward_logps`` on one prompt token
  plus the completion, a policy-gradient token-mean loss, micro-batches of ``--micro-batch``
  completions, gradients summed). No optimizer step.

Fewer layers and a smaller vocabulary make the model side cheaper than the real model's (24 layers,
151,936 tokens), so the measured ratio resrl / (forward+backward) is an upper bound on ResRL's
overhead at the real depth. Each repeat times the model side and then ResRL; the first ``--warmup``
repeats are dropped and the medians of the rest are reported. Run it alone on an otherwise idle
machine. See benchmarks/README.md for measured figures.

    python benchmarks/resrl_overhead.py --layers 1 --vocab 4096 --repeats 3 --warmup 1 --threads 2

``--basis`` measures only the per-group basis instead (no model): for each ``--sizes`` entry
rows × H, float32 input with a slowly decaying spectrum (σ_i = 1/√(i+1), random orthogonal factors),
it times ``gram_basis`` (exact), ``randomized_basis`` (what ``positive_basis`` uses above
EXACT_MAX_DIM) and the basis rltk used before, ``torch.pca_lowrank(q=k, niter=4)`` (no
oversampling), interleaved in each repeat, rank 64; and reports the smallest principal cosine of the
two randomized bases against the exact one. Medians of wall-clock and of process CPU time (steadier
on a shared machine) after ``--warmup`` untimed repeats.

    OMP_NUM_THREADS=1 python benchmarks/resrl_overhead.py --basis --threads 1 --repeats 3 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

HIDDEN = 896  # Qwen2.5-0.5B
INTERMEDIATE = 4864
HEADS, KV_HEADS = 14, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1, help="decoder layers of the model side (default 1; Qwen2.5-0.5B: 24)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096; Qwen2.5-0.5B: 151936)")
    p.add_argument("--groups", type=int, default=8, help="prompts in the batch (default 8)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per completion (default 512)")
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up repeats (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--basis", action="store_true",
                   help="time only the per-group basis (exact / randomized / old pca_lowrank) at --sizes")
    p.add_argument("--sizes", default="4096x3584,4096x896,2048x768",
                   help="--basis: comma-separated rows x H (default 4096x3584,4096x896,2048x768)")
    p.add_argument("--rank", type=int, default=64, help="--basis: the rank knob (default 64)")
    args = p.parse_args(argv)
    try:
        args.sizes = [tuple(int(v) for v in item.lower().split("x")) for item in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must look like 4096x3584,2048x768, got {args.sizes!r}")
    if any(len(sz) != 2 or min(sz) < 2 for sz in args.sizes) or args.rank < 1:
        p.error("--sizes needs rows x H pairs of at least 2 each, --rank at least 1")
    for name in ("layers", "vocab", "groups", "tokens", "micro_batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.group_size < 2:
        p.error("--group-size must be at least 2 (a group needs a correct and a wrong completion)")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def build_batch(args: argparse.Namespace):
    """Token batch for the model side and rollouts (hidden states, mixed correctness) for ResRL."""
    from rltk.algos.types import Rollouts
    from rltk.trainer.logprobs import TokenBatch

    n = args.groups * args.group_size
    generator = torch.Generator().manual_seed(args.seed)
    tokens = TokenBatch(
        prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.randint(0, args.vocab, (n, args.tokens), generator=generator),
        completion_mask=torch.ones(n, args.tokens, dtype=torch.long),
    )
    correct = torch.zeros(args.groups, args.group_size, dtype=torch.bool)
    for g in range(args.groups):
        correct[g, : 1 + g % (args.group_size - 1)] = True
    correct = correct.flatten()
    rollouts = Rollouts(
        group_ids=torch.arange(args.groups).repeat_interleave(args.group_size),
        rewards=correct.double(), correct=correct,
        completion_mask=torch.ones(n, args.tokens), truncated=torch.zeros(n, dtype=torch.bool),
        hidden=torch.randn(n, args.tokens, HIDDEN, generator=generator),
    )
    return tokens, rollouts


def build_model(args: argparse.Namespace):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=args.layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=args.tokens + 1, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM(config).train()


def forward_backward(model, tokens, advantages: torch.Tensor, micro_batch: int) -> float:
    """Seconds for the training forward and backward of every micro-batch, gradients summed."""
    from rltk.trainer.logprobs import forward_logps

    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for first in range(0, len(tokens), micro_batch):
        index = torch.arange(first, min(first + micro_batch, len(tokens)))
        logps = forward_logps(model, tokens.rows(index)).logps
        mask = tokens.completion_mask[index].float()
        loss = -(advantages[index].unsqueeze(-1) * logps * mask).sum() / mask.sum()
        loss.backward()
    return time.perf_counter() - start


class PartTimer:
    """Wraps ResRL's basis and projection functions and adds up the seconds spent in each."""

    def __init__(self, module, names: tuple[str, ...]):
        self.seconds = dict.fromkeys(names, 0.0)
        for name in names:
            setattr(module, name, self._timed(name, getattr(module, name)))

    def _timed(self, name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return wrapper

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return out


def slow_spectrum(rows: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """float32 rows × size with singular values 1/√(i+1) and random orthogonal factors."""
    r = min(rows, size)
    left = torch.linalg.qr(torch.randn(rows, r, dtype=torch.float64, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(size, r, dtype=torch.float64, generator=generator)).Q
    sigma = 1.0 / torch.arange(1, r + 1, dtype=torch.float64).sqrt()
    return ((left * sigma) @ right.T).float()


def basis_main(args: argparse.Namespace) -> dict:
    """The --basis mode: exact vs randomized vs the old pca_lowrank basis, time and accuracy."""
    from rltk.algos import resrl as resrl_module

    def old_pca_lowrank(x: torch.Tensor, rank: int) -> torch.Tensor:  # rltk's basis before 2500fd4
        k = min(rank, x.shape[0] - 1, x.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            _, _, v = torch.pca_lowrank(x - x.mean(0), q=k, center=False, niter=4)
        return v[:, :k]

    methods = {
        "exact": lambda x: resrl_module.gram_basis(x, args.rank)[1],
        "randomized": lambda x: resrl_module.randomized_basis(x, args.rank, args.seed)[1],
        "pca_lowrank": lambda x: old_pca_lowrank(x, args.rank),
    }
    generator = torch.Generator().manual_seed(args.seed)
    results = []
    print(f"per-group basis, rank {args.rank}, {args.threads} thread(s), float32 input, σ_i = 1/√(i+1); "
          f"EXACT_MAX_DIM {resrl_module.EXACT_MAX_DIM}, POWER_ITERS {resrl_module.POWER_ITERS}, "
          f"l = k + max(k, {resrl_module.MIN_OVERSAMPLE}); medians of wall-clock and process CPU seconds", flush=True)
    for rows, size in args.sizes:
        x = slow_spectrum(rows, size, generator)
        seconds = {name: [] for name in methods}
        cpu_seconds = {name: [] for name in methods}
        bases = {}
        for i in range(args.warmup + args.repeats):
            for name, fn in methods.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                bases[name] = fn(x)
                if i >= args.warmup:
                    seconds[name].append(time.perf_counter() - start)
                    cpu_seconds[name].append(time.process_time() - start_cpu)
        exact = bases["exact"].double()
        row = {"rows": rows, "hidden": size,
               "dispatch": resrl_module.basis_method(rows, size, args.rank),
               **{f"{name}_s": statistics.median(v) for name, v in seconds.items()},
               **{f"{name}_cpu_s": statistics.median(v) for name, v in cpu_seconds.items()},
               **{f"{name}_runs_s": v for name, v in seconds.items()}}
        for name in ("randomized", "pca_lowrank"):
            cosines = torch.linalg.svdvals(bases[name].double().T @ exact)
            row[f"{name}_min_cosine"] = cosines.min().item() if cosines.numel() else 1.0
        results.append(row)
        print(f"  {rows} x {size} (positive_basis: {row['dispatch']}): "
              f"exact {row['exact_s']:.3f} s (cpu {row['exact_cpu_s']:.3f}), "
              f"randomized {row['randomized_s']:.3f} s (cpu {row['randomized_cpu_s']:.3f}; "
              f"smallest cosine {row['randomized_min_cosine']:.4f}), "
              f"old pca_lowrank {row['pca_lowrank_s']:.3f} s (cpu {row['pca_lowrank_cpu_s']:.3f}; "
              f"smallest cosine {row['pca_lowrank_min_cosine']:.4f})", flush=True)
    report = {
        "config": {"mode": "basis", "rank": args.rank, "threads": args.threads, "repeats": args.repeats,
                   "warmup": args.warmup, "seed": args.seed, "exact_max_dim": resrl_module.EXACT_MAX_DIM,
                   "power_iters": resrl_module.POWER_ITERS},
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "sizes": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.basis:
        return basis_main(args)
    import transformers

    from rltk.algos import resrl as resrl_module
    from rltk.algos.estimators import grpo

    tokens, rollouts = build_batch(args)
    model = build_model(args)
    parts = PartTimer(resrl_module, ("positive_basis", "residual_distance"))
    advantages = grpo(rollouts)
    runs = []
    for i in range(args.warmup + args.repeats):
        model_s = forward_backward(model, tokens, advantages.values.float(), args.micro_batch)
        parts.take()
        start = time.perf_counter()
        out = resrl_module.resrl(rollouts, advantages)
        resrl_s = time.perf_counter() - start
        split = parts.take()
        assert out.metrics["groups_used"] == args.groups
        label = "warm-up" if i < args.warmup else "timed"
        print(f"  repeat {i + 1} ({label}): forward+backward {model_s:.3f} s, resrl {1000 * resrl_s:.1f} ms "
              f"(basis {1000 * split['positive_basis']:.1f}, projection {1000 * split['residual_distance']:.1f})",
              flush=True)
        if i >= args.warmup:
            runs.append({"model_s": model_s, "resrl_s": resrl_s, **{f"{k}_s": v for k, v in split.items()}})

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    report = {
        "config": {k: getattr(args, k) for k in ("layers", "vocab", "groups", "group_size", "tokens", "micro_batch",
                                                   "repeats", "warmup", "threads", "seed")} | {"hidden": HIDDEN},
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "median_forward_backward_s": median("model_s"),
        "median_resrl_s": median("resrl_s"),
        "median_basis_s": median("positive_basis_s"),
        "median_projection_s": median("residual_distance_s"),
        "runs": runs,
    }
    report["ratio_resrl_over_forward_backward"] = report["median_resrl_s"] / report["median_forward_backward_s"]
    resrl_s = report["median_resrl_s"]
    print()
    print(f"{args.groups * args.group_size} completions × {args.tokens} tokens, hidden {HIDDEN}, {args.layers} layer(s), "
          f"vocab {args.vocab} ({report['model_parameters'] / 1e6:.1f}M parameters), micro-batch {args.micro_batch}, "
          f"{args.threads} thread(s), {args.repeats} timed repeats after {args.warmup} warm-up")
    print(f"forward+backward (median): {report['median_forward_backward_s']:.3f} s")
    print(f"resrl (median): {1000 * resrl_s:.1f} ms — basis (exact/randomized) {1000 * report['median_basis_s']:.1f} ms "
          f"({100 * report['median_basis_s'] / resrl_s:.0f}%), projection {1000 * report['median_projection_s']:.1f} ms "
          f"({100 * report['median_projection_s'] / resrl_s:.0f}%)")
    print(f"ratio resrl / forward+backward: {report['ratio_resrl_over_forward_backward']:.4f} "
          f"(an upper bound at {args.layers} of 24 layers)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

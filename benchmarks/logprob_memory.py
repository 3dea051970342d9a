"""Peak CPU memory and time of one forward + backward of the policy loss at the real vocabulary:
rltk's chunked LM-head log-probs (``trainer.head_chunk_tokens``, the default) against the dense
path that builds the ``[rows, T, V]`` logits (``head_chunk_tokens: 0``, rltk's path before it).

Both variants run the same thing, :func:`rltk.trainer.logprobs.forward_logps` on a random-init
Qwen2 (``--layers`` layers, hidden ``--hidden``, vocabulary ``--vocab``, untied LM head) over
``--batch`` completions of ``--tokens`` tokens after a ``--prompt``-token prompt, then the GRPO
``ppo_clip`` per-token loss with ``token_mean`` aggregation (rltk's ``AlgorithmPipeline``, old
log-probs = the current ones detached), then ``backward``. Everything is float32, seeded.

How memory is measured (as benchmarks/kl_memory.py): each variant runs in a fresh subprocess; the
peak resident set size (``ru_maxrss``) after the backward, minus the RSS after the model and inputs
are built, is the working set the forward + backward itself needed. glibc serves tensors of this
size with ``mmap`` and returns them on free, so the RSS follows torch's live CPU tensors. The
variants also report their log-probs' sum and the LM head's gradient norm, which must agree.
Run it alone (no other torch job on the machine).

    python benchmarks/logprob_memory.py                     # V 151,936, 2 x 2,048 tokens, hidden 64
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process: peak RSS increase, seconds, and values to compare."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rltk.algos.pipeline import AlgorithmPipeline
    from rltk.algos.types import Rollouts
    from rltk.trainer.logprobs import ForwardOptions, TokenBatch, forward_logps

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=False, max_position_embeddings=args.prompt + args.tokens + 8)
    model = Qwen2ForCausalLM(config)
    g = torch.Generator().manual_seed(args.seed)
    n = args.batch
    tokens = TokenBatch(torch.randint(0, args.vocab, (n, args.prompt), generator=g),
                        torch.ones(n, args.prompt, dtype=torch.long),
                        torch.randint(0, args.vocab, (n, args.tokens), generator=g),
                        torch.ones(n, args.tokens, dtype=torch.long))
    pipeline = AlgorithmPipeline([{"name": "grpo"}], {"name": "ppo_clip"}, "token_mean", [])
    rollouts = Rollouts(group_ids=torch.zeros(n, dtype=torch.long), rewards=torch.arange(n, dtype=torch.float32),
                        correct=torch.arange(n) % 2 == 1, completion_mask=torch.ones(n, args.tokens),
                        truncated=torch.zeros(n, dtype=torch.bool))
    advantages, _ = pipeline.compute_advantages(rollouts)
    options = ForwardOptions(chunk=args.head_chunk if args.variant == "chunked" else 0)
    before_kib = _rss_kib()
    start = time.perf_counter()
    out = forward_logps(model, tokens, args.temperature, options=options)
    rollouts = Rollouts(**{**rollouts.__dict__, "old_logps": out.logps.detach()})
    per_token, _ = pipeline.per_token_loss(out.logps, rollouts, advantages)
    loss = pipeline.aggregate(per_token, rollouts.completion_mask, float(rollouts.completion_mask.sum()))
    loss.backward()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "increase_mib": (peak_kib - before_kib) / 1024, "peak_mib": peak_kib / 1024,
            "seconds": seconds, "logp_sum": float(out.logps.detach().double().sum()), "loss": float(loss),
            "lm_head_grad_norm": float(model.lm_head.weight.grad.norm()),
            "embed_grad_norm": float(model.model.embed_tokens.weight.grad.norm())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=2048, help="completion tokens per row")
    parser.add_argument("--batch", type=int, default=2, help="completions")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--head-chunk", type=int, default=1024, help="trainer.head_chunk_tokens of the chunked path")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating; medians kept")
    parser.add_argument("--variant", choices=["dense", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.variant:  # child process
        print(json.dumps(run_variant(args)))
        return 0
    passed = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
              if key not in ("variant", "json", "repeats")]
    runs: dict[str, list[dict]] = {"chunked": [], "dense": []}
    for _ in range(args.repeats):
        for variant in ("dense", "chunked"):
            out = subprocess.run([sys.executable, __file__, *passed, f"--variant={variant}"], check=True,
                                 capture_output=True, text=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def median(variant: str, key: str) -> float:
        values = sorted(r[key] for r in runs[variant])
        return values[len(values) // 2] if len(values) % 2 else sum(values[len(values) // 2 - 1 : len(values) // 2 + 1]) / 2

    print(f"policy loss forward+backward, V={args.vocab}, {args.batch}×{args.tokens} completion tokens "
          f"(+{args.prompt} prompt), H={args.hidden}, {args.layers} layer(s), head chunk {args.head_chunk}, "
          f"float32, {args.threads} thread(s), {args.repeats} run(s) each")
    print(f"{'':8}{'increase MiB':>14}{'seconds':>9}{'Σ log p':>18}{'|∇ lm_head|':>14}")
    for variant in ("dense", "chunked"):
        r = runs[variant][0]
        print(f"{variant:8}{median(variant, 'increase_mib'):>14.0f}{median(variant, 'seconds'):>9.2f}"
              f"{r['logp_sum']:>18.4f}{r['lm_head_grad_norm']:>14.6g}")
    c, d = runs["chunked"][0], runs["dense"][0]
    agree = (abs(c["logp_sum"] - d["logp_sum"]) <= 1e-6 * abs(d["logp_sum"])
             and abs(c["lm_head_grad_norm"] - d["lm_head_grad_norm"]) <= 1e-4 * d["lm_head_grad_norm"])
    report = {"memory_ratio": median("chunked", "increase_mib") / median("dense", "increase_mib"),
              "time_ratio": median("chunked", "seconds") / median("dense", "seconds"), "values_agree": agree}
    print(f"values agree: {agree}")
    print(f"ratio chunked / dense: memory {report['memory_ratio']:.3f} (target <= 0.15), "
          f"time {report['time_ratio']:.3f} (target <= 1.15)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "runs": runs, **report}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

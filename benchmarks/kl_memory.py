"""Peak CPU memory of PACED's token-level full-vocabulary KL, forward + backward: rltk's
vocabulary-chunked :func:`rltk.algos.chunked_kl.linear_kl` against a naive full-logits version.

Both variants get the same inputs: student and teacher final hidden states ``[batch · tokens, H]``
and LM-head weights ``[V, H]`` (float32, seeded), and compute Σ_rows KL(teacher ‖ student) (or the
reverse) and its gradient with respect to the student's hidden states and LM head.

* ``naive``: ``logits = h @ Wᵀ`` for both models (the teacher's under ``no_grad``), then
  ``log_softmax`` and Σ p (log p − log q) over the full vocabulary, autograd backward — what a
  distillation loss written on model logits does.
* ``chunked``: ``linear_kl`` — one streaming pass over vocabulary chunks in forward and a
  recomputing pass in backward; no ``[rows, V]`` tensor exists.

How memory is measured: each variant runs in a fresh Python subprocess, and the peak resident set
size of that process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, in KiB on Linux) is read after
the backward. glibc serves allocations of this size with ``mmap`` and returns them on free, so the
RSS follows torch's live CPU tensors; tracemalloc would see none of them. The script also reads the
RSS just after the inputs are built (``/proc/self/statm``), so it reports the peak *increase* the KL
itself causes as well as the whole-process peak. The ratio printed is chunked / naive for both; the
target is ≤ 0.25 of the naive peak. Run it alone (no other torch job on the machine).

    python benchmarks/kl_memory.py --vocab 151936 --tokens 1024 --batch 4 --hidden 896
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


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process; returns its peak RSS, RSS after the inputs, time and value."""
    import torch
    import torch.nn.functional as F

    from rltk.algos.chunked_kl import linear_kl

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    rows = args.batch * args.tokens
    h_s = torch.randn(rows, args.hidden, generator=g).requires_grad_(True)
    w_s = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).requires_grad_(True)
    h_t = torch.randn(rows, args.hidden, generator=g)
    w_t = torch.randn(args.vocab, args.hidden, generator=g) * 0.05
    inputs_kib = _rss_kib()
    start = time.perf_counter()
    if args.variant == "chunked":
        kl = linear_kl(h_s, w_s, h_t, w_t, direction=args.direction, chunk_size=args.chunk_size).sum()
    else:
        student = h_s @ w_s.T
        with torch.no_grad():
            log_t = F.log_softmax(h_t @ w_t.T, dim=-1)
        log_s = F.log_softmax(student, dim=-1)
        if args.direction == "forward":
            kl = (log_t.exp() * (log_t - log_s)).sum()
        else:
            kl = (log_s.exp() * (log_s - log_t)).sum()
    kl.backward()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "peak_mib": peak_kib / 1024, "inputs_mib": inputs_kib / 1024,
            "increase_mib": (peak_kib - inputs_kib) / 1024, "seconds": seconds, "kl_sum": float(kl),
            "grad_h_norm": float(h_s.grad.norm()), "grad_w_norm": float(w_s.grad.norm())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=896, help="hidden size of both models (Qwen2.5-0.5B: 896)")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--direction", choices=["forward", "reverse"], default="forward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.variant:  # child process
        print(json.dumps(run_variant(args)))
        return 0
    results = {}
    passed = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
              if key not in ("variant", "json")]
    for variant in ("chunked", "naive"):
        out = subprocess.run([sys.executable, __file__, *passed, f"--variant={variant}"], check=True,
                             capture_output=True, text=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    c, n = results["chunked"], results["naive"]
    print(f"KL({args.direction}) forward+backward, V={args.vocab}, {args.batch}×{args.tokens} tokens, "
          f"H={args.hidden}, chunk {args.chunk_size}, float32, {args.threads} thread(s)")
    print(f"{'':8}{'peak MiB':>10}{'inputs MiB':>12}{'increase MiB':>14}{'seconds':>9}{'Σ KL':>16}")
    for name, r in results.items():
        print(f"{name:8}{r['peak_mib']:>10.0f}{r['inputs_mib']:>12.0f}{r['increase_mib']:>14.0f}"
              f"{r['seconds']:>9.1f}{r['kl_sum']:>16.4f}")
    agree = abs(c["kl_sum"] - n["kl_sum"]) <= 1e-4 * max(1.0, abs(n["kl_sum"]))
    print(f"values agree (rel 1e-4): {agree}; grad norms h {c['grad_h_norm']:.6g} vs {n['grad_h_norm']:.6g}, "
          f"W {c['grad_w_norm']:.6g} vs {n['grad_w_norm']:.6g}")
    report = {"peak_ratio": c["peak_mib"] / n["peak_mib"], "increase_ratio": c["increase_mib"] / n["increase_mib"]}
    print(f"ratio chunked / naive: peak {report['peak_ratio']:.3f}, increase over inputs "
          f"{report['increase_ratio']:.3f} (target: peak <= 0.25)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "results": results, **report}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

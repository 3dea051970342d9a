"""Several seeds of one comparison (``rltk compare --seeds 0,1,2``): the mean of each variant's pass@k
over seeds with two 95% intervals, one for the spread over seeds and one for the sampling of the
held-out problems, and a plot of the pass@k curves with the seeds' interval as a band.

Over seeds: the mean of the per-seed values x_1 … x_S ± t_{0.975, S−1} · s / √S, s the sample
standard deviation (Student's t: with 3 seeds the half-width is 4.30 · s / √3). Over problems:
each seed's pass@k is a mean over P problems of the per-problem unbiased pass@k (Chen et al. 2021);
its standard error is sd_problems / √P; the seed mean's is √(Σ_s SE_s²) / S (seeds independent),
and the interval ± 1.96 of it. The second says how much the number would move on another draw of
problems of the same kind; the first, on another training seed (which, in rltk's built-in task, also
draws other held-out problems).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from rltk.eval.metrics import pass_at_k
from rltk.io import atomic_write_bytes

# Student's t 0.975 quantiles by degrees of freedom (a table, not scipy): 1.96 beyond 30
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}


def t_quantile(df: int) -> float:
    """t_{0.975, df}: the table's value at the largest tabulated df ≤ ``df`` (conservative), 1.96 past 30."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    if df > 30:
        return 1.96
    return T_975[max(d for d in T_975 if d <= df)]


def seed_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval over seeds); half-width 0 for a single seed."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def problem_values(per_problem: list[dict], k: int) -> list[float]:
    """Each problem's unbiased pass@k from its n samples, c correct (problems with n < k left out)."""
    return [pass_at_k(p["n"], p["c"], k) for p in per_problem if p["n"] >= k]


def problem_half_width(per_seed_problems: list[list[float]]) -> float:
    """1.96 × the standard error of the mean over seeds of each seed's mean over problems."""
    variances = [statistics.variance(v) / len(v) if len(v) > 1 else 0.0 for v in per_seed_problems]
    return 1.96 * math.sqrt(sum(variances)) / len(per_seed_problems)


def aggregate(per_seed: dict[int, dict[str, list[dict]]], ks: list[int],
              baseline: str | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """``per_seed[seed][variant]`` = that run's per-problem results (report.json's ``per_problem``) →
    ``{variant: {k: {mean, seed_half, problem_half, seeds}}}`` over the seeds that have the variant.
    With ``baseline`` (a variant), also ``diff`` and ``diff_half``: the mean over seeds of the paired
    difference variant − baseline and its 95% t half-width (the seeds that have both). Pairing takes
    out what the seeds share, the warm start above all, which dominates the spread between seeds."""
    variants = list(dict.fromkeys(v for runs in per_seed.values() for v in runs))
    seed_value = {}  # (variant, seed, k) -> that seed's pass@k
    out: dict[str, dict[int, dict[str, float]]] = {}
    for variant in variants:
        out[variant] = {}
        for k in ks:
            per_run = {seed: problem_values(runs[variant], k) for seed, runs in per_seed.items() if variant in runs}
            if not all(per_run.values()):
                continue
            seed_value.update({(variant, seed, k): statistics.fmean(v) for seed, v in per_run.items()})
            mean, seed_half = seed_interval([statistics.fmean(v) for v in per_run.values()])
            out[variant][k] = {"mean": mean, "seed_half": seed_half,
                               "problem_half": problem_half_width(list(per_run.values())),
                               "seeds": float(len(per_run))}
    if baseline is not None:
        for variant, per_k in out.items():
            for k, stats in per_k.items():
                diffs = [seed_value[(variant, s, k)] - seed_value[(baseline, s, k)] for s in per_seed
                         if (variant, s, k) in seed_value and (baseline, s, k) in seed_value]
                if diffs:
                    stats["diff"], stats["diff_half"] = seed_interval(diffs)
    return out


def format_table(stats: dict[str, dict[int, dict[str, float]]], baseline: str | None = None) -> str:
    """Markdown: one row per variant, one column per k: ``mean ± seed half-width (± problem half-width)``;
    with ``baseline``, a second table of the paired differences to it: ``diff ± half-width``."""
    ks = sorted({k for per_k in stats.values() for k in per_k})
    header = "| variant | seeds | " + " | ".join(f"pass@{k}" for k in ks) + " |"
    lines = [header, "|" + "---|" * (len(ks) + 2)]
    for variant, per_k in stats.items():
        seeds = int(max((v["seeds"] for v in per_k.values()), default=0))
        cells = [f"{per_k[k]['mean']:.3f} ± {per_k[k]['seed_half']:.3f} (± {per_k[k]['problem_half']:.3f})"
                 if k in per_k else "" for k in ks]
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + " |")
    if baseline is not None:
        lines += ["", f"Paired difference to {baseline} (mean over seeds ± 95% t interval):", "", header,
                  "|" + "---|" * (len(ks) + 2)]
        for variant, per_k in stats.items():
            if variant == baseline:
                continue
            seeds = int(max((v["seeds"] for v in per_k.values()), default=0))
            cells = [f"{per_k[k]['diff']:+.3f} ± {per_k[k]['diff_half']:.3f}" if "diff" in per_k.get(k, {}) else ""
                     for k in ks]
            lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_report(run_dir: Path) -> dict:
    """The held-out report at the end of a finished run (``result.json``'s final checkpoint's step)."""
    result = json.loads((run_dir / "result.json").read_text())
    step = Path(result["final_checkpoint"]).name  # step-000400
    return json.loads((run_dir / "eval" / step / "report.json").read_text())


def start_report(run_dir: Path) -> dict:
    """The report of the warm start, evaluated by the run before its first step."""
    return json.loads((run_dir / "eval" / f"step-{0:06d}" / "report.json").read_text())


def write_seed_comparison(out: Path, stats: dict[str, dict[int, dict[str, float]]], title: str,
                          seeds: list[int], baseline: str | None = None) -> str:
    """``comparison.md`` (the table, the intervals explained) and ``comparison.png`` (mean pass@k
    against k, the seeds' 95% interval as a band) under ``out``; with ``baseline``, also
    ``comparison_diff.png``: each variant's paired difference to it against k, with its 95% t
    interval as a band (readable where the seeds' own spread hides the differences); returns the table."""
    from rltk.eval.report import plot_curves

    table = format_table(stats, baseline)
    note = (f"Mean over seeds {', '.join(map(str, seeds))} ± the 95% t interval over seeds "
            "(± the 95% interval over held-out problems); docs/evaluation.md, \"Several seeds\".")
    out.mkdir(parents=True, exist_ok=True)
    curves, bands = _curves_with_bands(stats, "mean", "seed_half")
    figures = "![pass@k](comparison.png)\n"
    atomic_write_bytes(out / "comparison.png", plot_curves(curves, title, bands=bands))
    diffs = {v: {k: s for k, s in per_k.items() if "diff" in s} for v, per_k in stats.items() if v != baseline}
    diffs = {v: per_k for v, per_k in diffs.items() if per_k}  # only with a baseline do stats hold a diff
    if diffs:
        curves, bands = _curves_with_bands(diffs, "diff", "diff_half")
        atomic_write_bytes(out / "comparison_diff.png", plot_curves(
            curves, f"paired difference to {baseline}", ylabel=f"pass@k − {baseline}", bands=bands))
        figures += f"\n![pass@k − {baseline}](comparison_diff.png)\n"
    atomic_write_bytes(out / "comparison.md", f"# {title}\n\n{note}\n\n{table}\n\n{figures}".encode())
    atomic_write_bytes(out / "comparison.json", json.dumps({"seeds": seeds, "stats": stats}, indent=2).encode())
    return table


def _curves_with_bands(stats: dict[str, dict[int, dict[str, float]]], centre: str, half: str):
    """Per variant, the curve k -> ``stats[centre]`` and its band k -> centre ± ``stats[half]``."""
    curves = {v: {k: s[centre] for k, s in per_k.items()} for v, per_k in stats.items()}
    bands = {v: {k: (s[centre] - s[half], s[centre] + s[half]) for k, s in per_k.items()} for v, per_k in stats.items()}
    return curves, bands

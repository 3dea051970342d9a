"""Evaluation reports: ``report.json``/``report.md``/``passk.png`` per run, and comparisons.

Every file is written atomically (a temp file in the same directory, then :func:`os.replace`), so
an interrupted write never leaves a half-written report or clobbers the previous one. Plots use
matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rltk.io import atomic_write_bytes

__all__ = ["PROTOCOL_KEYS", "format_passk_table", "write_comparison", "write_report"]

PROTOCOL_KEYS = (
    "n",
    "temperature",
    "top_p",
    "max_new_tokens",
    "template",
    "verifier_version",
    "truncation_rate",
    "no_answer_rate",
    "model",
    "num_problems",
    "seed",
    "maj_method",
)
"""What every report records about how it was measured (docs/algorithms/reference.md §9)."""


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"report value of type {type(obj).__name__} is not JSON serializable")


def _curve(summary: dict, metric: str) -> dict[int, float]:
    """``summary[metric]`` with int keys (JSON turns them into strings), sorted by k."""
    return dict(sorted((int(k), float(v)) for k, v in summary.get(metric, {}).items()))


def _cell(value: object) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def format_passk_table(reports: dict[str, dict], metrics: Iterable[str] = ("pass@k",)) -> str:
    """Markdown table: one row per report (name -> report dict with a ``summary``), one column
    per metric and k present in any report (``pass@1``, ``pass@2``, ..., then ``maj@1``, ...)."""
    curves = {name: {m: _curve(r["summary"], m) for m in metrics} for name, r in reports.items()}
    columns = [
        (m, k) for m in metrics for k in sorted({k for c in curves.values() for k in c[m]})
    ]
    header = ["variant"] + [m.replace("@k", f"@{k}") for m, k in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, c in curves.items():
        cells = [_cell(name)] + [f"{c[m][k]:.3f}" if k in c[m] else "" for m, k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, dict[int, float]], title: str, *, xlabel: str = "k", ylabel: str = "accuracy",
                log_x: bool = True, bands: dict[str, dict[int, tuple[float, float]]] | None = None) -> bytes:
    """PNG of one curve per label (x -> y); by default pass@k against k on a log2 axis; ``bands``
    (label -> x -> (low, high)) are shaded around their curves."""
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ks = sorted({k for c in curves.values() for k in c})
    for label, c in curves.items():
        line, = ax.plot(list(c), list(c.values()), marker="o", label=label)
        band = (bands or {}).get(label)
        if band:
            xs = sorted(band)
            ax.fill_between(xs, [band[x][0] for x in xs], [band[x][1] for x in xs], color=line.get_color(), alpha=0.2)
    if log_x:
        ax.set_xscale("log", base=2)
        if ks:
            ax.set_xticks(ks, [str(k) for k in ks])
    low, high = y_limits(curves, bands)
    ax.set_ylim(low, high)
    if low < 0:  # differences: mark zero
        ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def y_limits(curves: dict[str, dict[int, float]], bands: dict[str, dict[int, tuple[float, float]]] | None = None
             ) -> tuple[float, float]:
    """The y range of :func:`plot_curves`: from 0 to a little above the highest value, within [0, 1.02]
    (accuracies); when a value or band goes below 0 (paired differences), from 1.15 × the lowest to
    1.15 × the highest, 0 included, so every band is drawn whole."""
    values = [y for c in curves.values() for y in c.values()]
    values += [y for b in (bands or {}).values() for pair in b.values() for y in pair]
    low, top = min(values, default=0.0), max(values, default=1.0)
    if low >= 0:
        return 0.0, min(1.02, max(0.05, 1.15 * top))
    return 1.15 * low, 1.15 * top if top > 0 else 0.05 * -low


def _report_markdown(report: dict, name: str) -> str:
    protocol, summary = report["protocol"], report["summary"]
    rows = "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in protocol.items())
    table = format_passk_table({name: report}, metrics=("pass@k", "maj@k"))
    return (
        f"# Evaluation report: {name}\n\n## Protocol\n\n| key | value |\n|---|---|\n{rows}\n\n"
        f"## Results\n\navg@n = {summary['avg@n']:.4f} over {protocol['num_problems']} problems\n\n"
        f"{table}\n\n![pass@k](passk.png)\n"
    )


def write_report(out_dir, *, summary: dict, protocol: dict, per_problem: list[dict]) -> dict:
    """Write ``report.json``, ``report.md`` and ``passk.png`` under ``out_dir``; return the report.

    ``summary`` comes from :func:`rltk.eval.metrics.summarize`; ``protocol`` must hold every key
    of :data:`PROTOCOL_KEYS` (more are kept); ``per_problem`` is stored as given.
    """
    missing = [k for k in PROTOCOL_KEYS if k not in protocol]
    if missing:
        raise ValueError(f"report protocol is missing {missing}")
    report = {"summary": summary, "protocol": protocol, "per_problem": per_problem}
    text = json.dumps(report, indent=2, default=_json_default)  # fails before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = str(protocol["model"])
    curves = {m: _curve(summary, m) for m in ("pass@k", "maj@k") if m in summary}
    atomic_write_bytes(out / "report.json", text.encode())
    atomic_write_bytes(out / "report.md", _report_markdown(report, name).encode())
    atomic_write_bytes(out / "passk.png", plot_curves(curves, name))
    return report


def write_learning_curves(out_dir, curves: dict[str, dict[int, float]], title: str, metric: str) -> str:
    """``learning_curve.png`` (held-out ``metric`` against step, one curve per variant) and a
    Markdown table of the same numbers, which is returned."""
    steps = sorted({step for c in curves.values() for step in c})
    lines = ["| variant | " + " | ".join(f"step {s}" for s in steps) + " |", "|" + "---|" * (len(steps) + 1)]
    for name, c in curves.items():
        lines.append(f"| {_cell(name)} | " + " | ".join(f"{c[s]:.3f}" if s in c else "" for s in steps) + " |")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "learning_curve.png",
                       plot_curves(curves, title, xlabel="step", ylabel=metric, log_x=False))
    return "\n".join(lines)


def write_comparison(out_dir, reports: dict[str, dict], title: str) -> str:
    """Write ``comparison.md`` (pass@k table, one row per variant) and ``comparison.png`` (one
    pass@k curve per variant) under ``out_dir``; return the Markdown table."""
    if not reports:
        raise ValueError("write_comparison needs at least one report")
    table = format_passk_table(reports)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: _curve(r["summary"], "pass@k") for name, r in reports.items()}
    atomic_write_bytes(out / "comparison.md", f"# {title}\n\n{table}\n\n![pass@k](comparison.png)\n".encode())
    atomic_write_bytes(out / "comparison.png", plot_curves(curves, title))
    return table

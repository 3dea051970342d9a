"""Evaluation: pass@k / avg@n / maj@k metrics and reports."""

from rltk.eval.metrics import avg_at_n, default_ks, maj_at_k, maj_method, pass_at_k, summarize
from rltk.eval.report import PROTOCOL_KEYS, format_passk_table, write_comparison, write_report

__all__ = [
    "PROTOCOL_KEYS",
    "avg_at_n",
    "default_ks",
    "format_passk_table",
    "maj_at_k",
    "maj_method",
    "pass_at_k",
    "summarize",
    "write_comparison",
    "write_report",
]

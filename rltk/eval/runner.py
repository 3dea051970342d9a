"""Sample n completions per held-out problem, verify them, and report pass@k / avg@n / maj@k.

Problems are sharded over processes and the per-problem counts gathered on the main process,
which writes ``report.json``, ``report.md``, ``passk.png`` and ``samples.jsonl``
(docs/algorithms/reference.md §9). Sampling is seeded inside a forked RNG, so evaluating never changes the
training run's random stream and the same seed gives the same numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rltk.data.loaders import Example
from rltk.eval.metrics import default_ks, summarize
from rltk.eval.report import write_report
from rltk.io import atomic_write_text
from rltk.engines.base import SamplingParams, rank_shard


@dataclass(frozen=True)
class EvalSettings:
    n: int = 16
    ks: tuple[int, ...] | None = None
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32
    batch_size: int = 512  # completions per generation call
    maj: bool = True
    seed: int = 0


def evaluate(engine, examples: list[Example], prompts: list[str], verifier, settings: EvalSettings, *,
             accelerator=None, out_dir: str | Path | None = None, protocol: dict[str, Any] | None = None,
             progress: bool = True, save_samples: bool = True) -> dict[str, Any]:
    """Evaluate and (when ``out_dir``) write the report files; returns the report dict on every rank."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shard, padding = rank_shard(engine, list(range(len(examples))), rank, world)  # padded for vLLM server mode
    per_problem, samples = _evaluate_shard(engine, [examples[i] for i in shard], [prompts[i] for i in shard],
                                           verifier, settings, progress and rank == 0)
    if padding:
        per_problem, samples = per_problem[:-padding], samples[: len(samples) - padding * settings.n]
    if world > 1:
        from accelerate.utils import gather_object

        per_problem, samples = gather_object(per_problem), gather_object(samples)
    ks = list(settings.ks or default_ks(settings.n))
    summary = summarize(per_problem, ks, seed=settings.seed)
    n_total = max(1, len(samples))
    full_protocol = {
        "n": settings.n,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed,
        "num_problems": len(per_problem),
        "verifier_version": getattr(verifier, "version", None) or _verifier_version(),
        "truncation_rate": sum(s["truncated"] for s in samples) / n_total,
        "no_answer_rate": sum(s["reason"] == "no_answer" for s in samples) / n_total,
        "timeout_rate": sum(s["reason"] == "timeout" for s in samples) / n_total,
        "maj_method": summary.get("maj_method"),
        **(protocol or {}),
    }
    report = {"summary": summary, "protocol": full_protocol, "per_problem": per_problem}
    if out_dir is not None and (accelerator is None or accelerator.is_main_process):
        report = write_report(out_dir, summary=summary, protocol=full_protocol, per_problem=per_problem)
        if save_samples:
            atomic_write_text(Path(out_dir) / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    return report


def _verifier_version() -> str:
    from rewards.math import VERIFIER_VERSION

    return VERIFIER_VERSION


def _evaluate_shard(engine, examples, prompts, verifier, settings: EvalSettings, progress: bool):
    params = SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                            max_new_tokens=settings.max_new_tokens)
    per_chunk = max(1, settings.batch_size // settings.n)
    per_problem, samples = [], []
    bar = tqdm(total=len(examples), desc="eval", unit="problem", disable=not progress, dynamic_ncols=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for start in range(0, len(examples), per_chunk):
            chunk = examples[start : start + per_chunk]
            generation = engine.generate(prompts[start : start + per_chunk], params)
            answers = [e.answer for e in chunk for _ in range(settings.n)]
            verdicts = verifier.score(generation.texts, answers)
            for j, example in enumerate(chunk):
                rows = range(j * settings.n, (j + 1) * settings.n)
                entry = _problem_entry(example, [verdicts[r] for r in rows], verifier, settings.maj)
                per_problem.append(entry)
                samples.extend(
                    {"id": example.id, "prompt": prompts[start + j], "answer": example.answer,
                     "completion": generation.texts[r], "extracted": verdicts[r].extracted,
                     "correct": verdicts[r].correct, "reason": verdicts[r].reason,
                     "truncated": bool(generation.truncated[r])}
                    for r in rows
                )
            bar.update(len(chunk))
    bar.close()
    return per_problem, samples


def _problem_entry(example: Example, verdicts, verifier, maj: bool) -> dict[str, Any]:
    correct = [v.correct for v in verdicts]
    entry = {"id": example.id, "n": len(verdicts), "c": sum(correct), "correct": correct}
    if maj:
        entry["classes"] = verifier.equivalence_classes([v.extracted for v in verdicts])
    return entry

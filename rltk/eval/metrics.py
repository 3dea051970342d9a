"""pass@k, avg@n and maj@k from n sampled answers per problem (docs/algorithms/reference.md §9). Pure functions."""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Sequence

import numpy as np

__all__ = ["avg_at_n", "default_ks", "maj_at_k", "maj_method", "pass_at_k", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct.

    Chen et al. 2021, "Evaluating Large Language Models Trained on Code", Eq. 1:
    1 - C(n-c, k) / C(n, k), computed stably as 1 - prod_{i=n-c+1..n} (1 - k/i); 1.0 when n - c < k.
    """
    if min(n, c, k) < 0 or k < 1 or k > n or c > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_n(correct: Sequence[bool]) -> float:
    """Mean correctness over the n samples of one problem (the pass@1 estimate)."""
    if len(correct) == 0:
        raise ValueError("avg@n needs at least one sample")
    return sum(map(bool, correct)) / len(correct)


@functools.lru_cache(maxsize=64)
def _subsets(n: int, k: int, exact_limit: int, num_subsets: int, seed: int) -> np.ndarray:
    """All k-subsets of range(n) when C(n, k) <= exact_limit, else ``num_subsets`` seeded random
    ones; each row sorted ascending (the samples' original order). Cached, hence read-only."""
    if math.comb(n, k) <= exact_limit:
        rows = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    else:
        rng = random.Random(seed)
        rows = np.array([sorted(rng.sample(range(n), k)) for _ in range(num_subsets)], dtype=np.int64)
    rows.flags.writeable = False
    return rows


def _majority_correct(labels: np.ndarray, correct: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """Per subset: is the majority answer correct? ``labels`` are 0..m-1, -1 for no answer."""
    m = int(labels.max()) + 1
    if m == 0:
        return np.zeros(len(subsets), dtype=bool)
    k = subsets.shape[1]
    votes = labels[subsets]  # (s, k): the class of each vote, in original order
    is_class = votes[:, :, None] == np.arange(m)  # (s, k, m)
    counts = is_class.sum(axis=1)
    first = np.where(is_class, np.arange(k)[None, :, None], k).min(axis=1)
    # Most votes wins; among equal counts the class seen first. (k + 1) * count dominates first.
    winner = np.argmax((k + 1) * counts - first, axis=1)
    winner_pos = first[np.arange(len(subsets)), winner]
    has_answer = counts.max(axis=1) > 0
    return has_answer & correct[subsets[np.arange(len(subsets)), np.minimum(winner_pos, k - 1)]]


def maj_at_k(
    classes: Sequence[int | None],
    correct: Sequence[bool],
    k: int,
    *,
    exact_limit: int = 5000,
    num_subsets: int = 2000,
    seed: int = 0,
) -> float:
    """Majority-vote accuracy with k of the n samples of one problem.

    ``classes[i]`` is the id of sample i's answer up to mathematical equivalence (the caller groups
    answers) or None when it has no answer; ``correct[i]`` is whether it matches the gold answer.
    In a k-subset the class with most votes wins, ties going to the class that occurs first in the
    samples' original order; None never wins, and a subset with no answers at all is incorrect.
    The winner is scored by the correctness of its first sample in the subset. With n > k the
    result is the expectation over k-subsets: exact over all C(n, k) of them when that is at most
    ``exact_limit``, otherwise the mean over ``num_subsets`` random subsets drawn with ``seed``.
    """
    n = len(classes)
    if len(correct) != n:
        raise ValueError(f"classes and correct differ in length: {n} vs {len(correct)}")
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n; got k={k}, n={n}")
    ids: dict[int, int] = {}
    labels = np.array([-1 if c is None else ids.setdefault(c, len(ids)) for c in classes], dtype=np.int64)
    subsets = _subsets(n, k, exact_limit, num_subsets, seed)
    return float(_majority_correct(labels, np.asarray(correct, dtype=bool), subsets).mean())


def maj_method(exact_limit: int = 5000, num_subsets: int = 2000, seed: int = 0) -> str:
    """One line describing how :func:`maj_at_k` averages over subsets (for report protocols)."""
    return (
        f"majority vote over equivalence classes, ties to first occurrence; expectation over all "
        f"k-subsets when C(n,k) <= {exact_limit}, else mean of {num_subsets} random subsets (seed {seed})"
    )


def default_ks(n: int) -> list[int]:
    """Powers of two up to ``n``, plus ``n`` itself when it is not a power of two."""
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def summarize(per_problem: Sequence[dict], ks: Sequence[int], *, seed: int = 0) -> dict:
    """Mean metrics over problems.

    Each entry has ``n`` (samples) and ``c`` (correct ones), and optionally ``classes`` and
    ``correct`` (length n, see :func:`maj_at_k`). Returns ``{"num_problems", "pass@k": {k: mean},
    "avg@n": mean c/n}``, plus ``"maj@k": {k: mean}`` and ``"maj_method"`` when every entry has
    ``classes``. Every k must be at most every problem's n.
    """
    if not per_problem:
        raise ValueError("summarize needs at least one problem")
    small = min(p["n"] for p in per_problem)
    if any(k > small for k in ks):
        raise ValueError(f"every k must be <= n; got ks={list(ks)} with a problem of n={small}")
    summary: dict = {
        "num_problems": len(per_problem),
        "pass@k": {k: float(np.mean([pass_at_k(p["n"], p["c"], k) for p in per_problem])) for k in ks},
        "avg@n": float(np.mean([p["c"] / p["n"] for p in per_problem])),
    }
    if all("classes" in p for p in per_problem):
        summary["maj@k"] = {
            k: float(np.mean([maj_at_k(p["classes"], p["correct"], k, seed=seed) for p in per_problem]))
            for k in ks
        }
        summary["maj_method"] = maj_method(seed=seed)
    return summary


def logged_metrics(summary: dict) -> dict[str, float]:
    """An evaluation summary as the training metrics log names it: ``eval/pass@k`` and ``eval/avg@n``."""
    out = {f"eval/pass@{k}": v for k, v in summary["pass@k"].items()}
    out["eval/avg@n"] = summary["avg@n"]
    return out

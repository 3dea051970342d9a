"""rltk.eval.metrics: docs/algorithms/reference.md §9 vectors and hand-computed maj@k cases."""

import itertools
import math

import pytest

from rltk.eval.metrics import avg_at_n, default_ks, maj_at_k, maj_method, pass_at_k, summarize


@pytest.mark.parametrize(
    "n, c, k, expected",
    [(16, 3, 4, 0.607143), (16, 3, 1, 0.1875), (16, 0, 8, 0.0), (16, 14, 4, 1.0), (256, 1, 128, 0.5)],
)
def test_pass_at_k_vectors(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-6)


def test_pass_at_k_equals_the_binomial_form():
    for n, c, k in itertools.product(range(1, 12), range(12), range(1, 12)):
        if c <= n and k <= n:
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (4, 5, 1), (4, -1, 1), (-1, 0, 1), (4, 1, 0)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_n():
    assert avg_at_n([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        avg_at_n([])


def test_maj_at_k_single_vote_and_full_set():
    classes, correct = [0, 1, 1, None], [True, False, False, False]
    assert maj_at_k(classes, correct, 4) == 0.0  # class 1 has two votes
    assert maj_at_k(classes, correct, 1) == pytest.approx(0.25)  # = avg@n
    assert maj_at_k([None, None], [False, False], 2) == 0.0  # nothing to vote for
    assert maj_at_k([None, 3], [False, True], 2) == 1.0  # None never wins


def test_maj_at_k_ties_go_to_first_occurrence():
    assert maj_at_k([7, 9], [True, False], 2) == 1.0
    assert maj_at_k([9, 7], [False, True], 2) == 0.0
    # Subsets of size 2 from [A, B, B]: {A,B} tie -> A (x2), {B,B} -> B: 2/3 correct.
    assert maj_at_k(["A", "B", "B"], [True, False, False], 2) == pytest.approx(2 / 3)
    # Subsets of size 3 from [B, A, A, B]: {B,A,A} A, {B,A,B} B, {B,A,B} B, {A,A,B} A: 2/4.
    assert maj_at_k(["B", "A", "A", "B"], [False, True, True, False], 3) == pytest.approx(0.5)


def test_maj_at_k_uses_exact_expectation_or_seeded_subsets():
    classes = [0, 1, 1, 2, 0, 0, 1, 2, 2, 2, None, 0]
    correct = [c == 0 for c in classes]
    exact = maj_at_k(classes, correct, 6)  # C(12, 6) = 924 <= 5000: exact
    estimate = maj_at_k(classes, correct, 6, exact_limit=10, num_subsets=4000, seed=1)
    assert estimate == maj_at_k(classes, correct, 6, exact_limit=10, num_subsets=4000, seed=1)
    assert estimate == pytest.approx(exact, abs=0.03)
    assert estimate != exact
    assert "4000" in maj_method(num_subsets=4000) and "seed 0" in maj_method()


def test_maj_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="length"):
        maj_at_k([1, 2], [True], 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        maj_at_k([1, 2], [True, False], 3)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError):
        default_ks(0)


def test_summarize_means_over_problems():
    per_problem = [
        {"n": 4, "c": 1, "classes": [0, 1, 1, None], "correct": [True, False, False, False]},
        {"n": 4, "c": 4, "classes": [5, 5, 5, 5], "correct": [True] * 4},
    ]
    s = summarize(per_problem, [1, 2, 4])
    assert s["num_problems"] == 2
    assert s["pass@k"] == pytest.approx({1: (0.25 + 1) / 2, 2: (0.5 + 1) / 2, 4: 1.0})
    assert s["avg@n"] == pytest.approx(0.625)
    # problem 1, k=2: pairs with A first win only {A,B} twice and {A,None}: 3/6
    assert s["maj@k"] == pytest.approx({1: 0.625, 2: (0.5 + 1) / 2, 4: 0.5})
    assert "maj_method" in s
    without = summarize([{"n": 4, "c": 1}], [1])
    assert set(without) == {"num_problems", "pass@k", "avg@n"}
    with pytest.raises(ValueError, match="k must be <= n"):
        summarize(per_problem, [8])

"""A pool of long-lived worker processes that run math-verify under a hard per-item deadline.

Why processes (docs/algorithms/reference.md §9.1, math-verify 0.9.0): its own timeouts use ``signal.alarm``, which
works only in the main thread and cannot interrupt C-level big-integer work (one nested-exponent
answer ran > 30 s despite a 5 s timeout, its issue #65), and its ``TimeoutException`` subclasses
``BaseException``. So the workers run math-verify with its timeouts off (``parsing_timeout=None``,
``timeout_seconds=None``) and the parent enforces the deadline: a worker that overruns is killed
(SIGKILL), its item is scored ``timeout`` and a fresh worker replaces it while the rest of the batch
goes on on the others.

Each pair is judged by :func:`check_pair` (rules in its docstring): math-verify must read the whole
answer as LaTeX, a predicted equation counts only as ``variable = value``, and a set never equals
a tuple or interval.

Workers use the ``spawn`` start method, safe from any thread and with torch loaded in the parent
(no forked locks or CUDA state; the global forkserver settings are left alone). As with any spawn
user (torch DataLoader workers, vLLM), a script that uses the pool must keep its top-level code
under ``if __name__ == "__main__":``, since each worker re-imports the main module. Model text
reaches math-verify (ANTLR grammar, never Python ``eval``) only inside the workers.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

__all__ = ["REASONS", "VerifierPool", "check_pair", "default_num_workers"]

REASONS = ("ok", "no_answer", "timeout", "parse_error")
"""Why an item got its score: verified by math-verify or the fast path (``ok``, right or wrong),
no extractable answer, deadline overrun, or gold or prediction could not be read or was refused
(:func:`check_pair`: a nested box, an equation that is not ``variable = value``, ...)."""

_CACHEABLE_CHARS = 4096  # longer (gold, pred) pairs are verified but not cached

log = logging.getLogger(__name__)


def default_num_workers() -> int:
    """``min(4, os.cpu_count())``."""
    return min(4, os.cpu_count() or 1)


# --------------------------------------------------------------------------- worker side


@functools.cache
def extraction_config(strict: bool) -> tuple:
    """math-verify's LaTeX extraction only. Its plain-expression extractor is left out on purpose:
    it reads any number *inside* an answer that the LaTeX parser rejects, so ``1+1 \\to 4``,
    ``\\foo 4`` and ``2**10`` would read as 4, 4 and 2, and ``0.\\overline{3}`` as 0; without it
    such an answer is a ``parse_error``. ``strict`` turns off math-verify's ``malformed_operators``
    repair, as open-r1's reward does: ``\\frac12`` and ``\\sqrt2`` (valid TeX) then fail to parse
    and ``\\frac 1 2`` reads as 2."""
    from math_verify import LatexExtractionConfig, LatexNormalizationConfig

    normalization = LatexNormalizationConfig(
        basic_latex=True,
        units=True,
        malformed_operators=not strict,
        nits=True,
        boxed="all",
        equations=False,
    )
    return (LatexExtractionConfig(normalization_config=normalization),)


@functools.lru_cache(maxsize=1024)
def _parse(answer: str, strict: bool) -> tuple:
    """Parsed sympy objects of a bare answer (wrapped in ``$...$``, so the whole answer is read);
    empty when math-verify reads nothing. Cached: the gold of a group is parsed once per worker."""
    from math_verify import parse

    parsed = parse(
        f"${answer}$",
        extraction_config=extraction_config(strict),
        fallback_mode="no_fallback",
        parsing_timeout=None,
    )
    return tuple(parsed)


def _names_a_value(lhs, rhs) -> bool:
    """Whether ``lhs = rhs`` gives a name to a value, so that only ``rhs`` is claimed: ``lhs`` is a
    single variable (``x``, ``x_1``, ``\\alpha``, ``\\text{area}``; not a constant such as ``\\pi``,
    ``e`` or ``i``), a tuple of distinct variables (``(x, y)``) or an unknown function applied to
    something (``f(x)``, ``f(2)``; not ``\\sin x``), and ``rhs`` does not contain it
    (``x = x + 1`` is a claim, not a name)."""
    from sympy import Symbol, Tuple
    from sympy.core.function import AppliedUndef

    if isinstance(lhs, Symbol):
        return lhs not in rhs.free_symbols
    if isinstance(lhs, AppliedUndef):
        return not rhs.has(lhs.func)
    return (
        isinstance(lhs, Tuple)
        and len(lhs) > 0
        and all(isinstance(item, Symbol) for item in lhs)
        and len(set(lhs)) == len(lhs)
        and not (set(lhs) & rhs.free_symbols)
    )


def _equations_allowed(pred, gold_is_equation: bool) -> bool:
    """Whether the equations in a parsed prediction may be scored (:func:`check_pair`).

    Allowed places for an equation: the whole answer, or an element of a top-level list, set or
    tuple (``x = 1, y = 2``). An equation anywhere else (inside a side of another equation, a chain
    ``x = 1+1 = 4``, which math-verify cuts to its ends, an expression) is refused. Unless the
    gold is an equation too, each equation must name a value (:func:`_names_a_value`).
    """
    from sympy import Basic, Equality, FiniteSet, Tuple, preorder_traversal

    if not isinstance(pred, Basic):
        return True  # matrices, strings: math-verify decides
    equations = [node for node in preorder_traversal(pred) if isinstance(node, Equality)]
    if not equations:
        return True
    if isinstance(pred, Equality):
        placed = [pred]
    elif isinstance(pred, (FiniteSet, Tuple)):
        placed = [item for item in pred.args if isinstance(item, Equality)]
    else:
        placed = []
    if len(equations) != len(placed):
        return False
    if gold_is_equation:
        return True
    return all(_names_a_value(eq.lhs, eq.rhs) for eq in placed)


def _has_equation(expr) -> bool:
    from sympy import Basic, Equality

    try:
        return isinstance(expr, Basic) and expr.has(Equality)
    except Exception:  # noqa: BLE001 - sympy on odd objects
        return False


def _value(expr, other_is_equation: bool):
    """What math-verify compares of ``expr``: the right side of an equation when the other answer
    is not an equation, else ``expr``."""
    from sympy import Equality

    return expr.rhs if isinstance(expr, Equality) and not other_is_equation else expr


def _collection_kind(expr) -> str | None:
    """``"set"`` for a set of values (``2,3`` and ``\\{2,3\\}`` both parse to one), ``"ordered"``
    for a tuple or an interval (``(2,3)``, ``[2,3)``, ``(1,2,3)``), else ``None``. A list of
    equations (``x = 1, y = 2``) is not a set of values: math-verify matches it in written order."""
    from sympy import Equality, FiniteSet, Interval, Tuple

    if isinstance(expr, FiniteSet):
        if expr.args and all(isinstance(item, Equality) for item in expr.args):
            return None
        return "set"
    if isinstance(expr, (Interval, Tuple)):
        return "ordered"
    return None


def check_pair(gold: str, pred: str, strict: bool = False) -> tuple[bool, str]:
    """Verify one cleaned (gold, pred) pair with math-verify, gold first (``verify`` is asymmetric).

    Runs inside a worker: no timeout here, the parent kills an overrunning worker. Returns
    ``(correct, "ok")``, or ``(False, "parse_error")`` when either side is refused, parses to
    nothing or holds an equation that may not be scored. Rules, on top of math-verify:

    - refused strings (:func:`rewards.extract.refusal`: a box inside the answer, ``\\approx``,
      out-of-range numbers) are ``parse_error``;
    - the whole answer must parse as LaTeX (:func:`extraction_config`): no partial reads;
    - equations (:func:`_equations_allowed`): when the gold is not an equation, a predicted
      equation counts only as ``variable = value`` and its value is compared (``x = 4`` and
      ``f(2) = 4`` are 4); ``1+1 = 4``, ``4 = 4``, ``2x = 4``, ``\\pi = 4``, ``\\sin x = 4``,
      ``x = 1+1 = 4`` are ``parse_error``. When the gold is an equation, math-verify compares the
      two equations (``x = 4`` is not ``y = 4``; ``y = 2x+1`` is ``2x+1 = y``), chains and
      buried equations still refused;
    - a set of values never equals a tuple or interval (:func:`_collection_kind`): ``2,3`` is not
      ``(2,3)``, either way round, nor is ``x = 2,3``. math-verify equates them, reading ``(2,3)`` as an open interval
      that "could be" the pair, although its own strict mode says sets are not comparable with
      tuples.
    """
    from math_verify import verify

    from rewards.extract import refusal

    try:
        if refusal(gold) or refusal(pred):
            return False, "parse_error"
        gold_parsed, pred_parsed = _parse(gold, strict), _parse(pred, strict)
        if not gold_parsed or not pred_parsed:
            return False, "parse_error"
        gold_is_equation = any(_has_equation(item) for item in gold_parsed)
        if not all(_equations_allowed(item, gold_is_equation) for item in pred_parsed):
            return False, "parse_error"
        # compare the kinds of what math-verify will compare: an assignment's value when the
        # other side is not an equation (``x = 2,3`` against ``(2,3)``)
        pred_is_equation = any(_has_equation(item) for item in pred_parsed)
        gold_kinds = {_collection_kind(_value(item, pred_is_equation)) for item in gold_parsed}
        pred_kinds = {_collection_kind(_value(item, gold_is_equation)) for item in pred_parsed}
        if ("set" in gold_kinds and "ordered" in pred_kinds) or (
            "ordered" in gold_kinds and "set" in pred_kinds
        ):
            return False, "ok"
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None)), "ok"
    except Exception:  # math-verify swallows its own errors; anything else is a parse failure
        return False, "parse_error"


def _worker_main(conn: Connection, strict: bool) -> None:
    """Worker loop: warm up, say ``("ready",)``, then answer (gold, pred) with (correct, reason)
    until ``None`` or EOF. Ctrl-C is left to the parent, which closes the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings
    try:
        check_pair("1", "1", strict)  # imports math-verify, sympy and the ANTLR parser
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("failed", repr(err)))
        return
    conn.send(("ready",))
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        conn.send(check_pair(*item, strict))


# --------------------------------------------------------------------------- parent side


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    ready: bool = False
    job: int | None = None  # index of the item it is verifying
    deadline: float = 0.0

    def stop(self, kill: bool) -> None:
        """Ask to exit (or SIGKILL), then reap the process and close the pipe."""
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.process.join(timeout=None if kill else 2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop(kill=worker.job is not None)
    workers.clear()


class VerifierPool:
    """Long-lived math-verify workers with a per-item deadline and a parent-side verdict cache.

    Usable as a context manager; otherwise started lazily by the first :meth:`verify` and closed
    at interpreter exit (or when garbage-collected). Thread-safe: one batch runs at a time.

    Args:
        num_workers: worker processes; default ``min(4, os.cpu_count())``.
        deadline_s: wall-clock seconds one item may take in a worker before it is killed.
        strict: math-verify's strict normalisation (see :func:`extraction_config`).
        cache_size: verdicts kept for repeated (gold, pred) pairs (LRU).
    """

    def __init__(
        self,
        num_workers: int | None = None,
        deadline_s: float = 5.0,
        strict: bool = False,
        cache_size: int = 65536,
    ) -> None:
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.deadline_s = deadline_s
        self.strict = strict
        self.cache_size = cache_size
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._cache: OrderedDict[tuple[str, str], tuple[bool, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None

    def __enter__(self) -> VerifierPool:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def num_alive(self) -> int:
        """Worker processes now alive (0 before start and after close)."""
        return sum(worker.process.is_alive() for worker in self._workers)

    def start(self) -> None:
        """Start the workers (they warm up in the background); a no-op when running."""
        with self._lock:
            self._ensure_started()

    def close(self) -> None:
        """Stop the workers. A later :meth:`verify` starts new ones."""
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()

    def verify(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[bool, str]]:
        """``(correct, reason)`` for each (gold, pred) pair, in order; reason is ``ok``,
        ``timeout`` or ``parse_error``. Repeated pairs are verified once."""
        with self._lock:
            verdicts = {pair: self._cached(pair) for pair in pairs}
            todo = [pair for pair, verdict in verdicts.items() if verdict is None]
            if todo:
                self._ensure_started()
                for pair, verdict in zip(todo, self._run(todo)):
                    verdicts[pair] = verdict
                    self._remember(pair, verdict)
            return [verdicts[pair] for pair in pairs]

    # -- cache

    def _cached(self, pair: tuple[str, str]) -> tuple[bool, str] | None:
        verdict = self._cache.get(pair)
        if verdict is not None:
            self._cache.move_to_end(pair)
        return verdict

    def _remember(self, pair: tuple[str, str], verdict: tuple[bool, str]) -> None:
        if len(pair[0]) + len(pair[1]) > _CACHEABLE_CHARS or self.cache_size <= 0:
            return
        self._cache[pair] = verdict
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # -- workers

    def _ensure_started(self) -> None:
        if self._finalizer is not None and self._finalizer.alive:
            return
        self._workers = [self._spawn() for _ in range(self.num_workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def _spawn(self) -> _Worker:
        conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.strict), name="rltk-verifier", daemon=True
        )
        process.start()
        child_conn.close()  # so the parent sees EOF when the worker dies
        return _Worker(process, conn)

    def _replace(self, slot: int, kill: bool) -> None:
        self._workers[slot].stop(kill=kill)
        self._workers[slot] = self._spawn()

    def _run(self, items: list[tuple[str, str]]) -> list[tuple[bool, str]]:
        """Verify ``items`` on the workers; every item gets a verdict, whatever the workers do."""
        verdicts: list[tuple[bool, str] | None] = [None] * len(items)
        queue = deque(range(len(items)))
        try:
            while queue or any(worker.job is not None for worker in self._workers):
                self._dispatch(items, queue)
                for index, verdict in self._poll():
                    verdicts[index] = verdict
        finally:  # interrupted mid-batch: busy workers would answer stale items later
            for slot, worker in enumerate(self._workers):
                if worker.job is not None:
                    self._replace(slot, kill=True)
        return verdicts

    def _dispatch(self, items: list[tuple[str, str]], queue: deque[int]) -> None:
        for slot, worker in enumerate(self._workers):
            if not (queue and worker.ready and worker.job is None):
                continue
            index = queue.popleft()
            try:
                worker.conn.send(items[index])
            except OSError:  # died while idle: requeue on a fresh worker
                queue.appendleft(index)
                self._replace(slot, kill=True)
                continue
            worker.job, worker.deadline = index, time.monotonic() + self.deadline_s

    def _poll(self) -> list[tuple[int, tuple[bool, str]]]:
        """Wait for a message or the nearest deadline; return the items that finished."""
        busy = [worker for worker in self._workers if worker.job is not None]
        timeout = None
        if busy:
            timeout = max(0.0, min(worker.deadline for worker in busy) - time.monotonic())
        waiting = [w.conn for w in self._workers if w.job is not None or not w.ready]
        readable = set(wait(waiting, timeout))
        done = []
        for slot, worker in enumerate(self._workers):
            if worker.conn in readable:
                done.extend(self._receive(slot))
            elif worker.job is not None and time.monotonic() >= worker.deadline:
                log.warning("verifier item overran %.1fs; worker killed", self.deadline_s)
                done.append((worker.job, (False, "timeout")))
                self._replace(slot, kill=True)
        return done

    def _receive(self, slot: int) -> list[tuple[int, tuple[bool, str]]]:
        """Take one message (or the death) of a worker; return the item it finished, if any."""
        worker = self._workers[slot]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the worker died
            message = None
        if not worker.ready:
            if message == ("ready",):
                worker.ready = True
            else:
                self._start_failed(slot, message)
            return []
        job, worker.job = worker.job, None
        if message is None:
            exitcode = worker.process.exitcode
            log.warning("verifier worker died (exit code %s); item scored parse_error", exitcode)
            self._replace(slot, kill=True)
            return [(job, (False, "parse_error"))]
        return [(job, message)]

    def _start_failed(self, slot: int, message: tuple | None) -> None:
        """A worker died while warming up: replace it when it was killed by a signal; otherwise
        raise, since a fresh one would fail the same way."""
        process = self._workers[slot].process
        process.join(timeout=5.0)
        if message is None and process.exitcode is not None and process.exitcode < 0:
            self._replace(slot, kill=True)
            return
        detail = message[1] if message else f"exit code {process.exitcode}"
        raise RuntimeError(
            f"math-verify worker failed to start ({detail}): is math-verify installed, and is "
            "the main script's code under `if __name__ == '__main__':` (needed by spawn)?"
        )

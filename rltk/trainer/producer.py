"""Asynchronous generation with bounded staleness (``rollout.max_staleness``; docs/pipeline.md).

A :class:`Producer` runs the collector's generation half — the sampler's prompts, generation,
verification, rewards, refill (``RolloutCollector.produce``) — in a background thread, ahead of
the optimizer, on a *behaviour policy*: a copy of the weights that the producer refreshes only
between batches. The trainer consumes the batches in order and runs the other half (the forwards
on the current weights, importance weights, advantages) itself.

Versions count optimizer steps. Rollout batch b is trained from optimizer step b·U (U = updates per
batch); the producer starts it only once the trainer has published version ≥ b·U − S (S =
``max_staleness``), copying the weights of the newest version under the trainer's weights lock, so
every batch is at most S steps stale when its training starts (``async/staleness``). With S = 0
the producer waits for the very weights the synchronous loop would use.

The loss corrects for the staleness as decoupled PPO does (AReaL, Fu et al. 2025, arXiv 2505.24298,
Eq. 5): the trainer's no-grad forward at training time gives the proximal log-probs
(``old_logps``), the PPO ratio is clipped against them, and the sampler→trainer importance weight
exp(old − behaviour) with the engine's sampling log-probs (``rollout.importance_sampling``,
truncated or masked) reweights each token toward the behaviour policy that sampled it.

The state a checkpoint must hold is the sampler's as of the last *consumed* batch: each produced
batch carries a snapshot of it, and ``--resume`` regenerates whatever was in flight.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from rltk.trainer.refill import ScoredGroups

log = logging.getLogger(__name__)


class ProducerError(RuntimeError):
    """The producer ended, or made no batch in time: the trainer cannot go on."""


@dataclass
class Produced:
    """One rollout batch from the producer."""

    index: int  # rollout batches counted from the run's start (a resumed run continues the count)
    version: int  # optimizer steps applied to the weights that generated it
    scored: ScoredGroups
    metrics: dict[str, float]
    sampler_state: dict[str, Any]  # the sampler's state right after this batch's prompts and outcomes
    seconds: float = 0.0


class Producer:
    """The background thread. ``produce()`` makes one batch (scored groups and its metrics) with the
    behaviour engine; ``sync()`` refreshes the behaviour policy from the trainer's weights (called
    with the weights lock held); ``sampler_state()`` snapshots the sampler. It makes batches
    ``first_index`` … ``last_index`` and stops."""

    def __init__(self, produce: Callable[[], tuple[ScoredGroups, dict[str, float]]], sync: Callable[[], None],
                 sampler_state: Callable[[], dict[str, Any]], *, max_staleness: int, updates_per_batch: int,
                 first_index: int, last_index: int, version: int):
        self.produce, self.sync, self.sampler_state = produce, sync, sampler_state
        self.max_staleness, self.updates_per_batch = max_staleness, updates_per_batch
        self.next_index, self.last_index = first_index, last_index  # the batches to make, both included
        self.version = version  # the trainer's newest published version
        self.synced_version: int | None = None
        self.weights_lock = threading.Lock()  # the trainer holds it while it changes the weights
        self.busy = threading.Lock()  # held while a batch is produced (the trainer's evaluation waits on it)
        self.changed = threading.Condition()
        self.ready: queue.Queue[Produced | BaseException] = queue.Queue()
        self.stopped = False
        self.hung = False
        self.doing = "starting"  # what the producer is doing, for the timeout's message
        self.thread = threading.Thread(target=self._run, name="rltk-producer", daemon=True)

    def start(self) -> "Producer":
        self.thread.start()
        return self

    # ------------------------------------------------------------------ trainer side
    def publish(self, version: int) -> None:
        """The trainer applied optimizer step ``version``."""
        with self.changed:
            self.version = version
            self.changed.notify_all()

    def next(self, timeout: float | None = None) -> Produced:
        """The next batch, in order; a producer failure is raised here, and a producer that ended
        without one (past ``last_index``, or stopped), or made none within ``timeout`` seconds (a
        reward function or an engine that hangs), is an error rather than a wait forever."""
        start = time.monotonic()
        while True:
            try:
                wait = 1.0 if timeout is None else max(0.0, min(1.0, start + timeout - time.monotonic()))
                item = self.ready.get(timeout=wait)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.ready.empty():
                    raise ProducerError(f"the producer has stopped (it makes rollout batches up to {self.last_index}; "
                                       f"the trainer asked for batch {self.next_index})") from None
                if timeout is not None and time.monotonic() - start >= timeout:
                    self.hung = True  # stop() then does not wait for it
                    raise ProducerError(f"the producer made no rollout batch in {timeout:g} s (rollout.producer_timeout_s)"
                                       f"; it is {self.doing}: a reward function or the engine may hang") from None
        if isinstance(item, BaseException):
            raise item
        return item

    @contextlib.contextmanager
    def paused(self):
        """No batch is being produced inside the block (evaluation shares the verifier and the RNG)."""
        with self.busy:
            yield

    def stop(self, timeout: float = 60.0) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify_all()
        if self.thread.is_alive() and not self.hung:
            self.thread.join(timeout)

    # ------------------------------------------------------------------ producer side
    def _wait_for(self, version: int) -> bool:
        with self.changed:
            while not self.stopped and self.version < version:
                self.changed.wait()
            return not self.stopped

    def _run(self) -> None:
        try:
            while self.next_index <= self.last_index:
                index = self.next_index
                self.doing = f"waiting for weights version {index * self.updates_per_batch - self.max_staleness}"
                if not self._wait_for(index * self.updates_per_batch - self.max_staleness):
                    return
                with self.busy:
                    self.doing = f"producing rollout batch {index} (sampling, verifying, rewarding)"
                    if self.stopped:
                        return
                    with self.weights_lock:
                        version = self.version
                        if version != self.synced_version:
                            self.sync()
                            self.synced_version = version
                    start = time.perf_counter()
                    scored, metrics = self.produce()
                    produced = Produced(index, version, scored, metrics, self.sampler_state(),
                                        time.perf_counter() - start)
                self.ready.put(produced)
                self.next_index += 1
        except BaseException as exc:  # handed to the trainer, which raises it in its own thread
            log.debug("producer failed", exc_info=True)
            self.ready.put(exc)

"""The ``hf`` engine in a worker process with its own thread budget (``rollout.producer: process``).

The asynchronous producer (rltk/trainer/producer.py, docs/pipeline.md) samples with a *behaviour*
copy of the policy. Sampled in the trainer's own process, that copy competes with the optimizer for
the same threads and the same interpreter lock; :class:`ProcessEngine` instead forwards each
``generate`` call to a worker process that holds the copy and runs the ``hf`` engine on
``threads`` torch threads of its own.

* **Weights** live in shared memory (``Module.share_memory``): the worker maps the very storage the
  trainer's process writes, so :meth:`ProcessEngine.sync_weights` is an in-place copy made between
  batches, while the worker waits for its next request. Nothing is pickled per version.
* **Randomness**: each request carries the caller's torch RNG state and each reply the state after
  sampling, which the caller takes over. Sampling draws the random numbers it would have drawn in
  the caller's process, so a run's samples do not depend on where the engine runs.
* **A worker that dies** (killed, out of memory) is restarted, logged and counted (``restarts``),
  and the request it held is sent again with the same RNG state, so the batch is the one it would
  have been. ``max_restarts`` deaths in a row on one request are an error.

CPU only: a policy on a GPU already samples on the GPU's own cores (use ``rollout.producer:
thread``, or the ``vllm`` engine for a separate GPU).
"""
from __future__ import annotations

import copy
import logging
import pickle
from typing import Any

import torch

from rltk.engines.base import Generation, SamplingParams
from rltk.engines.hf import HFEngine
from rltk.schema import ConfigError

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a waiting caller checks that the worker is alive


class WorkerDied(Exception):
    """The worker process ended while the caller waited for its reply."""


class WorkerError(RuntimeError):
    """The worker failed on a request, or died too often: generation cannot go on."""


def serve(conn, model: torch.nn.Module, tokenizer, engine_kwargs: dict[str, Any], threads: int) -> None:
    """The worker's loop: a pickled ``(prompts, params, rng_state)`` in, ``("ok", generation,
    rng_state)`` or ``("error", one line, None)`` out, until the caller closes the pipe."""
    torch.set_num_threads(threads)
    engine = HFEngine(lambda: model, tokenizer, **engine_kwargs)
    while True:
        try:
            prompts, params, rng_state = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            torch.set_rng_state(rng_state)
            reply = ("ok", engine.generate(prompts, params), torch.get_rng_state())
        except Exception as exc:  # reported to the caller, which raises it as one line
            reply = ("error", f"{type(exc).__name__}: {exc}", None)
        conn.send_bytes(pickle.dumps(reply))


class ProcessEngine:
    """A :class:`~rltk.engines.base.RolloutEngine` sampling a shared-memory copy of ``policy`` in a
    worker process on ``threads`` torch threads; ``sync_weights`` copies ``policy``'s current
    weights into it. ``engine_kwargs`` are :class:`~rltk.engines.hf.HFEngine`'s settings."""

    collective = False

    def __init__(self, policy: torch.nn.Module, tokenizer, *, threads: int, max_restarts: int = 3,
                 **engine_kwargs: Any):
        if next(policy.parameters()).device.type != "cpu":
            raise ConfigError("rollout.producer: process samples on CPU threads, and the policy is on "
                             f"{next(policy.parameters()).device}; use rollout.producer: thread")
        self.policy = policy
        self.copy = copy.deepcopy(policy).requires_grad_(False).eval().share_memory()
        self.tokenizer, self.threads, self.max_restarts = tokenizer, threads, max_restarts
        self.engine_kwargs = engine_kwargs
        self.restarts = 0  # worker deaths recovered from, over the engine's life
        self.process = self.conn = None
        self._start()

    def _start(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        # spawn pickles the arguments with torch's reductions: the copy's tensors travel as handles
        # to the same shared memory, not as data
        self.process = ctx.Process(target=serve, name="rltk-generation",
                                   args=(child, self.copy, self.tokenizer, self.engine_kwargs, self.threads),
                                   daemon=True)
        self.process.start()
        child.close()

    def sync_weights(self) -> None:
        """Copy the policy's weights into the shared copy (call between ``generate`` calls)."""
        with torch.no_grad():
            self.copy.load_state_dict(self.policy.state_dict())

    def generate(self, prompts: list[str], params: SamplingParams) -> Generation:
        request = pickle.dumps((prompts, params, torch.get_rng_state()))
        deaths = 0
        while True:
            try:
                self.conn.send_bytes(request)
                status, payload, rng_state = pickle.loads(self._receive())
                break
            except (WorkerDied, EOFError, BrokenPipeError, ConnectionResetError):
                deaths += 1
                self._stop_worker()
                code = self.process.exitcode
                if deaths > self.max_restarts:
                    raise WorkerError(f"the generation worker died {deaths} times in a row on one request "
                                       f"(last exit code {code}); is the machine out of memory?") from None
                self.restarts += 1
                log.warning("the generation worker died (exit code %s); restarting it and sending its request "
                            "again (restart %d)", code, self.restarts)
                self._start()
        if status != "ok":
            raise WorkerError(f"the generation worker failed: {payload}")
        torch.set_rng_state(rng_state)
        return payload

    def _receive(self) -> bytes:
        while not self.conn.poll(POLL_S):
            if not self.process.is_alive():
                raise WorkerDied
        return self.conn.recv_bytes()

    def _stop_worker(self) -> None:
        self.conn.close()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def close(self) -> None:
        if self.process is not None:
            self._stop_worker()
            self.process = None

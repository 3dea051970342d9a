"""The RL loop (docs/design.md §3): sampler → rollout engine → rewards → requested forwards →
advantage pipeline → loss over micro-batches → optimizer step → metrics → evaluation → checkpoints.

Batch semantics are stated in prompts: each rollout batch takes ``prompts_per_step`` prompts ×
``group_size`` completions, split over processes by whole prompt groups, then into
``mini_batches`` optimizer steps (repeated ``ppo_epochs`` times), each cut into micro-batches of
``micro_batch_size`` completions or ``max_tokens_per_micro_batch`` tokens. The aggregation
normaliser of an optimizer step is summed over all its micro-batches and all ranks before any
backward, so the step's loss and gradient do not depend on how it is cut (docs/algorithms/reference.md §0.3).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from rltk.algos.pipeline import StageFailure
from rltk.batching import plan, token_metrics
from rltk.data.recipe import build_prompts, check_heldout, drop_long_prompts, load_split, load_test_split
from rltk.engines.factory import hf_settings, make_engine, require_engine
from rltk.eval.metrics import logged_metrics
from rltk.eval.runner import EvalSettings, evaluate
from rltk.io import atomic_write_json
from rltk.models import load_model, load_tokenizer, resolve_model_path
from rltk.schema import ConfigError, Recipe
from rltk.trainer.base import BaseTrainer
from rltk.trainer.batch import RolloutBatch
from rltk.trainer.checkpoint import push_to_hub, save_checkpoint
from rltk.trainer.collector import RolloutCollector, TrainingData, check_reward_columns
from rltk.trainer.distributed import attach_generation, generation_session, micro_batch_sync, prepare_frozen
from rltk.trainer.guard import TrainingError, check_saveable
from rltk.trainer.logprobs import forward_logps
from rltk.trainer.loss import AnswerSFTLoss, PacedLoss, PolicyLoss
from rltk.trainer.metrics import CompletionLog, progress_bar
from rltk.trainer.paced import make_paced
from rltk.trainer.resume import load_latest_checkpoint
from rltk.trainer.reward_model import build_rewards
from rltk.trainer.run_dir import RunDir
from rltk.trainer.producer import Producer, ProducerError
from rltk.trainer.sampler_correction import SamplerCorrection
from rltk.validate import check_layout, micro_batch_rows

log = logging.getLogger(__name__)


class RLTrainer(BaseTrainer):
    """Owns the optimizer loop: batches come from a :class:`RolloutCollector`, everything
    algorithmic from the recipe's resolved :class:`~rltk.algos.Algorithm`, the loss from its
    components (rltk/trainer/loss.py)."""

    def __init__(self, recipe: Recipe, *, policy_path: str | None = None, resume: bool = False,
                 accelerator: Accelerator | None = None, run: RunDir | None = None, overwrite: bool = False,
                 allow_changes: bool = False):
        t = recipe.trainer
        require_engine(recipe.rollout)  # a missing vLLM fails here: before any output or model load
        super().__init__(recipe, "rl", hint="Lower trainer.lr or raise trainer.max_bad_steps; the last good "
                                            "checkpoint is intact", accelerator=accelerator, run=run, resume=resume,
                         overwrite=overwrite, allow_changes=allow_changes)
        self.resumed_checkpoint: Path | None = None
        self.counters: dict[str, int] = defaultdict(int)
        self.algorithm = algorithm = recipe.algorithm_stages  # resolved once, when the recipe loaded
        if algorithm is None:
            raise ConfigError("RLTrainer needs a validated recipe (rltk.validate.build_recipe or load_recipe)")
        self.pipeline = algorithm.pipeline
        self.updates_per_batch = t.ppo_epochs * t.mini_batches
        self.correction = SamplerCorrection(recipe.rollout)  # sampler→trainer importance sampling
        self.needs = algorithm.needs() | ({"old_logps"} if self.updates_per_batch > 1 else set())
        self.needs |= self.correction.needs()
        self._check_layout()
        from rltk.launch_check import check_memory_at_start

        memory = check_memory_at_start(recipe, self.accelerator)  # on a GPU: refuse what cannot fit, before loading
        if memory and self.accelerator.is_main_process:
            log.info(memory)
        self._setup_model(policy_path or resolve_model_path(recipe.model, self.out))
        self.paced = make_paced(recipe, self.tokenizer, self.accelerator)  # PACED distillation, or None
        self._setup_data()
        self.sampler = algorithm.make_sampler(len(self.train_examples), t.seed)  # a failure: one line naming it
        longest = max(recipe.rollout.max_new_tokens, recipe.eval.max_new_tokens or 0)  # sizes vLLM's context
        self.engine = make_engine(recipe.rollout, lambda: self.accelerator.unwrap_model(self.model),
                                  self.tokenizer, recipe.data.max_prompt_length, accelerator=self.accelerator,
                                  model_cfg=recipe.model, max_new_tokens=longest)
        attach_generation(self.engine, self.accelerator, lambda: self.model)
        from rewards.math import MathVerifier

        self.verifier = MathVerifier(deadline_s=recipe.verifier.deadline_s, num_workers=recipe.verifier.num_workers)
        reward_fns = build_rewards(recipe, self.accelerator)
        check_reward_columns(reward_fns, self.train_examples[0])  # before the first rollout, in one line
        self.collector = RolloutCollector(
            recipe, self.accelerator, algorithm, self.sampler, self.engine, self.verifier, reward_fns,
            TrainingData(self.train_examples, self.train_prompts), tokenizer=self.tokenizer, policy=self.model,
            reference=self.reference, needs=self.needs, correction=self.correction, paced=self.paced,
            options=self.forward_options, counters=self.counters, updates_per_batch=self.updates_per_batch)
        self.collector.attach_prober(self.out / "pairing_probe.json",
                                     fingerprint=f"{self.policy_path}|{recipe.data.source}|{recipe.rollout}")
        self.policy_loss = PolicyLoss(self.pipeline, recipe.algorithm.pg_coef, recipe.rollout.max_new_tokens,
                                      self.accelerator.num_processes, self.reduce_sum, "entropy" in self.needs)
        answer_sft = AnswerSFTLoss(self.policy_loss, self.model, recipe.rollout.temperature, self.forward_options)
        self.loss_components = [self.policy_loss, answer_sft]
        if self.paced is not None:
            self.loss_components.append(PacedLoss(self.paced, lambda: self.accelerator.unwrap_model(self.model),
                                                  self.accelerator.num_processes, self.reduce_sum, self.counters))
        # asynchronous generation (rollout.max_staleness > 0): started at the first batch
        self.producer: Producer | None = None
        self.behaviour_engine = None  # what the producer samples with; None: a copy of the policy (hf engine)
        self.consumed_sampler_state: dict | None = None  # the sampler as of the last trained batch
        self.worker = None  # the generation worker process the trainer started (rollout.producer: process)
        self._threads_before: int | None = None  # the trainer's torch threads before a worker took some
        if resume:
            self._resume()
        lg = recipe.logging  # sampled completions every lg.log_completions_every batches
        self.completions = CompletionLog(self.accelerator, self.out, lg.log_completions_every, lg.log_completions_rows,
                                         self.step or -1)

    # ------------------------------------------------------------------ setup
    def _check_layout(self) -> None:
        world = self.accelerator.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != world:
            raise ConfigError(f"launched with {launched} processes but accelerate sees {world}: on a machine without "
                              "GPUs use `accelerate launch --cpu` (or set ACCELERATE_USE_CPU=true)")
        check_layout(self.recipe, world)

    def _setup_model(self, path: str) -> None:
        cfg = self.recipe.model
        self.policy_path = path
        self.tokenizer = load_tokenizer(path, cfg.trust_remote_code)
        model = load_model(path, cfg)
        t = self.recipe.trainer
        self.prepare(model, lr=t.lr, scheduler=t.lr_scheduler, warmup_ratio=t.warmup_ratio, steps=t.steps,
                     micro_batch_size=t.micro_batch_size)
        self.ref_model = None
        if "ref_logps" in self.needs and cfg.lora is None:
            self.ref_model = prepare_frozen(load_model(cfg.ref_model or path, cfg, trainable=False), self.accelerator)

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference policy: a separate model, or the base model with the adapter off."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        with unwrapped.disable_adapter():
            yield unwrapped

    def _setup_data(self) -> None:
        d, t = self.recipe.data, self.recipe.trainer
        train = load_split(d, d.train_split, d.num_train, seed=t.seed)
        self.train_examples, self.train_prompts, skipped = drop_long_prompts(
            train, build_prompts(train, d, self.tokenizer), self.tokenizer, d.max_prompt_length)
        self.counters["skipped_long_prompts"] = skipped
        num_test = self.recipe.eval.num_problems or d.num_test
        test = load_test_split(d, num_test, seed=t.seed)
        self.heldout = check_heldout(d, train, test)  # refuses evaluation on training rows; names the held-out set
        self.test_examples, self.test_prompts, _ = drop_long_prompts(
            test, build_prompts(test, d, self.tokenizer), self.tokenizer, d.max_prompt_length)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        check_saveable(self.model, self.optimizer, self.step, self._last_good_checkpoint())  # never a NaN checkpoint
        self.run.start(self.step)  # the identity is on disk before the run's first checkpoint
        sampler = self.consumed_sampler_state if self.producer is not None else self.sampler.state_dict()
        state = {"sampler": sampler, "counters": dict(self.counters),
                 "policy_path": self.policy_path}
        return save_checkpoint(self.accelerator, self.model, self.tokenizer, self.out, self.step, state,
                               self.recipe.trainer.keep_checkpoints, self.recipe.model.trust_remote_code,
                               run_id=self.run.run_id)

    def _resume(self) -> None:
        """Continue from the newest checkpoint that verifies (rltk/trainer/resume.py)."""
        resumed = load_latest_checkpoint(self.accelerator, self.out, self.reduce_sum)
        if resumed is None:
            return
        self.step = int(resumed.state["step"])
        self.sampler.load_state_dict(resumed.state["sampler"])
        self.counters.update(resumed.state.get("counters", {}))
        self.resumed_checkpoint = resumed.checkpoint
        log.info("resumed from %s (step %d)", resumed.checkpoint, self.step)

    def collect(self) -> RolloutBatch:
        """This rank's share of the next rollout batch (:meth:`RolloutCollector.collect`); with
        ``rollout.max_staleness`` > 0 the producer's next batch, finished on the current weights."""
        if self.producer is None and self.recipe.rollout.max_staleness == 0:
            return self.collector.collect(self.step)
        if self.producer is None:
            self.start_producer()
        start = time.perf_counter()
        produced = self.producer.next(timeout=self.recipe.rollout.producer_timeout_s or None)
        waited = time.perf_counter() - start
        expected = self.step // self.updates_per_batch
        if produced.index != expected:  # a bug, not an input: the producer's batches arrive in order
            raise RuntimeError(f"the producer sent rollout batch {produced.index}, the trainer expected {expected}")
        staleness = self.step - produced.version
        self.consumed_sampler_state = produced.sampler_state
        return self.collector.consume(produced.scored, {**produced.metrics, "async/staleness": float(staleness),
                                                        "async/version": float(produced.version),
                                                        "async/wait": waited, "async/produce": produced.seconds,
                                                        **self._worker_metrics()},
                                      self.step)

    def _worker_metrics(self) -> dict[str, float]:
        return {"async/worker_restarts": float(self.worker.restarts)} if self.worker is not None else {}

    def start_producer(self, max_staleness: int | None = None) -> Producer:
        """Start the producer thread (rltk/trainer/producer.py) on the behaviour engine: a copy of the
        policy sampled by its own hf engine (refreshed between batches), the vllm engine (weights
        pushed between batches), or ``self.behaviour_engine`` if set (e.g. a remote stand-in).
        ``max_staleness`` overrides the recipe's (tests run the producer at 0)."""
        r, t = self.recipe.rollout, self.recipe.trainer
        if getattr(self.accelerator.state, "deepspeed_plugin", None) is not None:
            raise ConfigError("rollout.max_staleness: asynchronous generation is not supported under DeepSpeed yet; "
                              "set rollout.max_staleness: 0")
        engine, sync = self.behaviour()
        self.collector.engine = engine  # the sampler's probes sample with it too
        self.consumed_sampler_state = self.sampler.state_dict()
        self.producer = Producer(lambda: self.collector.produce(self.producer.next_index * self.updates_per_batch),
                                 sync, self.sampler.state_dict,
                                 max_staleness=r.max_staleness if max_staleness is None else max_staleness,
                                 updates_per_batch=self.updates_per_batch, first_index=self.step // self.updates_per_batch,
                                 last_index=-(-t.steps // self.updates_per_batch) - 1, version=self.step)
        return self.producer.start()

    def behaviour(self):
        """(engine, sync): what the producer samples with, and how it takes the newest weights."""
        if self.behaviour_engine is not None:
            return self.behaviour_engine, getattr(self.behaviour_engine, "sync_weights", lambda: None)
        r = self.recipe.rollout
        if r.engine == "vllm":
            return self.engine, self.engine.push_weights
        policy = self.accelerator.unwrap_model(self.model)
        on_cpu = next(policy.parameters()).device.type == "cpu"
        if r.producer == "process" or (r.producer == "auto" and on_cpu):
            return self._worker_engine(policy)
        import copy

        copied = copy.deepcopy(policy).requires_grad_(False)

        def sync() -> None:
            with torch.no_grad():
                copied.load_state_dict(policy.state_dict())

        engine = make_engine(self.recipe.rollout, lambda: copied, self.tokenizer, self.recipe.data.max_prompt_length)
        return engine, sync

    def _worker_engine(self, policy):
        """The hf engine in a worker process (rltk/engines/worker.py) on ``rollout.producer_threads``
        torch threads; the trainer keeps the rest of its threads (restored by ``close``)."""
        from rltk.engines.worker import ProcessEngine

        total = torch.get_num_threads()
        threads = self.recipe.rollout.producer_threads or max(1, total // 2)
        self.worker = ProcessEngine(policy, self.tokenizer, threads=threads,
                                    **hf_settings(self.recipe.rollout, self.recipe.data.max_prompt_length))
        self._threads_before = total
        torch.set_num_threads(max(1, total - threads))
        log.info("asynchronous generation: the producer samples in a worker process on %d torch threads, the trainer "
                 "runs on %d", threads, torch.get_num_threads())
        return self.worker, self.worker.sync_weights

    # ------------------------------------------------------------------ optimisation
    def micro_batches(self, batch: RolloutBatch, rows: torch.Tensor) -> list[torch.Tensor]:
        """Cut ``rows`` into micro-batches (rltk/batching.py): ``micro_batch_size`` rows in
        order (whole groups when it holds at least one), or by ``max_tokens_per_micro_batch``, whole
        groups together where the loss reads groups."""
        t, group, options = self.recipe.trainer, self.recipe.rollout.group_size, self.forward_options
        return plan(rows, *batch.tokens.rows(rows).lengths(), max_rows=micro_batch_rows(t.micro_batch_size, group),
                    max_tokens=t.max_tokens_per_micro_batch, unit=group if self.pipeline.whole_groups else 1,
                    packed=options.layout == "packed", count_over_ranks=options.count_over_ranks)

    def optimize(self, batch: RolloutBatch, rows: torch.Tensor) -> dict[str, float]:
        """One optimizer step on ``rows`` of this rank's batch (a mini-batch of whole groups)."""
        with self.guard.engine_step(self.optimizer, self.step + 1):  # DeepSpeed steps inside the last backward
            metrics = self.accumulate_gradients(batch, rows)
        if metrics.get("empty_step"):
            self.counters["empty_steps"] += 1
            return metrics
        max_norm = self.recipe.trainer.max_grad_norm or float("inf")
        metrics["grad_norm"] = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self._apply_update(metrics)
        return metrics

    def accumulate_gradients(self, batch: RolloutBatch, rows: torch.Tensor) -> dict[str, float]:
        """Forward and backward every micro-batch of ``rows``; gradients are left in ``.grad``.

        One policy forward per micro-batch feeds every active loss component (rltk/trainer/loss.py),
        each divided by its own step-global normaliser; their sum is backpropagated once."""
        acc = self.accelerator
        active = [c for c in self.loss_components if c.begin(batch, rows, self.step)]
        if not active:
            return {"loss": 0.0, "empty_step": 1.0, **self._component_metrics()}
        with_entropy = any(c.wants_entropy for c in active)
        with_final_hidden = any(c.wants_final_hidden for c in active)
        loss_total = torch.zeros((), dtype=torch.float64)
        t_forward = t_backward = 0.0
        positions = 0
        chunks = self.micro_batches(batch, rows)
        for i, mb in enumerate(chunks):
            with micro_batch_sync(acc, self.model, last=i == len(chunks) - 1):
                start = time.perf_counter()
                out = forward_logps(self.model, batch.tokens.rows(mb), self.recipe.rollout.temperature,
                                    with_entropy=with_entropy, with_final_hidden=with_final_hidden, options=self.forward_options)
                positions += out.positions
                loss = None
                for component in active:
                    part, _ = component.loss(batch, mb, out)
                    loss = part if loss is None else loss + part
                t_forward += time.perf_counter() - start
                start = time.perf_counter()
                acc.backward(loss)
                t_backward += time.perf_counter() - start
            loss_total += loss.detach().double().cpu() / acc.num_processes
        metrics = {"loss": self.reduce_sum(float(loss_total)), "time/forward": t_forward, "time/backward": t_backward,
                   **token_metrics(batch.tokens.rows(rows), positions, self.reduce_sum)}
        return {**metrics, **self._component_metrics()}

    def _component_metrics(self) -> dict[str, float]:
        return {k: v for c in self.loss_components for k, v in c.metrics().items()}

    def _apply_update(self, metrics: dict[str, float]) -> None:
        """Optimizer step, or skip and count it when the loss, the gradient or the updated weights
        or optimizer state would not be finite (rltk/trainer/guard.py)."""
        with self.producer.weights_lock if self.producer is not None else contextlib.nullcontext():
            applied = self.guard.step(self.optimizer, self.scheduler, metrics, self.step + 1)
        if not applied:
            self.counters["skipped_nonfinite_steps"] += 1
        elif self.producer is None:  # a producer takes the weights itself, between its batches
            self.engine.sync_weights()  # the engine samples from the new weights from its next generate on

    def train_batch(self) -> dict[str, float]:
        """Collect one rollout batch and run its ``ppo_epochs × mini_batches`` optimizer steps.

        A stage, sampler or reward function that raises or returns the wrong type or shape stops
        training with one line (:class:`TrainingError`) naming it, its function and the step; the
        traceback is logged at debug level (``rltk -v``)."""
        from rewards.registry import RewardError

        from rltk.engines.worker import WorkerError

        try:
            return self._train_batch()
        except (StageFailure, RewardError) as exc:
            log.debug("step %d: user code failed", self.step + 1, exc_info=True)
            raise TrainingError(f"step {self.step + 1}: {exc.where} {exc.detail}; {self._kept()} "
                                "(rltk -v logs the traceback)") from exc
        except (ProducerError, WorkerError) as exc:  # asynchronous generation cannot go on
            raise TrainingError(f"step {self.step + 1}: {exc}; {self._kept()}") from exc

    def _kept(self) -> str:
        last = self._last_good_checkpoint()
        return f"the last good checkpoint {last} is intact" if last else "no checkpoint was written yet"

    def _last_good_checkpoint(self) -> Path | None:
        from rltk.trainer.checkpoint import latest_checkpoint

        return latest_checkpoint(self.out)

    def _train_batch(self) -> dict[str, float]:
        t = self.recipe.trainer
        start = time.perf_counter()
        batch = self.collect()
        groups = batch.rollouts.num_completions // self.recipe.rollout.group_size
        per_mini = groups // t.mini_batches * self.recipe.rollout.group_size
        step_metrics: dict[str, list[float]] = defaultdict(list)
        for _ in range(t.ppo_epochs):
            for m in range(t.mini_batches):
                rows = torch.arange(m * per_mini, (m + 1) * per_mini)
                for key, value in self.optimize(batch, rows).items():
                    step_metrics[key].append(value)
                self.step += 1
                if self.producer is not None:
                    self.producer.publish(self.step)
        self.completions.log(self.step, batch)
        metrics = {k: sum(v) / len(v) for k, v in step_metrics.items()}
        for key in ("time/forward", "time/backward"):
            metrics[key] = sum(step_metrics[key])
        metrics.update(self.mean_over_ranks(batch.metrics))
        metrics["time/step"] = time.perf_counter() - start
        return metrics

    # ------------------------------------------------------------------ evaluation and the loop
    def evaluate(self, tag: str) -> dict[str, Any]:
        """Held-out pass@k of the current policy; written under ``<output_dir>/eval/<tag>``."""
        e, r = self.recipe.eval, self.recipe.rollout
        settings = EvalSettings(n=e.n, ks=tuple(e.ks) if e.ks else None, temperature=e.temperature, top_p=e.top_p,
                                max_new_tokens=e.max_new_tokens or r.max_new_tokens, batch_size=e.batch_size,
                                maj=e.maj, seed=self.recipe.trainer.seed)
        protocol = {"model": self.policy_path, "step": self.step, "template": self.recipe.data.template,
                    "heldout": self.heldout}
        paused = self.producer.paused() if self.producer is not None else contextlib.nullcontext()
        with paused, generation_session(self.engine):
            if self.producer is not None:
                self.engine.sync_weights()  # vllm: the producer's pushes lag; evaluate the current weights
            return evaluate(self.engine, self.test_examples, self.test_prompts, self.verifier, settings,
                            accelerator=self.accelerator, out_dir=self.out / "eval" / tag, protocol=protocol,
                            progress=self.recipe.logging.progress)

    def train(self, evaluate_before: bool = True) -> dict[str, Any]:
        """Run to ``trainer.steps``; returns before/after evaluation reports and the final checkpoint."""
        t, acc = self.recipe.trainer, self.accelerator
        self.run.start(self.step)  # the run's identity, before its first metrics line
        metrics_log = self.metrics_log(self.recipe.to_dict())
        if acc.is_main_process:
            atomic_write_json(self.out / "recipe.json", self.recipe.to_dict())
        result: dict[str, Any] = {"start_step": self.step}
        if self.step == 0 and evaluate_before:
            result["before"] = self.evaluate(f"step-{0:06d}")
            metrics_log.log(0, logged_metrics(result["before"]["summary"]))
        bar = progress_bar(t.steps, self.step, self.recipe.logging.progress and acc.is_main_process)
        try:
            while self.step < t.steps:
                metrics = self.train_batch()
                bar.update(self.updates_per_batch)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", correct=f"{metrics['correct/mean']:.3f}",
                                step_s=f"{metrics['time/step']:.2f}")
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    metrics.update(logged_metrics(self.evaluate(f"step-{self.step:06d}")["summary"]))
                metrics_log.log(self.step, metrics)
                if t.save_every and self.step % t.save_every == 0 and self.step < t.steps:
                    self.save()
        finally:
            bar.close()
        resumed = self.resumed_checkpoint
        final = resumed if resumed is not None and resumed.name == f"step-{self.step:06d}" else self.save()
        result["after"] = self.evaluate(f"step-{self.step:06d}")
        metrics_log.log(self.step, logged_metrics(result["after"]["summary"]))
        metrics_log.close()
        result.update(final_checkpoint=str(final), model_dir=str(final / "model"), counters=dict(self.counters))
        if acc.is_main_process:
            atomic_write_json(self.out / "result.json", {
                k: (v["summary"] if isinstance(v, dict) and "summary" in v else v) for k, v in result.items()})
        if t.push_to_hub and acc.is_main_process:  # last, so a failed upload loses nothing
            push_to_hub(final, t.push_to_hub)
        return result

    def close(self) -> None:
        if self.producer is not None:
            self.producer.stop()
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        self.verifier.close()

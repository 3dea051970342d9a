"""The RL loop (DESIGN.md §3): sampler → rollout engine → rewards → requested forwards →
advantage pipeline → loss over micro-batches → optimizer step → metrics → evaluation → checkpoints.

Batch semantics are stated in prompts: each rollout batch takes ``prompts_per_step`` prompts ×
``group_size`` completions, split over processes by whole prompt groups, then into
``mini_batches`` optimizer steps (repeated ``ppo_epochs`` times), each cut into micro-batches of
``micro_batch_size`` completions. The aggregation normaliser of an optimizer step is summed over
all its micro-batches and all ranks before any backward, so the step's loss and gradient do not
depend on how it is cut (ALGORITHMS.md §0.3).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rltk.algos.pipeline import AlgorithmPipeline, StageCall, StageFailure
from rltk.algos.types import Advantages, Rollouts
from rltk.schema import ConfigError, Recipe
from rltk.data.recipe import build_prompts, check_heldout, drop_long_prompts, load_split, load_test_split
from rltk.describe import describe_exception
from rltk.eval.runner import EvalSettings, evaluate
from rltk.io import atomic_write_json, check_writable
from rltk.models import load_model, load_tokenizer, resolve_model_path
from rltk.engines.base import SamplingParams, rank_shard
from rltk.engines.factory import make_engine, require_engine
from rltk.trainer.answers import answer_logps, build_answer_batch
from rltk.trainer.checkpoint import choose_checkpoint, has_manifest, push_to_hub, save_checkpoint, set_damaged_aside
from rltk.trainer.distributed import (accelerator_handlers, attach_generation, configure_deepspeed,
                                      generation_session, micro_batch_sync, prepare_frozen)
from rltk.trainer.guard import NonFiniteGuard, TrainingError, check_saveable  # noqa: F401  (TrainingError re-exported)
from rltk.trainer.logprobs import HeadOptions, TokenBatch, forward_logps
from rltk.trainer.metrics import MetricsLog, progress_bar
from rltk.trainer.paced import make_paced
from rltk.precision import compute_dtype, mixed_precision
from rltk.trainer.batch import RolloutBatch, add_requested_forwards, combine_rewards
from rltk.trainer.run_dir import RunDir, claim, output_dir
from rltk.trainer.sampler_correction import SamplerCorrection

log = logging.getLogger(__name__)


class RLTrainer:
    """Owns the loop; everything algorithmic is delegated to the recipe's ``AlgorithmPipeline``."""

    def __init__(self, recipe: Recipe, *, policy_path: str | None = None, resume: bool = False,
                 accelerator: Accelerator | None = None, run: RunDir | None = None, overwrite: bool = False,
                 allow_changes: bool = False):
        self.recipe = recipe
        t = recipe.trainer
        require_engine(recipe.rollout)  # a missing vLLM fails here: before any output or model load
        self.out = output_dir(recipe)
        self.accelerator = accelerator or Accelerator(
            log_with=recipe.logging.report_to or None, project_dir=str(self.out), step_scheduler_with_optimizer=False,
            kwargs_handlers=accelerator_handlers(), mixed_precision=mixed_precision(recipe.model),
        )
        # the run directory contract (rltk/trainer/run_dir.py): checked before anything is written
        self.run = run or claim(recipe, "rl", resume=resume, overwrite=overwrite, allow_changes=allow_changes,
                                ranks=self.accelerator)
        self.resumed_checkpoint: Path | None = None
        if self.accelerator.is_main_process:
            check_writable(self.out)
        set_seed(t.seed, device_specific=True)
        self.step = 0
        self.head = HeadOptions(t.head_chunk_tokens, compute_dtype(self.accelerator))  # every log-prob forward
        self.guard = NonFiniteGuard(t.max_bad_steps, "Lower trainer.lr or raise trainer.max_bad_steps; "
                                                     "the last good checkpoint is intact")
        self.counters: dict[str, int] = defaultdict(int)
        self.pipeline = AlgorithmPipeline(recipe.algorithm.advantage, recipe.algorithm.loss,
                                          recipe.algorithm.aggregation, recipe.algorithm.terms)
        self.updates_per_batch = t.ppo_epochs * t.mini_batches
        self.correction = SamplerCorrection(recipe.rollout)  # sampler→trainer importance sampling
        self.needs = self.pipeline.needs() | ({"old_logps"} if self.updates_per_batch > 1 else set())
        self.needs |= self.correction.needs()
        self._check_layout()
        from rltk.launch_check import check_memory_at_start

        memory = check_memory_at_start(recipe, self.accelerator)  # on a GPU: refuse what cannot fit, before loading
        if memory and self.accelerator.is_main_process:
            log.info(memory)
        self._setup_model(policy_path or resolve_model_path(recipe.model, self.out))
        self.paced = make_paced(recipe, self.tokenizer, self.accelerator)  # PACED distillation, or None
        self._setup_data()
        self.sampler = self._make_sampler()
        if getattr(self.sampler, "provides_roles", False) and (t.prompts_per_step // t.mini_batches
                                                              // self.accelerator.num_processes) % 2:
            raise ConfigError("trainer.prompts_per_step: a pairing sampler needs an even number of prompts per "
                              "process and mini-batch, so (q+, q-) pairs stay together")
        self.engine = make_engine(recipe.rollout, lambda: self.accelerator.unwrap_model(self.model),
                                  self.tokenizer, recipe.data.max_prompt_length, accelerator=self.accelerator,
                                  model_cfg=recipe.model, max_new_tokens=_longest_generation(recipe))
        attach_generation(self.engine, self.accelerator, lambda: self.model)
        if hasattr(self.sampler, "attach"):
            from rltk.algos.pairing import ProbeContext

            self.sampler.attach(ProbeContext(self.probe, recipe.rollout.group_size,
                                             [e.id for e in self.train_examples], self.out / "pairing_probe.json",
                                             fingerprint=f"{self.policy_path}|{recipe.data.source}|{recipe.rollout}"))
        from rewards.math import MathVerifier
        from rewards.registry import get_reward_function

        self.verifier = MathVerifier(deadline_s=recipe.verifier.deadline_s, num_workers=recipe.verifier.num_workers)
        self.reward_fns = [(r.name, get_reward_function(r.name), r.weight) for r in recipe.rewards]
        if resume:
            self._resume()

    # ------------------------------------------------------------------ setup
    def _check_layout(self) -> None:
        t, world = self.recipe.trainer, self.accelerator.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != world:
            raise ConfigError(f"launched with {launched} processes but accelerate sees {world}: on a machine without "
                              "GPUs use `accelerate launch --cpu` (or set ACCELERATE_USE_CPU=true)")
        if t.steps % self.updates_per_batch:
            raise ConfigError(f"trainer.steps ({t.steps}) must be a multiple of ppo_epochs × mini_batches "
                              f"({self.updates_per_batch})")
        per_update = t.prompts_per_step // t.mini_batches
        if per_update % world:
            raise ConfigError(f"trainer.prompts_per_step / mini_batches = {per_update} prompts per optimizer step "
                              f"cannot be split over {world} processes; make it a multiple of {world}")

    def _setup_model(self, path: str) -> None:
        cfg = self.recipe.model
        self.policy_path = path
        self.tokenizer = load_tokenizer(path, cfg.trust_remote_code)
        model = load_model(path, cfg)
        t = self.recipe.trainer
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        from transformers import get_scheduler

        scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * t.steps),
                                  num_training_steps=t.steps)
        configure_deepspeed(self.accelerator, t.micro_batch_size, t.max_grad_norm)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
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

    def _make_sampler(self):
        self.sampler_call = call = StageCall.from_spec("sampler", self.recipe.algorithm.sampler)
        return call(len(self.train_examples), self.recipe.trainer.seed)  # a failure: one line naming the sampler

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        check_saveable(self.model, self.optimizer, self.step, self._last_good_checkpoint())  # never a NaN checkpoint
        self.run.start(self.step)  # the identity is on disk before the run's first checkpoint
        state = {"sampler": self.sampler.state_dict(), "counters": dict(self.counters),
                 "policy_path": self.policy_path}
        return save_checkpoint(self.accelerator, self.model, self.tokenizer, self.out, self.step, state,
                               self.recipe.trainer.keep_checkpoints, self.recipe.model.trust_remote_code,
                               run_id=self.run.run_id)

    def _resume(self) -> None:
        """Load the newest checkpoint that verifies against its manifest; damaged newer ones are set
        aside with a warning naming the file and the reason (rltk/trainer/checkpoint.py). The main
        process verifies and chooses; a load that fails on any process falls back the same way."""
        import json

        from accelerate.utils import broadcast_object_list

        acc, excluded = self.accelerator, set()
        while True:
            choice = [None, [], False]
            if acc.is_main_process:
                path, problems = choose_checkpoint(self.out, frozenset(excluded))
                choice = [None if path is None else str(path), [str(p) for p in problems],
                          path is not None and has_manifest(path)]
            broadcast_object_list(choice)
            if choice[0] is None:
                log.warning("--resume: no usable complete checkpoint under %s; starting from step 0", self.out)
                return
            checkpoint, error = Path(choice[0]), None
            try:
                acc.load_state(str(checkpoint / "state"))
            except Exception as exc:  # noqa: BLE001  (reported below, on one line)
                error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            if not self._reduce_sum(1.0 if error else 0.0):
                break
            if choice[2]:  # its files are as saved: the recipe, not the checkpoint, is at fault
                raise ConfigError(f"--resume: checkpoint {checkpoint} is intact but does not load into this run "
                                  f"({error or 'on another process'}); a recipe change accepted with "
                                  "--allow-changes may not fit it")
            excluded.add(checkpoint.name)  # no manifest vouched for it: treat it as damaged
            if acc.is_main_process:
                try:
                    where = f"set aside as {set_damaged_aside(checkpoint).name}"
                except OSError as exc:
                    where = f"left in place ({exc.strerror or exc})"
                log.warning("--resume: checkpoint %s does not load (%s); %s; falling back to the previous complete "
                            "checkpoint", checkpoint.name, error or "on another process", where)
            acc.wait_for_everyone()
        state = json.loads((checkpoint / "trainer.json").read_text())
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.counters.update(state.get("counters", {}))
        self.resumed_checkpoint = checkpoint
        for problem in choice[1]:
            log.warning("--resume: %s/%s; resuming from this checkpoint, but its random state is not restored as "
                        "saved, so this resume is not bit-reproducible", checkpoint.name, problem)
        log.info("resumed from %s (step %d)", checkpoint, self.step)

    # ------------------------------------------------------------------ one rollout batch
    def collect(self) -> RolloutBatch:
        """This rank's share of the next rollout batch from the sampler."""
        t, acc = self.recipe.trainer, self.accelerator
        try:
            indices = self.sampler.next_indices(t.prompts_per_step)
        except Exception as exc:
            raise StageFailure(self.sampler_call.stage, f"next_indices raised {describe_exception(exc)}") from exc
        roles = getattr(self.sampler, "last_roles", None)
        per_rank = t.prompts_per_step // acc.num_processes
        first_group = self.step // self.updates_per_batch * t.prompts_per_step + acc.process_index * per_rank
        batch = self.rollout_batch(self._rank_share(indices), first_group,
                                   tuple(self._rank_share(roles)) if roles else None)
        if hasattr(self.sampler, "metrics"):
            batch.metrics.update(self.sampler.metrics())
        return batch

    @torch.no_grad()
    def probe(self, indices: list[int]) -> list[int]:
        """Correct completions out of ``group_size`` samples of the current policy per prompt
        (for samplers that select prompts by success rate). Sharded over processes (padded equally
        for a collective engine: :func:`rltk.engines.base.rank_shard`); seeded in a forked RNG so
        probing never shifts the training run's random stream."""
        r, acc = self.recipe.rollout, self.accelerator
        shard, padding = rank_shard(self.engine, indices, acc.process_index, acc.num_processes)
        counts: list[tuple[int, int]] = []
        chunk = max(1, r.batch_size // r.group_size)
        with torch.random.fork_rng(devices=[]), generation_session(self.engine):
            torch.manual_seed(self.recipe.trainer.seed + 7919 * (self.step + 1))
            for start in range(0, len(shard), chunk):
                part = shard[start : start + chunk]
                generation = self.engine.generate([self.train_prompts[i] for i in part], SamplingParams(
                    n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    max_new_tokens=r.max_new_tokens))
                answers = [self.train_examples[i].answer for i in part for _ in range(r.group_size)]
                correct = [v.correct for v in self.verifier.score(generation.texts, answers)]
                counts += [(i, sum(correct[k * r.group_size : (k + 1) * r.group_size])) for k, i in enumerate(part)]
        counts = counts[: len(counts) - padding]  # a collective engine's padding repeats are not probes
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            counts = gather_object(counts)
        found = dict(counts)
        return [found[i] for i in indices]

    def rollout_batch(self, mine: list[int], first_group: int, roles: tuple[str, ...] | None = None) -> RolloutBatch:
        """Sample groups for training prompts ``mine``, score them, run the requested forwards and
        compute advantages. ``first_group`` makes group ids unique across steps and ranks; ``roles``
        are the sampler's per-prompt roles, if any."""
        t, r = self.recipe.trainer, self.recipe.rollout
        examples = [self.train_examples[i] for i in mine]
        timings = {}
        start = time.perf_counter()
        generation = self.engine.generate([self.train_prompts[i] for i in mine], SamplingParams(
            n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
            return_logps=self.correction.enabled))
        timings["time/generate"] = time.perf_counter() - start
        start = time.perf_counter()
        answers = [e.answer for e in examples for _ in range(r.group_size)]
        verdicts = self.verifier.score(generation.texts, answers)
        columns = {"answer": answers, "question": [e.question for e in examples for _ in range(r.group_size)]}
        rewards, missing = combine_rewards(generation.texts, columns, verdicts, self.reward_fns)
        timings["time/score"] = time.perf_counter() - start
        self.counters["reward_none"] += missing
        tokens = TokenBatch(generation.prompt_ids, generation.prompt_mask, generation.completion_ids,
                            generation.completion_mask)
        rollouts = Rollouts(
            group_ids=(torch.arange(len(examples)) + first_group).repeat_interleave(r.group_size),
            rewards=rewards,
            correct=torch.tensor([v.correct for v in verdicts], dtype=torch.bool),
            completion_mask=generation.completion_mask.float(),
            truncated=generation.truncated,
            roles=roles,
            extra={"step": self.step},
        )
        start = time.perf_counter()
        rollouts = add_requested_forwards(rollouts, tokens, self.needs, policy=self.model, reference=self.reference,
                                          temperature=r.temperature, chunk_size=t.logprob_chunk_size, head=self.head)
        rollouts, is_metrics = self.correction.apply(rollouts, generation.sampling_logps)
        timings.update(is_metrics)
        answer_batch = None
        if "answer_logps" in self.needs:
            answer_batch = build_answer_batch(tokens, generation.texts, answers, self.tokenizer,
                                              self.recipe.data.answer_template)
            rollouts = replace(rollouts, answer_logps=answer_logps(self.model, answer_batch, r.temperature,
                                                                   t.logprob_chunk_size, self.head))
        timings["time/extra_forwards"] = time.perf_counter() - start
        advantages, stage_metrics = self.pipeline.compute_advantages(rollouts)
        reasons = defaultdict(int)
        for v in verdicts:
            reasons[v.reason] += 1
        if rollouts.answer_logps is not None:
            timings["answer/logp_mean"] = float(rollouts.answer_logps.mean())
            timings["answer/prob_mean"] = float(rollouts.answer_logps.exp().mean())
        metrics = {
            **self._batch_metrics(rollouts, advantages, reasons),
            **stage_metrics,
            **timings,
        }
        answer_sft = self._answer_sft_weights(rollouts, advantages) if answer_batch is not None else None
        teacher_tokens = None
        if self.paced is not None:
            teacher_tokens = self.paced.teacher_tokens(tokens, examples, [self.train_prompts[i] for i in mine],
                                                       r.group_size)
            metrics.update(self.paced.batch_metrics(rollouts))
        return RolloutBatch(tokens, rollouts, advantages, generation.texts, metrics, answer_batch, answer_sft,
                            teacher_tokens)

    def _answer_sft_weights(self, rollouts: Rollouts, advantages: Advantages) -> torch.Tensor | None:
        """Per-completion weights of the SFT term on the gold answer after each rationale: GARL's
        pathwise term, or PAFT's resampled gold-answer term, in likelihood mode (ALGORITHMS.md §5)."""
        weights = getattr(advantages, "answer_sft_weights", None)
        if weights is not None:
            return weights
        loss = self.pipeline.loss
        if loss.name == "paft" and loss.params.get("mode") == "likelihood":
            from rltk.algos.tsallis import paft_draw

            return paft_draw(rollouts, **loss.params).coef.float()
        return None

    def _rank_share(self, indices: list[int]) -> list[int]:
        t, acc = self.recipe.trainer, self.accelerator
        per_update = t.prompts_per_step // t.mini_batches
        per_rank_update = per_update // acc.num_processes
        mine = []
        for m in range(t.mini_batches):
            block = indices[m * per_update : (m + 1) * per_update]
            mine.extend(block[acc.process_index * per_rank_update : (acc.process_index + 1) * per_rank_update])
        return mine

    def _batch_metrics(self, rollouts: Rollouts, advantages: Advantages, reasons) -> dict[str, float]:
        """Rollout statistics of this batch, averaged over ranks by the caller."""
        lengths = rollouts.lengths
        kept = advantages.kept()
        values = advantages.values
        if values.dim() == 2:
            values = (values * rollouts.completion_mask).sum(-1) / rollouts.completion_mask.sum(-1).clamp(min=1)
        kept_values = values[kept] if kept.any() else values.new_zeros(1)
        n = max(1, rollouts.num_completions)
        index, groups = rollouts.group_index()
        solved = torch.zeros(groups).index_add_(0, index, rollouts.correct.float())
        sizes = torch.zeros(groups).index_add_(0, index, torch.ones(n))
        return {
            "reward/mean": float(rollouts.rewards.mean()),
            "reward/std": float(rollouts.rewards.std()) if n > 1 else 0.0,
            "correct/mean": float(rollouts.correct.float().mean()),
            "correct/all_correct_groups": float((solved == sizes).float().mean()),
            "correct/all_wrong_groups": float((solved == 0).float().mean()),
            "completion/length_mean": float(lengths.mean()),
            "completion/length_max": float(lengths.max()),
            "completion/truncated": float(rollouts.truncated.float().mean()),
            "completion/empty": float((lengths <= 1).float().mean()),
            "verifier/no_answer": reasons["no_answer"] / n,
            "verifier/timeout": reasons["timeout"] / n,
            "verifier/parse_error": reasons["parse_error"] / n,
            "advantage/mean": float(kept_values.mean()),
            "advantage/std": float(kept_values.std()) if kept_values.numel() > 1 else 0.0,
            "advantage/max_abs": float(kept_values.abs().max()),
            "advantage/kept": float(kept.float().mean()),
        }

    # ------------------------------------------------------------------ optimisation
    def micro_batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Cut ``rows`` into micro-batches; whole groups per micro-batch when it holds ≥ one group."""
        size, group = self.recipe.trainer.micro_batch_size, self.recipe.rollout.group_size
        if size >= group:
            size = size // group * group
        return [rows[i : i + size] for i in range(0, len(rows), size)]

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

        The loss of each micro-batch is divided by the step normaliser summed over all ranks and
        multiplied by the number of ranks, so DDP's gradient averaging yields the global sum. The
        policy loss is scaled by ``algorithm.pg_coef``; PACED's loss, when on, is divided by its own
        step-global Σw (``rltk/trainer/paced.py``) and added.
        """
        acc = self.accelerator
        mask_all = batch.rollouts.completion_mask * batch.advantages.kept().float().unsqueeze(-1)
        step_mask = mask_all[rows]
        local = self.pipeline.normalizer(step_mask, self.recipe.rollout.max_new_tokens)
        normalizer = self._reduce_sum(local)
        pg_coef = self.recipe.algorithm.pg_coef
        use_pg = pg_coef > 0 and normalizer > 0
        plan = None if self.paced is None else self.paced.plan(batch.rollouts, rows, self.step, self._reduce_sum)
        paced_metrics = {} if plan is None else self._paced_step_metrics(plan)
        use_paced = plan is not None and not plan.skipped
        if not (use_pg or use_paced):
            return {"loss": 0.0, "empty_step": 1.0, **paced_metrics}
        needs_entropy = "entropy" in self.needs
        temperature = self.recipe.rollout.temperature
        loss_total = torch.zeros((), dtype=torch.float64)
        token_sums: dict[str, float] = defaultdict(float)
        token_count = 0.0
        kl_sum = 0.0
        t_forward = t_backward = 0.0
        chunks = self.micro_batches(rows)
        for i, mb in enumerate(chunks):
            with micro_batch_sync(acc, self.model, last=i == len(chunks) - 1):
                start = time.perf_counter()
                out = forward_logps(self.model, batch.tokens.rows(mb), temperature, with_entropy=needs_entropy,
                                    with_final_hidden=use_paced, head=self.head)
                mask_mb = mask_all[mb].to(out.logps.device)
                loss, token_metrics = torch.zeros((), device=out.logps.device), {}
                if use_pg:
                    loss, token_metrics = self._policy_loss(batch, mb, out, mask_mb, normalizer)
                    loss = pg_coef * loss
                if use_paced:
                    paced, token_kl = self.paced.loss(acc.unwrap_model(self.model), out.final_hidden,
                                                      batch.teacher_tokens.rows(mb), batch.rollouts.completion_mask[mb],
                                                      plan.weights[mb], plan)
                    loss = loss + paced * acc.num_processes
                    kl_sum += float(token_kl.sum())
                t_forward += time.perf_counter() - start
                start = time.perf_counter()
                acc.backward(loss)
                t_backward += time.perf_counter() - start
            loss_total += loss.detach().double().cpu() / acc.num_processes
            for name, value in token_metrics.items():
                token_sums[name] += float((value.detach() * mask_mb).sum())
            token_count += float(mask_mb.sum())
        if use_paced:
            tokens = self._reduce_sum(float(batch.rollouts.completion_mask[rows].sum()))
            paced_metrics[f"paced/kl_{plan.direction}"] = self._reduce_sum(kl_sum) / max(tokens, 1.0)
        metrics = {"loss": float(acc.reduce(loss_total.to(acc.device), "sum")),
                   "time/forward": t_forward, "time/backward": t_backward}
        sums = acc.reduce(torch.tensor([token_count, *token_sums.values()], dtype=torch.float64, device=acc.device), "sum")
        for name, total in zip(token_sums, sums[1:].tolist()):
            metrics[name] = total / max(float(sums[0]), 1.0)
        return {**metrics, **paced_metrics}

    def _policy_loss(self, batch: RolloutBatch, mb: torch.Tensor, out, mask_mb: torch.Tensor, normalizer: float):
        """The pipeline's aggregated policy loss of micro-batch ``mb`` (× ranks) and its token metrics."""
        rollouts_mb = batch.rollouts.select(mb)
        if out.entropy is not None:
            rollouts_mb = replace(rollouts_mb, entropy=out.entropy)
        adv = batch.advantages
        adv_mb = Advantages(adv.values[mb], None if adv.keep is None else adv.keep[mb])
        per_token, token_metrics = self.pipeline.per_token_loss(out.logps, rollouts_mb, adv_mb)
        loss = self.pipeline.aggregate(per_token, mask_mb, normalizer) * self.accelerator.num_processes
        if batch.answer_sft is not None:
            loss = loss + self._answer_sft_loss(batch, mb, normalizer)
        return loss, token_metrics

    def _reduce_sum(self, value: float) -> float:
        acc = self.accelerator
        return float(acc.reduce(torch.tensor(value, dtype=torch.float64, device=acc.device), "sum"))

    def _paced_step_metrics(self, plan) -> dict[str, float]:
        """The step's KL direction (0 forward, 1 reverse) and skipped all-zero-weight steps so far."""
        if plan.skipped:
            self.counters["paced_skipped_steps"] += 1
        return {"paced/reverse": float(plan.direction == "reverse"), "paced/skipped": float(plan.skipped),
                "paced/skipped_steps": float(self.counters["paced_skipped_steps"])}

    def _answer_sft_loss(self, batch: RolloutBatch, mb: torch.Tensor, normalizer: float) -> torch.Tensor:
        """−weight_m · log p(gold answer | prompt, rationale_m), aggregated like the policy loss."""
        out = forward_logps(self.model, batch.answer.tokens.rows(mb), self.recipe.rollout.temperature, head=self.head)
        keep = batch.advantages.kept()[mb].float().unsqueeze(-1)
        mask = (batch.answer.answer_mask[mb] * keep).to(out.logps.device)
        weights = batch.answer_sft[mb].to(out.logps.device).unsqueeze(-1)
        return self.pipeline.aggregate(-weights * out.logps, mask, normalizer) * self.accelerator.num_processes

    def _apply_update(self, metrics: dict[str, float]) -> None:
        """Optimizer step, or skip and count it when the loss, the gradient or the updated weights
        or optimizer state would not be finite (rltk/trainer/guard.py)."""
        if not self.guard.step(self.optimizer, self.scheduler, metrics, self.step + 1):
            self.counters["skipped_nonfinite_steps"] += 1
        else:
            self.engine.sync_weights()  # the engine samples from the new weights from its next generate on

    def train_batch(self) -> dict[str, float]:
        """Collect one rollout batch and run its ``ppo_epochs × mini_batches`` optimizer steps.

        A stage, sampler or reward function that raises or returns the wrong type or shape stops
        training with one line (:class:`TrainingError`) naming it, its function and the step; the
        traceback is logged at debug level (``rltk -v``)."""
        from rewards.registry import RewardError

        try:
            return self._train_batch()
        except (StageFailure, RewardError) as exc:
            log.debug("step %d: user code failed", self.step + 1, exc_info=True)
            last = self._last_good_checkpoint()
            kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written yet"
            raise TrainingError(f"step {self.step + 1}: {exc.where} {exc.detail}; {kept} "
                                "(rltk -v logs the traceback)") from exc

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
        metrics = {k: sum(v) / len(v) for k, v in step_metrics.items()}
        for key in ("time/forward", "time/backward"):
            metrics[key] = sum(step_metrics[key])
        metrics.update(self._mean_over_ranks(batch.metrics))
        metrics["time/step"] = time.perf_counter() - start
        return metrics

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(keys, self.accelerator.reduce(values, "mean").tolist()))

    # ------------------------------------------------------------------ evaluation and the loop
    def evaluate(self, tag: str) -> dict[str, Any]:
        """Held-out pass@k of the current policy; written under ``<output_dir>/eval/<tag>``."""
        e, r = self.recipe.eval, self.recipe.rollout
        settings = EvalSettings(n=e.n, ks=tuple(e.ks) if e.ks else None, temperature=e.temperature, top_p=e.top_p,
                                max_new_tokens=e.max_new_tokens or r.max_new_tokens, batch_size=e.batch_size,
                                maj=e.maj, seed=self.recipe.trainer.seed)
        protocol = {"model": self.policy_path, "step": self.step, "template": self.recipe.data.template,
                    "heldout": self.heldout}
        with generation_session(self.engine):
            return evaluate(self.engine, self.test_examples, self.test_prompts, self.verifier, settings,
                            accelerator=self.accelerator, out_dir=self.out / "eval" / tag, protocol=protocol,
                            progress=self.recipe.logging.progress)

    def train(self, evaluate_before: bool = True) -> dict[str, Any]:
        """Run to ``trainer.steps``; returns before/after evaluation reports and the final checkpoint."""
        t, acc = self.recipe.trainer, self.accelerator
        self.run.start(self.step)  # the run's identity, before its first metrics line
        metrics_log = MetricsLog(acc, self.out, self.recipe.logging.report_to, self.recipe.logging.project,
                                 self.recipe.to_dict(), resume_step=self.step if self.step else -1)
        if acc.is_main_process:
            atomic_write_json(self.out / "recipe.json", self.recipe.to_dict())
        result: dict[str, Any] = {"start_step": self.step}
        if self.step == 0 and evaluate_before:
            result["before"] = self.evaluate(f"step-{0:06d}")
            metrics_log.log(0, _eval_metrics(result["before"]["summary"]))
        bar = progress_bar(t.steps, self.step, self.recipe.logging.progress and acc.is_main_process)
        try:
            while self.step < t.steps:
                metrics = self.train_batch()
                bar.update(self.updates_per_batch)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", correct=f"{metrics['correct/mean']:.3f}",
                                step_s=f"{metrics['time/step']:.2f}")
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    metrics.update(_eval_metrics(self.evaluate(f"step-{self.step:06d}")["summary"]))
                metrics_log.log(self.step, metrics)
                if t.save_every and self.step % t.save_every == 0 and self.step < t.steps:
                    self.save()
        finally:
            bar.close()
        resumed = self.resumed_checkpoint
        final = resumed if resumed is not None and resumed.name == f"step-{self.step:06d}" else self.save()
        result["after"] = self.evaluate(f"step-{self.step:06d}")
        metrics_log.log(self.step, _eval_metrics(result["after"]["summary"]))
        metrics_log.close()
        result.update(final_checkpoint=str(final), model_dir=str(final / "model"), counters=dict(self.counters))
        if acc.is_main_process:
            atomic_write_json(self.out / "result.json", {
                k: (v["summary"] if isinstance(v, dict) and "summary" in v else v) for k, v in result.items()})
        if t.push_to_hub and acc.is_main_process:  # last, so a failed upload loses nothing
            push_to_hub(final, t.push_to_hub)
        return result

    def close(self) -> None:
        self.verifier.close()


def _longest_generation(recipe: Recipe) -> int:
    return max(recipe.rollout.max_new_tokens, recipe.eval.max_new_tokens or 0)


def _eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    out = {f"eval/pass@{k}": v for k, v in summary["pass@k"].items()}
    out["eval/avg@n"] = summary["avg@n"]
    return out

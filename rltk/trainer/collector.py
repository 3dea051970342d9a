"""The rollout collector (docs/design.md §10, "Collector and optimizer apart"): prompts in, a scored
:class:`~rltk.trainer.batch.RolloutBatch` out — the sampler's prompts for this rank, generation,
verification and rewards, the forwards the stages asked for, sampler→trainer importance weights,
advantages and the batch's metrics. The optimizer loop (rltk/trainer/rl.py) only consumes batches.

:meth:`RolloutCollector.collect` is the one call a producer makes: the synchronous loop calls it
before each batch's optimizer steps; an asynchronous producer can call it ahead, on the weights of
an earlier step, as long as it tags the batch with that step.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from rltk.algos.pipeline import Algorithm, StageFailure
from rltk.algos.samplers import ProbeContext, Sampler
from rltk.algos.types import Advantages, Rollouts, flat_groups
from rltk.describe import describe_exception
from rltk.engines.base import SamplingParams, rank_shard
from rltk.io import atomic_write_json
from rltk.schema import ConfigError, Recipe
from rltk.trainer.answers import answer_logps, build_answer_batch
from rltk.trainer.batch import RewardCall, RolloutBatch, add_requested_forwards, score_rewards
from rltk.trainer.distributed import generation_session
from rltk.trainer.logprobs import ForwardOptions, TokenBatch
from rltk.trainer.refill import Refill, ScoredGroups


class JsonProbeCache:
    """A probing sampler's cache as one JSON file in the run directory (``pairing_probe.json``):
    ``{"fingerprint": ..., "probes": {...}}``, replaced atomically on every store."""

    def __init__(self, path: Path):
        self.path = path

    def load(self, fingerprint: str) -> dict[str, Any]:
        stored = json.loads(self.path.read_text()) if self.path.is_file() else {}
        return stored.get("probes", {}) if stored.get("fingerprint") == fingerprint else {}

    def store(self, fingerprint: str, probes: dict[str, Any]) -> None:
        atomic_write_json(self.path, {"fingerprint": fingerprint, "probes": probes})


@dataclass
class TrainingData:
    """The training prompts the collector samples from: examples and their rendered prompts."""

    examples: list
    prompts: list[str]


class RolloutCollector:
    """Turns the sampler's next prompts into this rank's scored rollout batch.

    ``policy`` is the (prepared) model the requested forwards run on, ``reference`` a context
    manager yielding the frozen reference; ``counters`` are the trainer's (``reward_none`` is
    counted here)."""

    def __init__(self, recipe: Recipe, accelerator, algorithm: Algorithm, sampler: Sampler, engine, verifier,
                 reward_fns, data: TrainingData, *, tokenizer, policy, reference: Callable, needs: set[str],
                 correction, paced, options: ForwardOptions, counters: dict[str, int], updates_per_batch: int):
        self.recipe, self.accelerator, self.algorithm = recipe, accelerator, algorithm
        self.sampler, self.engine, self.verifier, self.reward_fns = sampler, engine, verifier, reward_fns
        self.data, self.tokenizer, self.policy, self.reference = data, tokenizer, policy, reference
        self.needs, self.correction, self.paced, self.forward_options = needs, correction, paced, options
        self.counters, self.updates_per_batch = counters, updates_per_batch
        self.step = 0  # the optimizer step the batch being collected is trained from

    def attach_prober(self, cache_path: Path, fingerprint: str) -> None:
        """Lend the sampler :meth:`probe` (only samplers that select by success rate use it)."""
        self.sampler.attach(ProbeContext(self.probe, self.recipe.rollout.group_size,
                                         [e.id for e in self.data.examples], JsonProbeCache(cache_path), fingerprint))

    def collect(self, step: int) -> RolloutBatch:
        """This rank's share of the next rollout batch, trained from optimizer step ``step``: both
        halves, :meth:`produce` then :meth:`consume` (the synchronous loop)."""
        scored, metrics = self.produce(step)
        return self.consume(scored, metrics, step)

    def produce(self, step: int) -> tuple[ScoredGroups, dict[str, float]]:
        """The generation half: the sampler's next prompts, generated, verified and rewarded; with
        ``rollout.dynamic_sampling`` refilled until its groups are informative (rltk/trainer/refill.py).
        Touches neither the policy nor the optimizer, so an asynchronous producer can run it ahead
        (rltk/trainer/producer.py). Returns the groups and the sampler's and refill's metrics."""
        self.step = step
        scored = self.sample_and_score(*self.next_prompts())
        refill_metrics = {}
        if self.recipe.rollout.dynamic_sampling:
            scored, refill_metrics = self.refill(scored)
        return scored, {**self.sampler.metrics(), **refill_metrics}

    def consume(self, scored: ScoredGroups, metrics: dict[str, float], step: int) -> RolloutBatch:
        """The training half: the forwards on the current weights, importance weights, advantages."""
        t, acc = self.recipe.trainer, self.accelerator
        per_rank = t.prompts_per_step // acc.num_processes
        first_group = step // self.updates_per_batch * t.prompts_per_step + acc.process_index * per_rank
        batch = self.finish_batch(scored, first_group, step)
        batch.metrics.update(metrics)
        return batch

    def next_prompts(self) -> tuple[list[int], list[str] | None]:
        """This rank's share of the sampler's next ``prompts_per_step`` prompts, and their roles."""
        sampler = self.sampler
        try:
            indices = sampler.next_indices(self.recipe.trainer.prompts_per_step)
        except Exception as exc:
            raise StageFailure(self.algorithm.sampler.stage, f"next_indices raised {describe_exception(exc)}") from exc
        roles = sampler.last_roles if sampler.provides_roles else None
        return self.rank_share(indices), self.rank_share(roles) if roles else None

    def refill(self, first: ScoredGroups) -> tuple[ScoredGroups, dict[str, float]]:
        """Further rounds of ``prompts_per_step`` prompts until every rank holds its quota of
        informative groups or ``rollout.max_refill_rounds`` extra rounds were run; every rank runs
        as many rounds (generation is collective under ZeRO-3)."""
        r = self.recipe.rollout
        refill = Refill(len(first.indices), r.group_size)
        refill.add(first)
        while refill.rounds <= r.max_refill_rounds and self.any_rank_missing(refill.missing):
            refill.add(self.sample_and_score(*self.next_prompts()))
        return refill.result(self.tokenizer.pad_token_id)

    def any_rank_missing(self, missing: int) -> bool:
        acc = self.accelerator
        if acc.num_processes == 1:
            return missing > 0
        check_may_gather("dynamic sampling", acc.num_processes)
        return bool(acc.gather(torch.tensor([missing], device=acc.device)).max() > 0)

    def rank_share(self, indices: list) -> list:
        """This rank's part of every mini-batch's block of ``indices`` (prompts, or their roles)."""
        t, acc = self.recipe.trainer, self.accelerator
        per_update = t.prompts_per_step // t.mini_batches
        per_rank_update = per_update // acc.num_processes
        mine = []
        for m in range(t.mini_batches):
            block = indices[m * per_update : (m + 1) * per_update]
            mine.extend(block[acc.process_index * per_rank_update : (acc.process_index + 1) * per_rank_update])
        return mine

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
                generation = self.engine.generate([self.data.prompts[i] for i in part], SamplingParams(
                    n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    max_new_tokens=r.max_new_tokens))
                answers = [self.data.examples[i].answer for i in part for _ in range(r.group_size)]
                correct = [v.correct for v in self.verifier.score(generation.texts, answers)]
                counts += [(i, sum(correct[k * r.group_size : (k + 1) * r.group_size])) for k, i in enumerate(part)]
        counts = counts[: len(counts) - padding]  # a collective engine's padding repeats are not probes
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            check_may_gather("the sampler's probe", acc.num_processes)
            counts = gather_object(counts)
        found = dict(counts)
        return [found[i] for i in indices]

    def rollout_batch(self, mine: list[int], first_group: int, roles: list[str] | None = None) -> RolloutBatch:
        """Sample groups for training prompts ``mine``, score them, run the requested forwards and
        compute advantages. ``first_group`` makes group ids unique across steps and ranks; ``roles``
        are the sampler's per-prompt roles, if any."""
        return self.finish_batch(self.sample_and_score(mine, roles), first_group, self.step)

    def sample_and_score(self, mine: list[int], roles: list[str] | None) -> ScoredGroups:
        """Generate ``group_size`` completions for each training prompt of ``mine``, verify and
        reward them."""
        r = self.recipe.rollout
        examples = [self.data.examples[i] for i in mine]
        prompts = [self.data.prompts[i] for i in mine]
        timings = {}
        start = time.perf_counter()
        generation = self.engine.generate(prompts, SamplingParams(
            n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
            return_logps=self.correction.enabled))
        timings["time/generate"] = time.perf_counter() - start
        start = time.perf_counter()
        answers = [e.answer for e in examples for _ in range(r.group_size)]
        verdicts = self.verifier.score(generation.texts, answers)
        rewards, per_reward, missing = score_rewards(self.reward_call(examples, prompts, generation), verdicts,
                                                     self.reward_fns)
        timings["time/score"] = time.perf_counter() - start
        scored = ScoredGroups(list(mine), None if roles is None else list(roles), generation, verdicts, rewards,
                              per_reward, timings, reward_none=missing)
        if self.sampler.wants_outcomes:
            self.report_outcomes(scored)
        return scored

    def report_outcomes(self, scored: ScoredGroups) -> None:
        """Every process's groups' correct counts, gathered, to the sampler (``Sampler.observe``), so
        the sampler's state stays the same on every rank."""
        g = self.recipe.rollout.group_size
        correct = [sum(v.correct for v in scored.verdicts[k * g : (k + 1) * g]) for k in range(len(scored.indices))]
        outcomes = list(zip(scored.indices, correct))
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            check_may_gather("the sampler's observe", self.accelerator.num_processes)
            outcomes = gather_object(outcomes)
        self.sampler.observe([i for i, _ in outcomes], [c for _, c in outcomes], g)

    def finish_batch(self, scored: ScoredGroups, first_group: int, step: int) -> RolloutBatch:
        """The forwards the stages asked for, importance weights, advantages and metrics of ``scored``."""
        t, r = self.recipe.trainer, self.recipe.rollout
        examples = [self.data.examples[i] for i in scored.indices]
        prompts = [self.data.prompts[i] for i in scored.indices]
        generation, verdicts, rewards, per_reward = scored.generation, scored.verdicts, scored.rewards, scored.per_reward
        answers = [e.answer for e in examples for _ in range(r.group_size)]
        timings = {**scored.timings, **reward_metrics(per_reward)}
        self.counters["reward_none"] += scored.reward_none  # counted when trained: an in-flight batch is not
        roles = tuple(scored.roles) if scored.roles is not None else None
        tokens = TokenBatch(generation.prompt_ids, generation.prompt_mask, generation.completion_ids,
                            generation.completion_mask)
        rollouts = Rollouts(
            group_ids=(torch.arange(len(examples)) + first_group).repeat_interleave(r.group_size),
            rewards=rewards,
            correct=torch.tensor([v.correct for v in verdicts], dtype=torch.bool),
            completion_mask=generation.completion_mask.float(),
            truncated=generation.truncated,
            roles=roles,
            step=step,
        )
        start = time.perf_counter()
        rollouts = add_requested_forwards(rollouts, tokens, self.needs, policy=self.policy, reference=self.reference,
                                          temperature=r.temperature, chunk_size=t.logprob_chunk_size,
                                          options=self.forward_options)
        rollouts, is_metrics = self.correction.apply(rollouts, generation.sampling_logps)
        timings.update(is_metrics)
        answer_batch = None
        if "answer_logps" in self.needs:
            answer_batch = build_answer_batch(tokens, generation.texts, answers, self.tokenizer,
                                              self.recipe.data.answer_template)
            rollouts = replace(rollouts, answer_logps=answer_logps(self.policy, answer_batch, r.temperature,
                                                                   t.logprob_chunk_size, self.forward_options))
        timings["time/extra_forwards"] = time.perf_counter() - start
        pipeline = self.algorithm.pipeline
        advantages, stage_metrics = pipeline.compute_advantages(rollouts)
        reasons = defaultdict(int)
        for v in verdicts:
            reasons[v.reason] += 1
        if rollouts.answer_logps is not None:
            timings["answer/logp_mean"] = float(rollouts.answer_logps.mean())
            timings["answer/prob_mean"] = float(rollouts.answer_logps.exp().mean())
        metrics = {**batch_metrics(rollouts, advantages, reasons), **stage_metrics, **timings}
        answer_sft = pipeline.answer_sft_weights(rollouts, advantages) if answer_batch is not None else None
        teacher_tokens = None
        if self.paced is not None:
            teacher_tokens = self.paced.teacher_tokens(tokens, examples, prompts, r.group_size)
            metrics.update(self.paced.batch_metrics(rollouts))
        return RolloutBatch(tokens, rollouts, advantages, generation.texts, metrics, answer_batch, answer_sft,
                            teacher_tokens, prompts=[p for p in prompts for _ in range(r.group_size)],
                            rewards_by_function=per_reward)

    def reward_call(self, examples, prompts: list[str], generation) -> RewardCall:
        """The keyword arguments of every reward function for this batch (TRL's contract)."""
        from transformers import TrainerState

        g = self.recipe.rollout.group_size
        chat = [e.messages is not None for e in examples for _ in range(g)]
        rows = [reward_columns(e) for e in examples for _ in range(g)]
        names = {name for row in rows for name in row}
        return RewardCall(
            prompts=[list(e.messages) if e.messages is not None else p for e, p in zip(examples, prompts)
                     for _ in range(g)],
            completions=[[{"role": "assistant", "content": text}] if c else text
                         for text, c in zip(generation.texts, chat)],
            completion_ids=[ids[mask.bool()].tolist() for ids, mask in zip(generation.completion_ids,
                                                                              generation.completion_mask)],
            columns={name: [row.get(name) for row in rows] for name in sorted(names)},
            trainer_state=TrainerState(global_step=self.step, max_steps=self.recipe.trainer.steps))


def reward_columns(example) -> dict[str, Any]:
    """The dataset columns a reward function gets for ``example``'s row: every column but the prompt,
    rltk's gold ``answer`` and the ``question`` text, and the worked ``solution`` when the data has
    one and no column of that name."""
    columns = {**example.columns, "answer": example.answer, "question": example.question}
    if example.solution is not None:
        columns.setdefault("solution", example.solution)
    return columns


def check_reward_columns(reward_fns, example) -> None:
    """Every reward function finds the dataset columns it needs (its required parameters rltk does not
    pass itself) in the rows: a one-line ConfigError naming the reward, the columns and the row's."""
    from rltk.describe import function_name

    columns = reward_columns(example)
    for reward in reward_fns:
        missing = reward.missing_columns(columns)
        if missing:
            raise ConfigError(f"rewards: reward '{reward.label}' ({function_name(reward.fn)}) needs the dataset "
                              f"column{'s' if len(missing) > 1 else ''} {', '.join(missing)}, which the rows do not "
                              f"have (they have {', '.join(sorted(columns))}); map it with data.answer_field / "
                              "data.solution_field or add it to the data")


def reward_metrics(per_reward: dict[str, torch.Tensor]) -> dict[str, float]:
    """``reward/<name>/mean`` and ``/std`` of each reward over the completions it scored (None excluded)."""
    metrics = {}
    for label, values in per_reward.items():
        scored = values[~values.isnan()]
        metrics[f"reward/{label}/mean"] = float(scored.mean()) if scored.numel() else math.nan
        metrics[f"reward/{label}/std"] = float(scored.std()) if scored.numel() > 1 else 0.0
    return metrics


def check_may_gather(what: str, world: int) -> None:
    """Called before a gather over ``world`` > 1 processes: from the asynchronous producer's thread a
    collective would interleave with the trainer thread's in a different order on each process, so it
    is one line instead of a hang (validate.py refuses the known cases at load)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"{what} gathers over processes, which asynchronous generation cannot do on "
                           f"{world} processes; set rollout.max_staleness: 0")


def batch_metrics(rollouts: Rollouts, advantages: Advantages, reasons: dict[str, int]) -> dict[str, float]:
    """Rollout statistics of one rank's batch (the trainer averages them over ranks)."""
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
        "reward/zero_variance_groups": float(flat_groups(rollouts.rewards, index, groups).float().mean()),
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

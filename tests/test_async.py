"""Asynchronous generation with bounded staleness (``rollout.max_staleness``, rltk/trainer/producer.py):
the producer's path at staleness 0 is the synchronous loop exactly, the observed staleness never
exceeds the bound whichever side is slow, the checkpoint holds the sampler as of the last trained
batch, and a producer failure reaches the trainer as one line."""
from __future__ import annotations

import json
import time

import pytest
import torch

from rltk.schema import ConfigError
from rltk.trainer.rl import RLTrainer
from rltk.validate import build_recipe, check_layout
from tests.conftest import small_recipe_data


def weights(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()])


def run_steps(recipe, steps: int, producer_staleness: int | None = None, slow_produce: float = 0.0,
              slow_optimize: float = 0.0):
    trainer = RLTrainer(recipe)
    try:
        if slow_produce or slow_optimize:
            produce, optimize = trainer.collector.produce, trainer.optimize

            def slow_p(step):
                time.sleep(slow_produce)
                return produce(step)

            def slow_o(batch, rows):
                time.sleep(slow_optimize)
                return optimize(batch, rows)

            trainer.collector.produce, trainer.optimize = slow_p, slow_o
        torch.manual_seed(11)
        if producer_staleness is not None:
            trainer.start_producer(max_staleness=producer_staleness)
        metrics = [trainer.train_batch() for _ in range(steps)]
        return metrics, weights(trainer), trainer.consumed_sampler_state
    finally:
        trainer.close()


@pytest.mark.parametrize("producer", ["thread", "process"])
def test_producer_at_staleness_zero_is_the_synchronous_loop(tmp_path, tiny_model_dir, producer):
    """5 steps: the same losses, rewards and final weights, bit for bit, through the producer (sampling
    a copy of the policy refreshed between batches, in a thread or in a worker process with weights in
    shared memory and the caller's RNG state) as in the synchronous loop. The worker takes half the
    torch threads, and the trainer has them back after close()."""
    threads = torch.get_num_threads()
    steps = {"trainer": {"steps": 5}}
    sync_m, sync_w, _ = run_steps(build_recipe(small_recipe_data(tiny_model_dir, tmp_path / "a", **steps)), 5)
    async_m, async_w, _ = run_steps(build_recipe(small_recipe_data(
        tiny_model_dir, tmp_path / "b", rollout={"producer": producer}, **steps)), 5, producer_staleness=0)
    assert [m["loss"] for m in async_m] == [m["loss"] for m in sync_m]
    assert [m["reward/mean"] for m in async_m] == [m["reward/mean"] for m in sync_m]
    assert all(m["async/staleness"] == 0.0 for m in async_m)
    assert torch.equal(async_w, sync_w)
    assert sync_m[-1]["loss"] != sync_m[0]["loss"]  # the steps did change something
    assert [m.get("async/worker_restarts") for m in async_m] == [0.0 if producer == "process" else None] * 5
    assert torch.get_num_threads() == threads


def test_a_killed_worker_is_restarted_and_its_batch_is_the_same(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """SIGKILL the generation worker while it holds the second batch's request: it is restarted
    (logged, counted in async/worker_restarts) and the request is sent again with the same RNG
    state, so 3 steps end on the very weights of a run without the kill."""
    import os
    import signal

    from rltk.engines.worker import ProcessEngine

    recipe = lambda out: build_recipe(small_recipe_data(tiny_model_dir, out, rollout={"producer": "process"},
                                                        trainer={"steps": 3}))
    _, plain_w, _ = run_steps(recipe(tmp_path / "a"), 3, producer_staleness=0)
    receive, calls = ProcessEngine._receive, []

    def kill_on_second_request(engine):
        calls.append(engine.process.pid)
        if len(calls) == 2:
            os.kill(engine.process.pid, signal.SIGKILL)
        return receive(engine)

    monkeypatch.setattr(ProcessEngine, "_receive", kill_on_second_request)
    with caplog.at_level("WARNING", logger="rltk.engines.worker"):
        metrics, killed_w, _ = run_steps(recipe(tmp_path / "b"), 3, producer_staleness=0)
    assert [m["async/worker_restarts"] for m in metrics] == [0.0, 1.0, 1.0]
    assert calls[2] != calls[1]  # the request went to a new worker
    assert "the generation worker died (exit code -9); restarting it" in caplog.text
    assert torch.equal(killed_w, plain_w)


def test_a_worker_that_keeps_dying_or_fails_is_one_line(tiny_model_dir):
    import os
    import signal

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rltk.engines.base import SamplingParams
    from rltk.engines.worker import ProcessEngine, WorkerError

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = ProcessEngine(model, tokenizer, threads=1, max_restarts=1)
    try:
        with pytest.raises(WorkerError, match=r"^the generation worker failed: ValueError: .*temperature"):
            engine.generate(["12+34="], SamplingParams(n=2, temperature=-1.0, max_new_tokens=4))
        real_start = engine._start

        def start_and_kill():
            real_start()
            os.kill(engine.process.pid, signal.SIGKILL)

        engine._start = start_and_kill
        os.kill(engine.process.pid, signal.SIGKILL)
        with pytest.raises(WorkerError, match=r"^the generation worker died 2 times in a row on one request "
                                              r"\(last exit code -9\)"):
            engine.generate(["12+34="], SamplingParams(n=2, max_new_tokens=4))
        assert engine.restarts == 1
    finally:
        engine.close()
    assert engine.process is None


def test_a_hanging_reward_stops_the_trainer_after_the_producer_timeout(tmp_path, tiny_model_dir):
    """rollout.producer_timeout_s: a reward function that hangs is one line naming the setting and
    what the producer was doing, and the checkpoint written before it is intact."""
    from rltk.trainer.guard import TrainingError
    from tests.user_stages import RELEASE_HANGING_REWARD

    data = small_recipe_data(tiny_model_dir, tmp_path, rewards=[{"name": "tests.user_stages:hanging_reward"}],
                             rollout={"max_staleness": 1, "producer": "thread", "producer_timeout_s": 1.5})
    trainer = RLTrainer(build_recipe(data))
    RELEASE_HANGING_REWARD.clear()
    try:
        saved = trainer.save()
        start = time.monotonic()
        with pytest.raises(TrainingError, match=r"^step 1: the producer made no rollout batch in 1.5 s "
                                                r"\(rollout.producer_timeout_s\); it is producing rollout batch 0 "
                                                r"\(sampling, verifying, rewarding\): a reward function or the engine "
                                                r"may hang; the last good checkpoint .* is intact$"):
            trainer.train_batch()
        assert time.monotonic() - start < 10
        assert (saved / "trainer.json").is_file()
    finally:
        RELEASE_HANGING_REWARD.set()
        trainer.close()


@pytest.mark.parametrize("slow", ["producer", "trainer"])
def test_staleness_never_exceeds_the_bound(tmp_path, tiny_model_dir, slow):
    """max_staleness 1, with the producer or the trainer made slow by 0.3 s a batch: every batch is
    trained at most 1 step after the weights that sampled it; with a slow trainer the producer runs
    ahead, so batches are exactly 1 step stale after the first two; the importance weights are on."""
    data = small_recipe_data(tiny_model_dir, tmp_path, rollout={"max_staleness": 1}, trainer={"steps": 5})
    recipe = build_recipe(data)
    metrics, _, _ = run_steps(recipe, 5, slow_produce=0.3 if slow == "producer" else 0.0,
                              slow_optimize=0.3 if slow == "trainer" else 0.0)
    staleness = [m["async/staleness"] for m in metrics]
    assert all(0 <= s <= 1 for s in staleness), staleness
    assert staleness[0] == 0.0 and staleness[1] == 1.0  # batches 0 and 1 both come from the initial weights
    if slow == "trainer":
        assert staleness == [0.0, 1.0, 1.0, 1.0, 1.0]
    # decoupled PPO's importance weights: 1 for a batch sampled by the very weights it is trained
    # on (the first), off 1 once the sampling weights are a step old
    assert metrics[0]["is/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert metrics[0]["is/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert any(abs(m["is/ratio_max"] - 1.0) > 1e-4 for m in metrics[1:])


def test_checkpoint_holds_the_sampler_of_the_last_trained_batch(tmp_path, tiny_model_dir):
    data = small_recipe_data(tiny_model_dir, tmp_path, rollout={"max_staleness": 2},
                             trainer={"steps": 6, "save_every": 3})
    trainer = RLTrainer(build_recipe(data))
    try:
        torch.manual_seed(0)
        trainer.start_producer()
        for _ in range(3):
            trainer.train_batch()
        time.sleep(1.0)  # let the producer run ahead (up to 2 batches)
        saved = trainer.save()
    finally:
        trainer.close()
    state = json.loads((saved / "trainer.json").read_text())
    # 3 batches of 4 prompts consumed: the uniform sampler stands at position 12, whatever ran ahead
    assert state["sampler"]["position"] == 12, state["sampler"]


def test_a_whole_run_with_evaluation_checkpoints_and_resume(tmp_path, tiny_model_dir):
    """train() with a producer: evaluation in between (the producer paused), checkpoints, and a
    resume that regenerates the batches that were in flight and ends at the same step count."""
    from rltk.workflows import train

    common = {"rollout": {"max_staleness": 1}, "trainer": {"steps": 4, "save_every": 2, "eval_every": 2}}
    first = small_recipe_data(tiny_model_dir, tmp_path, **common)
    first["trainer"]["steps"] = 2
    train(build_recipe(first), evaluate_before=False)
    result = train(build_recipe(small_recipe_data(tiny_model_dir, tmp_path, **common)), evaluate_before=False,
                   resume=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4]  # each step once: the resumed run starts at batch 2
    assert all(r["async/staleness"] <= 1 for r in rows if "loss" in r)
    assert result["after"]["summary"]["pass@k"]


def test_producer_failure_is_raised_in_the_trainer(tmp_path, tiny_model_dir):
    from rltk.trainer.guard import TrainingError

    data = small_recipe_data(tiny_model_dir, tmp_path, rollout={"max_staleness": 1},
                             rewards=[{"name": "tests.user_stages:raising_reward"}])
    trainer = RLTrainer(build_recipe(data))
    try:
        with pytest.raises(TrainingError, match=r"^step 1: .*raising_reward.*raised ValueError: no reward today"):
            trainer.train_batch()
    finally:
        trainer.close()


def test_bad_staleness_settings_are_one_line(tiny_model_dir):
    model = {"name_or_path": tiny_model_dir}
    with pytest.raises(ConfigError, match="^rollout.max_staleness: -1 is negative"):
        build_recipe({"model": model, "rollout": {"max_staleness": -1}})
    with pytest.raises(ConfigError, match="^rollout.max_staleness > 0 trains on completions sampled by older"):
        build_recipe({"model": model, "rollout": {"max_staleness": 1, "importance_sampling": {"enabled": False}}})
    with pytest.raises(ConfigError, match="^rollout.producer: 'fork' is not one of auto, thread, process"):
        build_recipe({"model": model, "rollout": {"producer": "fork"}})
    with pytest.raises(ConfigError, match="^rollout.producer: process applies to the hf engine only"):
        build_recipe({"model": model, "rollout": {"engine": "vllm", "producer": "process"}})
    with pytest.raises(ConfigError, match="^rollout.producer_threads: -1 is negative"):
        build_recipe({"model": model, "rollout": {"producer_threads": -1}})
    with pytest.raises(ConfigError, match="^rollout.producer_timeout_s: -1.0 is negative"):
        build_recipe({"model": model, "rollout": {"producer_timeout_s": -1.0}})
    # on several processes the producer must run no collective: what would gather is refused
    two = {"model": model, "rollout": {"max_staleness": 1}, "trainer": {"prompts_per_step": 4}}
    check_layout(build_recipe(two), 2)
    for change, why in (({"rollout": {"dynamic_sampling": True}}, "rollout.dynamic_sampling"),
                        ({"algorithm": {"sampler": "difficulty_pools"}}, "the difficulty_pools sampler"),
                        ({"algorithm": {"sampler": "pairing", "advantage": [{"name": "weighted_grpo"}]}},
                         "the pairing sampler")):
        data = {**two, **{k: {**two.get(k, {}), **v} for k, v in change.items()}}
        with pytest.raises(ConfigError, match=rf"^rollout.max_staleness \(1\) on 2 processes: the producer would "
                                              rf"gather over processes for {why}"):
            check_layout(build_recipe(data), 2)


@pytest.mark.distributed
def test_two_processes_generate_asynchronously(tmp_path, tiny_model_dir):
    """2 DDP processes over gloo with max_staleness 1, each with its own producer and generation
    worker: 4 steps, each logged once and at most 1 step stale, no worker restarted; then 2 more
    steps resumed from the step-4 checkpoint."""
    import os
    import sys

    import yaml

    from tests.conftest import launch_with_free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def launch(steps: int, *extra: str) -> None:
        data = small_recipe_data(tiny_model_dir, tmp_path / "run", rollout={"max_staleness": 1},
                                 trainer={"steps": steps, "save_every": 2})
        path = tmp_path / f"recipe-{steps}.yaml"
        path.write_text(yaml.safe_dump(data))
        launch_with_free_port(lambda port: (
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
             f"--master_port={port}", "-m", "rltk", "train", str(path), *extra],
            {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root, "ACCELERATE_USE_CPU": "true"}))

    launch(4)
    launch(6, "--resume")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5, 6]
    assert all(0 <= r["async/staleness"] <= 1 and r["async/worker_restarts"] == 0 for r in trained)


def test_a_gather_from_the_producer_thread_is_one_line():
    """A user sampler that gathers from the producer's thread on several processes: one line, not a hang."""
    import threading

    from rltk.trainer.collector import check_may_gather

    check_may_gather("the sampler's probe", 2)  # the trainer's (main) thread may gather
    raised = []

    def producer():
        try:
            check_may_gather("the sampler's probe", 2)
        except RuntimeError as exc:
            raised.append(str(exc))

    thread = threading.Thread(target=producer)
    thread.start()
    thread.join()
    assert raised == ["the sampler's probe gathers over processes, which asynchronous generation cannot do on 2 "
                      "processes; set rollout.max_staleness: 0"]

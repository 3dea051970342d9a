"""The vllm engine's glue, without vLLM (it cannot run on a CPU machine; docs/vllm.md says what this covers).

- ``FakeGeneration`` stands in for trl's ``VLLMGeneration`` and records its constructor arguments,
  weight syncs and generate calls: argument mapping from the recipe, outputs mapped to rltk's
  ``Generation``, one sync hook per optimizer step over two real trainer steps on the tiny model.
- trl's real ``VLLMGeneration`` runs with a fake ``vllm.LLM`` (colocate: wake/sleep order, weights
  loaded) and a fake ``VLLMClient`` (server mode: URL, ports, timeout, sampling arguments).
- Missing vLLM: ``rltk train``/``rltk eval`` fail with one line naming ``pip install -e ".[vllm]"``, exit 2,
  before any model loads and without writing anything.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import rltk.engines.vllm as vllm_mod
from rltk.validate import build_recipe
from rltk.engines.base import SamplingParams
from rltk.engines.vllm import MISSING_VLLM, VLLMEngine, generation_kwargs, vllm_available
from tests.conftest import small_recipe_data

ROOT = Path(__file__).resolve().parents[1]


class FakeGeneration:
    """Records what rltk asks of ``VLLMGeneration``; returns scripted completions.

    ``script(prompt_ids) -> list of completion token-id lists`` (cycled over the n samples);
    default: 3 tokens + EOS for even rows, ``max_completion_length`` tokens (truncated) for odd."""

    instances: list["FakeGeneration"] = []

    def __init__(self, *, model, accelerator, processing_class, **kwargs):
        self.model, self.accelerator, self.tokenizer, self.kwargs = model, accelerator, processing_class, kwargs
        self.temperature, self.top_p, self.top_k = kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]
        self.max_completion_length = kwargs["max_completion_length"]
        self.events: list[tuple] = []
        self.script = None
        FakeGeneration.instances.append(self)

    def sync_weights(self):
        self.events.append(("sync",))

    def generate(self, prompts, images, num_generations):
        self.events.append(("generate", len(prompts), num_generations, self.temperature, self.top_p, self.top_k,
                            self.max_completion_length))
        tok = self.tokenizer
        digit = tok.convert_tokens_to_ids("7")
        completions, logprobs = [], []
        for i, ids in enumerate(prompts):
            if self.script is not None:
                options = self.script(tuple(ids))
                row = options[i % len(options)]
            elif i % 2 == 0:
                row = [digit, digit, digit, tok.eos_token_id]
            else:
                row = [digit] * self.max_completion_length
            completions.append(row)
            logprobs.append([[-0.5 - 0.1 * t] for t in range(len(row))])
        return [list(p) for p in prompts], completions, logprobs, None


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeGeneration.instances = []
    monkeypatch.setattr(vllm_mod, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_mod, "generation_class", lambda: FakeGeneration)
    return FakeGeneration


def _recipe(model_dir, tmp_path, **rollout):
    return build_recipe(small_recipe_data(model_dir, tmp_path, rollout={"engine": "vllm", **rollout}))


def _tokenizer(model_dir):
    from rltk.models import load_tokenizer

    return load_tokenizer(model_dir)


# --------------------------------------------------------------------------- argument mapping


def test_recipe_maps_onto_vllm_generation_arguments(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path, temperature=0.9, top_p=0.8, top_k=20, max_new_tokens=12,
                     vllm={"mode": "server", "server_host": "10.0.0.2", "server_port": 8123, "server_timeout": 30.0,
                           "group_port": 51300, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.45,
                           "enable_sleep_mode": True, "max_num_seqs": 64})
    kwargs = generation_kwargs(recipe.rollout, max_prompt_length=100, max_new_tokens=40, trust_remote_code=True)
    assert kwargs == {
        "mode": "server", "server_host": "10.0.0.2", "server_port": 8123, "server_timeout": 30.0, "group_port": 51300,
        "tensor_parallel_size": 2, "gpu_memory_utilization": 0.45, "max_model_length": 140, "max_num_seqs": 64,
        "enable_sleep_mode": True, "trust_remote_code": True, "temperature": 0.9, "top_p": 0.8, "top_k": 20,
        "max_completion_length": 12, "logprobs": 0,
    }
    explicit = _recipe(tiny_model_dir, tmp_path, vllm={"max_model_length": 256}).rollout
    assert generation_kwargs(explicit, max_prompt_length=100)["max_model_length"] == 256
    import inspect

    from trl.generation.vllm_generation import VLLMGeneration

    accepted = set(inspect.signature(VLLMGeneration.__init__).parameters)
    assert set(kwargs) <= accepted  # every mapped argument exists in trl 1.16's VLLMGeneration


def test_create_passes_the_unwrapped_model_accelerator_and_tokenizer(tiny_model_dir, tmp_path, fake_vllm):
    from accelerate import Accelerator

    from rltk.models import load_model
    from rltk.engines.factory import make_engine

    recipe = _recipe(tiny_model_dir, tmp_path)
    model, tok, acc = load_model(tiny_model_dir, recipe.model), _tokenizer(tiny_model_dir), Accelerator(cpu=True)
    engine = make_engine(recipe.rollout, lambda: model, tok, 64, accelerator=acc, model_cfg=recipe.model,
                         max_new_tokens=16)
    (fake,) = fake_vllm.instances
    assert isinstance(engine, VLLMEngine) and fake.model is model and fake.accelerator is acc and fake.tokenizer is tok
    assert fake.kwargs["mode"] == "colocate" and fake.kwargs["max_model_length"] == 64 + 16
    assert fake.kwargs["gpu_memory_utilization"] == recipe.rollout.vllm.gpu_memory_utilization


# --------------------------------------------------------------------------- outputs


def test_generate_maps_outputs_to_rltk_generation(tiny_model_dir, fake_vllm):
    tok = _tokenizer(tiny_model_dir)
    fake = FakeGeneration(model=None, accelerator=None, processing_class=tok, temperature=1.0, top_p=1.0, top_k=0,
                          max_completion_length=5)
    engine = VLLMEngine(fake, tok, {tok.eos_token_id})
    prompts = ["Q: 1+2=? A:", "Q: 10+20=? A:"]
    gen = engine.generate(prompts, SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=3, max_new_tokens=6,
                                                  return_logps=True))
    # one push before the first generate; sampling knobs set per call; duplicates contiguous
    assert fake.events[0] == ("sync",)
    assert fake.events[1] == ("generate", 4, 2, 0.7, 0.9, 3, 6)
    d, eos, pad = tok.convert_tokens_to_ids("7"), tok.eos_token_id, tok.pad_token_id
    assert gen.completion_ids.tolist() == [[d, d, d, eos, pad, pad], [d] * 6] * 2
    assert gen.completion_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6] * 2
    assert gen.truncated.tolist() == [False, True, False, True]
    expected = [[-0.5, -0.6, -0.7, -0.8, 0.0, 0.0], [-0.5, -0.6, -0.7, -0.8, -0.9, -1.0]] * 2
    torch.testing.assert_close(gen.sampling_logps, torch.tensor(expected))
    assert gen.texts == ["777", "777777"] * 2
    short, long = (len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert gen.prompt_mask.sum(-1).tolist() == [short, short, long, long]
    assert gen.prompt_ids[0, -short:].tolist() == tok(prompts[0], add_special_tokens=False)["input_ids"]
    assert (gen.prompt_ids[0, : long - short] == pad).all()  # left padding
    assert engine.generate(prompts, SamplingParams(n=1, max_new_tokens=6)).sampling_logps is None


def test_truncation_uses_every_stop_token_and_the_length(tiny_model_dir):
    tok = _tokenizer(tiny_model_dir)
    other_stop = tok.convert_tokens_to_ids("9")
    engine = VLLMEngine(None, tok, {tok.eos_token_id, other_stop})
    gen = engine.to_generation([[1, 2], [1, 2], [1, 2]], [[5, 5, other_stop], [5, 5, 5], [5]], None,
                               SamplingParams(max_new_tokens=3))
    # a stop token (any of them) at the end is not truncation; max_new_tokens without one is; shorter = stopped
    assert gen.truncated.tolist() == [False, True, False]
    assert gen.completion_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]


# --------------------------------------------------------------------------- weight sync in the trainer


def test_two_trainer_steps_sync_once_per_optimizer_step(tiny_model_dir, tmp_path, fake_vllm):
    from rltk.trainer.rl import RLTrainer

    trainer = RLTrainer(_recipe(tiny_model_dir, tmp_path))
    try:
        engine = trainer.engine
        (fake,) = fake_vllm.instances
        assert isinstance(engine, VLLMEngine)
        assert fake.model is trainer.accelerator.unwrap_model(trainer.model)
        tok = trainer.tokenizer
        digit, plus = tok.convert_tokens_to_ids("7"), tok.convert_tokens_to_ids("+")
        fake.script = lambda ids: [[digit, digit, digit, tok.eos_token_id], [digit, plus, plus, tok.eos_token_id]]
        hooks = []
        original = engine.sync_weights
        engine.sync_weights = lambda: (hooks.append(trainer.step), original())[1]
        before = [p.detach().clone() for p in trainer.model.parameters()]
        first = trainer.train_batch()
        second = trainer.train_batch()
        assert trainer.step == 2 and hooks == [0, 1]  # the hook ran after each optimizer step
        kinds = [e[0] for e in fake.events]
        # a push before the first generation, then one per step before the next generation; none is wasted
        assert kinds == ["sync", "generate", "sync", "generate"] and engine.stale
        assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
        # importance sampling is on by default with vllm: old_logps computed, ratios logged
        assert "old_logps" in trainer.needs
        for metrics in (first, second):
            assert {"is/ratio_min", "is/ratio_mean", "is/ratio_max", "is/masked_share"} <= set(metrics)
            assert 0 < metrics["is/ratio_min"] <= metrics["is/ratio_mean"] <= metrics["is/ratio_max"]
    finally:
        trainer.close()


def test_async_producer_pushes_weights_between_batches_under_the_lock(tiny_model_dir, tmp_path, fake_vllm):
    """max_staleness 1 with the vllm engine: the producer samples with the trainer's vllm engine,
    pushes the newest weights before a batch whose version changed (never during one, and never
    while the trainer changes them), and the trainer's update marks nothing stale itself."""
    from rltk.trainer.rl import RLTrainer

    trainer = RLTrainer(build_recipe(small_recipe_data(tiny_model_dir, tmp_path, trainer={"steps": 3},
                                                       rollout={"engine": "vllm", "max_staleness": 1})))
    try:
        (fake,) = fake_vllm.instances
        engine = trainer.engine
        locked = []
        push = engine.push_weights

        def checked_push():
            locked.append(trainer.producer.weights_lock.locked())
            push()

        engine.push_weights = checked_push
        metrics = [trainer.train_batch() for _ in range(3)]
        assert trainer.collector.engine is engine
        assert locked and all(locked)  # every push under the weights lock
        kinds = [e[0] for e in fake.events]
        # batches 0 and 1 from version 0 (one push), batch 2 from version 1 (a second push)
        assert kinds == ["sync", "generate", "generate", "sync", "generate"]
        assert [m["async/staleness"] for m in metrics] == [0.0, 1.0, 1.0]
        assert [m["async/version"] for m in metrics] == [0.0, 0.0, 1.0]
    finally:
        trainer.close()


# --------------------------------------------------------------------------- trl's VLLMGeneration with fakes


class FakeLLM:
    """``vllm.LLM`` as trl's colocate path uses it; records every call in ``log``."""

    log: list = []

    def __init__(self, **kwargs):
        FakeLLM.log = [("init", kwargs)]
        loaded = self.loaded = []
        model = SimpleNamespace(load_weights=lambda pairs: (loaded.extend(pairs), FakeLLM.log.append(("load",)))[0])
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model))))

    def sleep(self, level):
        FakeLLM.log.append(("sleep", level))

    def wake_up(self, tags):
        FakeLLM.log.append(("wake", tuple(tags)))

    def reset_prefix_cache(self):
        FakeLLM.log.append(("reset",))

    def generate(self, prompts, sampling_params, use_tqdm):
        FakeLLM.log.append(("generate", len(prompts), sampling_params))
        out = SimpleNamespace(token_ids=[7, 8], logprobs=[{7: SimpleNamespace(logprob=-0.25, rank=1)},
                                                          {8: SimpleNamespace(logprob=-0.75, rank=1)}])
        return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[out]) for p in prompts]


class FakeClient:
    """``trl.generation.vllm_client.VLLMClient``; records calls."""

    log: list = []

    def __init__(self, **kwargs):
        FakeClient.log = [("init", kwargs)]

    def init_communicator(self, device):
        FakeClient.log.append(("communicator",))

    def update_named_params(self, metadata, params):
        FakeClient.log.append(("update", len(metadata), len(list(params))))

    def reset_prefix_cache(self):
        FakeClient.log.append(("reset",))

    def generate(self, prompts, features, **sampling):
        FakeClient.log.append(("generate", prompts, sampling))
        n = sampling["n"]
        return {"prompt_ids": prompts, "completion_ids": [[7, 8, 9]] * (len(prompts) * n),
                "logprobs": [[[-0.1], [-0.2], [-0.3]]] * (len(prompts) * n)}


@pytest.fixture
def trl_with_fakes(monkeypatch):
    import trl.generation.vllm_generation as vg

    monkeypatch.setattr(vg, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vg, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(vg, "SamplingParams", lambda **kw: dict(kw), raising=False)
    monkeypatch.setattr(vg, "VLLMClient", FakeClient)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # trl sets these; restore after
        monkeypatch.setenv(key, os.environ.get(key, "0" if "RANK" in key else ("1" if key == "WORLD_SIZE" else
                                                                                 "localhost" if key == "MASTER_ADDR"
                                                                                 else "29511")))
    return vg


def _real_engine(tiny_model_dir, tmp_path, **vllm):
    from accelerate import Accelerator

    from rltk.models import load_model

    recipe = _recipe(tiny_model_dir, tmp_path, vllm=vllm)
    model = load_model(tiny_model_dir, recipe.model)
    tok = _tokenizer(tiny_model_dir)
    return VLLMEngine.create(recipe.rollout, lambda: model, tok, accelerator=Accelerator(cpu=True),
                             max_prompt_length=64, model_cfg=recipe.model), model


def test_colocate_sleep_mode_order_with_trls_vllm_generation(tiny_model_dir, tmp_path, trl_with_fakes, monkeypatch):
    monkeypatch.setattr(vllm_mod, "vllm_available", lambda: True)
    engine, model = _real_engine(tiny_model_dir, tmp_path, mode="colocate", enable_sleep_mode=True,
                                 gpu_memory_utilization=0.4)
    init = FakeLLM.log[0][1]
    assert (init["model"], init["gpu_memory_utilization"], init["enable_sleep_mode"]) == (model.name_or_path, 0.4, True)
    assert init["logprobs_mode"] == "processed_logprobs"  # post-temperature log-probs, as the trainer computes
    assert FakeLLM.log[1] == ("sleep", 2)
    n_params = len(list(model.named_parameters()))

    def calls():
        out, FakeLLM.log[:] = [e[0] if e[0] != "wake" and e[0] != "sleep" else e for e in FakeLLM.log], []
        return out

    calls()
    gen = engine.generate(["Q: 1+2=? A:"], SamplingParams(n=3, temperature=0.6, max_new_tokens=4, return_logps=True))
    expected = [("wake", ("weights",)), *["load"] * n_params, "reset", ("wake", ("kv_cache",)), "generate",
                ("sleep", 2)]
    assert calls() == expected  # weights pushed awake, KV cache woken to sample, back to sleep for training
    assert gen.completion_ids.tolist() == [[7, 8]] * 3
    torch.testing.assert_close(gen.sampling_logps, torch.tensor([[-0.25, -0.75]] * 3))
    loaded = dict(engine.generator.llm.loaded[:n_params])
    for name, param in model.named_parameters():
        assert torch.equal(loaded[name], param.data)
    engine.sync_weights()  # after an optimizer step: the next generate pushes again, still in the same order
    engine.generate(["Q: 1+2=? A:"], SamplingParams(n=1, max_new_tokens=4))
    assert calls() == expected


def test_server_mode_arguments_with_trls_vllm_generation(tiny_model_dir, tmp_path, trl_with_fakes, monkeypatch):
    monkeypatch.setattr(vllm_mod, "vllm_available", lambda: True)
    engine, model = _real_engine(tiny_model_dir, tmp_path, mode="server", server_host="10.1.2.3", server_port=8123,
                                 server_timeout=12.0, group_port=51300)
    assert FakeClient.log[0] == ("init", {"base_url": "http://10.1.2.3:8123", "group_port": 51300,
                                          "connection_timeout": 12.0})
    assert FakeClient.log[1] == ("communicator",)
    tok = engine.tokenizer
    prompts = ["Q: 1+2=? A:", "Q: 3+4=? A:"]
    gen = engine.generate(prompts, SamplingParams(n=4, temperature=0.7, top_p=0.9, max_new_tokens=5))
    n_params = len(list(model.named_parameters()))
    assert FakeClient.log[2] == ("update", n_params, n_params)  # weights streamed before the first generation
    assert FakeClient.log[3] == ("reset",)
    _, sent, sampling = FakeClient.log[4]
    assert sent == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]  # each prompt once, n = 4
    assert (sampling["n"], sampling["temperature"], sampling["top_p"], sampling["max_tokens"], sampling["logprobs"]) \
        == (4, 0.7, 0.9, 5, 0)
    assert gen.completion_ids.shape == (8, 3) and gen.truncated.tolist() == [False] * 8


# --------------------------------------------------------------------------- vLLM missing


def _write_vllm_recipe(tmp_path) -> Path:
    out = tmp_path / "run"
    recipe = {"model": {"name_or_path": "Qwen/Qwen2.5-Math-7B"},  # loading it offline would fail differently
              "data": {"source": "builtin"}, "rollout": {"engine": "vllm"},
              "trainer": {"output_dir": str(out)}, "logging": {"progress": False}}
    path = tmp_path / "vllm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
@pytest.mark.parametrize("command", ["train", "eval"])
def test_missing_vllm_fails_before_any_model_loads(tmp_path, command):
    recipe = _write_vllm_recipe(tmp_path)
    args = ["train", str(recipe)] if command == "train" else [
        "eval", "--model", "Qwen/Qwen2.5-Math-7B", "--recipe", str(recipe), "--out", str(tmp_path / "eval")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "rltk", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=240)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"rltk: error: {MISSING_VLLM}"]
    assert 'pip install -e ".[vllm]"' in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vllm.yaml"]  # no run or eval directory written


def test_missing_vllm_in_library_calls_is_a_config_error(tmp_path, monkeypatch):
    from rltk.schema import ConfigError
    from rltk.trainer.rl import RLTrainer

    monkeypatch.setattr(vllm_mod, "vllm_available", lambda: False)
    import rltk.trainer.rl

    monkeypatch.setattr(rltk.trainer.rl, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    recipe = build_recipe({"rollout": {"engine": "vllm"}, "trainer": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[vllm\]"'):
        RLTrainer(recipe)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- rltk eval on the vllm engine


def _eval_inputs(tiny_model_dir, tmp_path):
    from rltk.data.recipe import build_prompts, load_test_split

    recipe = build_recipe(small_recipe_data(tiny_model_dir, tmp_path))
    tok = _tokenizer(tiny_model_dir)
    examples = load_test_split(recipe.data, 2, seed=0)
    return tok, examples, build_prompts(examples, recipe.data, tok)


def test_eval_n1024_on_the_vllm_engine_gives_the_hf_report_form(tiny_model_dir, tmp_path, fake_vllm):
    """n = 1024 samples for 2 problems: problem 0 half right, problem 1 all wrong -> exact pass@k; the
    report, protocol, per-problem entries, files and samples have the hf engine's form."""
    import json

    from rewards.math import MathVerifier
    from rltk.eval.runner import EvalSettings, evaluate
    from rltk.models import load_model
    from rltk.engines.hf import HFEngine

    tok, examples, prompts = _eval_inputs(tiny_model_dir, tmp_path)
    ids = [tuple(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    boxed = lambda text: tok(f"\\boxed{{{text}}}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    scripts = {ids[0]: [boxed(examples[0].answer), boxed("-1")], ids[1]: [boxed("-1")]}
    fake = FakeGeneration(model=None, accelerator=None, processing_class=tok, temperature=1.0, top_p=1.0, top_k=0,
                          max_completion_length=8)
    fake.script = scripts.__getitem__
    vllm_engine = VLLMEngine(fake, tok, {tok.eos_token_id})
    model = load_model(tiny_model_dir, build_recipe({}).model, trainable=False)
    hf_engine = HFEngine(lambda: model, tok, batch_size=1024)
    settings = EvalSettings(n=1024, temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=1024, maj=True)
    reports = {}
    with MathVerifier(deadline_s=5.0, num_workers=1) as verifier:
        for name, engine in [("vllm", vllm_engine), ("hf", hf_engine)]:
            reports[name] = evaluate(engine, examples, prompts, verifier, settings, out_dir=tmp_path / name,
                                     protocol={"model": name, "template": "compact"}, progress=False)
    # batching per problem by n: one call of 1024 completions per problem
    assert [e[1:3] for e in fake.events if e[0] == "generate"] == [(1024, 1024), (1024, 1024)]
    v, h = reports["vllm"], reports["hf"]
    summary = v["summary"]
    assert summary["pass@k"][1] == pytest.approx(0.25) and summary["avg@n"] == pytest.approx(0.25)
    assert summary["pass@k"][2] == pytest.approx((1 - (512 * 511) / (1024 * 1023)) / 2)
    assert summary["pass@k"][1024] == pytest.approx(0.5)
    assert [p["c"] for p in v["per_problem"]] == [512, 0]
    assert list(summary["pass@k"]) == [2**i for i in range(11)]
    # identical form: same keys everywhere, same files, same sample fields
    assert set(summary) == set(h["summary"]) and list(summary["pass@k"]) == list(h["summary"]["pass@k"])
    assert list(summary["maj@k"]) == list(h["summary"]["maj@k"])
    assert set(v["protocol"]) == set(h["protocol"])
    assert [set(p) for p in v["per_problem"]] == [set(p) for p in h["per_problem"]]
    assert sorted(p.name for p in (tmp_path / "vllm").iterdir()) == sorted(p.name for p in (tmp_path / "hf").iterdir())
    rows = {name: (tmp_path / name / "samples.jsonl").read_text().splitlines() for name in ("vllm", "hf")}
    assert len(rows["vllm"]) == len(rows["hf"]) == 2048
    assert set(json.loads(rows["vllm"][0])) == set(json.loads(rows["hf"][0]))


def test_eval_pads_short_shards_for_collective_engines(tiny_model_dir, tmp_path, monkeypatch):
    """3 problems on 2 processes: rank 1 holds 1 problem, but makes the same calls as rank 0 (2 prompts)
    and drops the padding's results."""
    import accelerate.utils

    from rewards.math import MathVerifier
    from rltk.data.recipe import build_prompts, load_test_split
    from rltk.eval.runner import EvalSettings, evaluate

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: obj)  # this rank's share only
    recipe = build_recipe(small_recipe_data(tiny_model_dir, tmp_path))
    tok = _tokenizer(tiny_model_dir)
    examples = load_test_split(recipe.data, 3, seed=0)
    prompts = build_prompts(examples, recipe.data, tok)
    fake = FakeGeneration(model=None, accelerator=None, processing_class=tok, temperature=1.0, top_p=1.0, top_k=0,
                          max_completion_length=4)
    engine = VLLMEngine(fake, tok, {tok.eos_token_id})
    rank1 = SimpleNamespace(process_index=1, num_processes=2, is_main_process=False)
    settings = EvalSettings(n=2, max_new_tokens=4, batch_size=16, maj=False)
    with MathVerifier(deadline_s=5.0, num_workers=1) as verifier:
        report = evaluate(engine, examples, prompts, verifier, settings, accelerator=rank1, progress=False)
    assert [e[1] for e in fake.events if e[0] == "generate"] == [4]  # 2 prompts × n = 2, as rank 0 sends
    assert [p["id"] for p in report["per_problem"]] == [examples[1].id]  # the padding was dropped


def test_probe_pads_short_shards_for_collective_engines(tiny_model_dir, tmp_path, monkeypatch):
    """The pairing probe over 3 prompts on 2 processes: rank 1 holds 1 prompt but sends 2, as rank 0
    does, and gathers only its real probe (the padding repeat is dropped)."""
    import accelerate.utils

    from rewards.math import MathVerifier
    from rltk.data.recipe import build_prompts, load_test_split
    from rltk.trainer.collector import RolloutCollector, TrainingData

    gathered = []
    monkeypatch.setattr(accelerate.utils, "gather_object",
                        lambda obj: gathered.append(list(obj)) or [(0, 0), (2, 0), *obj])  # + rank 0's share
    recipe = build_recipe(small_recipe_data(tiny_model_dir, tmp_path))
    tok = _tokenizer(tiny_model_dir)
    examples = load_test_split(recipe.data, 3, seed=0)
    fake = FakeGeneration(model=None, accelerator=None, processing_class=tok, temperature=1.0, top_p=1.0, top_k=0,
                          max_completion_length=4)
    with MathVerifier(deadline_s=5.0, num_workers=1) as verifier:
        host = SimpleNamespace(recipe=recipe, accelerator=SimpleNamespace(process_index=1, num_processes=2),
                               engine=VLLMEngine(fake, tok, {tok.eos_token_id}), step=0, verifier=verifier,
                               data=TrainingData(examples, build_prompts(examples, recipe.data, tok)))
        counts = RolloutCollector.probe(host, [0, 1, 2])
    group = recipe.rollout.group_size
    assert [e[1] for e in fake.events if e[0] == "generate"] == [2 * group]  # 2 prompts × G, as rank 0 sends
    assert len(gathered) == 1 and [i for i, _ in gathered[0]] == [1]  # only the real probe is gathered
    assert len(counts) == 3 and 0 <= counts[1] <= group

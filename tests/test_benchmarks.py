"""The benchmarks' instruments: step_time's heavy-tailed length forcing and padding count, and
gpu_step's whole run on CPU with the tiny configuration (benchmarks/configs/tiny.json)."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_step, step_time


def test_heavy_lengths_are_seeded_per_row():
    first = step_time.draw_lengths(0, 500, 24, seed=3)
    assert first == step_time.draw_lengths(0, 500, 24, seed=3)  # the same for both sides
    # a row's length depends on its index alone: one call of 500 rows = calls of 20 and 480 rows
    assert step_time.draw_lengths(0, 20, 24, seed=3) + step_time.draw_lengths(20, 480, 24, seed=3) == first
    assert first != step_time.draw_lengths(500, 500, 24, seed=3)  # the next step gets other lengths
    assert first != step_time.draw_lengths(0, 500, 24, seed=4)
    assert all(1 <= n <= 16 * 24 for n in first)
    long = sum(n > 24 for n in first)
    assert 25 <= long <= 80  # 10% of 500 long, give or take


def test_forced_lengths_hold_on_both_sides_paths(tiny_model_dir):
    """rltk's hf engine (eos_token_id as an int argument; through generate and through rltk's own
    decode loop, rollout.drop_finished) and a TRL-style call (a GenerationConfig with a list of EOS
    ids) all end every row exactly at its drawn length, call after call."""
    from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin

    from rltk.engines.base import SamplingParams, completion_mask_from_ids
    from rltk.engines import hf
    from rltk.engines.hf import HFEngine
    from rltk.models import load_tokenizer

    original, original_decode = GenerationMixin.generate, hf.sample_dropping_finished
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = ["Q: 1+2\nA: ", "Q: 13+22\nA: ", "Q: 7+5\nA: "]
    limit = 4 * 3

    def draw(first, rows):
        return step_time.draw_lengths(first, rows, 3, long_share=0.4, long_factor=4, seed=1)

    with step_time.forced_lengths(draw) as rltk_side:
        engine = HFEngine(lambda: model, tokenizer)
        for _ in range(2):
            out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=limit))
            assert out.completion_mask.sum(1).tolist() == rltk_side["calls"][-1]
            assert not out.truncated.any()
    with step_time.forced_lengths(draw) as dropping:
        engine = HFEngine(lambda: model, tokenizer, drop_finished=True)
        for _ in range(2):
            out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=limit))
            assert out.completion_mask.sum(1).tolist() == dropping["calls"][-1]
            assert not out.truncated.any()
    with step_time.forced_lengths(draw) as trl_side:
        encoded = tokenizer([p for p in prompts for _ in range(2)], return_tensors="pt", padding=True)
        config = GenerationConfig(max_new_tokens=limit, do_sample=True, eos_token_id=[tokenizer.eos_token_id],
                                  pad_token_id=tokenizer.pad_token_id)
        for _ in range(2):
            ids = model.generate(**encoded, generation_config=config)[:, encoded["input_ids"].shape[1]:]
            mask, truncated = completion_mask_from_ids(ids, tokenizer.eos_token_id)
            assert mask.sum(1).tolist() == trl_side["calls"][-1]
            assert not truncated.any()
    assert rltk_side["calls"] == trl_side["calls"] == dropping["calls"]
    assert rltk_side["rows"] == trl_side["rows"] == dropping["rows"] == 2 * 6
    assert any(n > 3 for call in rltk_side["calls"] for n in call)  # long rows were drawn and held
    assert GenerationMixin.generate is original and hf.sample_dropping_finished is original_decode  # restored


def test_padding_summary_sources():
    masked = [{"positions": 100, "real": 60, "unmasked": 0, "forwards": 2}]
    out = step_time.padding_summary(masked, [])
    assert out["padding_share"] == pytest.approx(0.4) and out["padding_source"] == "attention masks"
    assert "logged_note" not in out  # TRL logs nothing and needs no note
    out = step_time.padding_summary(masked, [{}])
    assert "predates" in out["logged_note"]  # an rltk without the metric is named
    packed = [{"positions": 80, "real": 0, "unmasked": 80, "forwards": 1}]
    out = step_time.padding_summary(packed, [{"tokens/forward": 80.0, "tokens/padding_share": 0.05}])
    assert out["padding_share"] == pytest.approx(0.05) and out["padding_source"].startswith("rltk metric")
    out = step_time.padding_summary(packed, [{}])
    assert out["padding_share"] is None and "unknown" in out["padding_note"]


def test_gpu_step_runs_on_cpu_with_the_tiny_config(tmp_path):
    path = tmp_path / "report.json"
    report = gpu_step.main(["--tiny", "--peak-tflops", "1", "--json", str(path), "--work-dir", str(tmp_path / "w")])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert report["config"]["dtype"] == "float32" and not report["config"]["isolated"]
    assert report["params"] > 0 and report["peak_flops"] == 1e12
    for side in ("rltk", "trl"):
        r = report[side]
        assert "error" not in r, r
        for key in ("step_s", "tokens_per_s", "real_tokens_per_step", "positions_per_step", "mfu"):
            assert r[key] > 0, (side, key)
        assert r["peak_memory_gib"] is None  # CPU
        assert 0 <= r["padding_share"] < 1 and r["padding_source"] == "attention masks"
        # the forward hook's real tokens (attention masks) are the scripted prompt + completion tokens
        assert r["hooked_real_tokens_per_step"] == r["real_tokens_per_step"]
        assert r["padding_share_scripted"] == pytest.approx(r["padding_share"])
        assert r["training_forwards"] == 16 // 4  # 4 × 4 completions in micro-batches of 4 rows
    assert report["same_real_tokens"] and report["rltk"]["real_tokens_all"] == report["trl"]["real_tokens_all"]
    assert report["ratio_step_time_rltk_over_trl"] > 0 and report["ratio_tokens_per_s_rltk_over_trl"] > 0
    generation = report["rltk"]["generation"]
    assert generation["new_tokens"] > 0 and generation["tokens_per_s"] > 0


def test_gpu_step_script_and_tokenizer():
    args = gpu_step.parse_args(["--tiny"])
    tokenizer, first_plain = gpu_step.build_tokenizer(512)
    assert len(tokenizer) == 512 and tokenizer.decode([511]) == "<t252>"
    script = gpu_step.Script(args, 512, tokenizer.eos_token_id, first_plain)
    rows = [script.completion(0, j) for j in range(200)]
    assert rows == [script.completion(0, j) for j in range(200)]
    assert all(1 <= len(r) <= args.max_completion for r in rows)
    assert all(r[-1] == tokenizer.eos_token_id for r in rows if len(r) < args.max_completion)
    assert all(min(r[:-1] or [first_plain]) >= first_plain for r in rows)
    assert len({len(r) for r in rows}) > 10  # spread lengths
    rewards = gpu_step.scripted_reward(completion_ids=rows)
    assert len(set(rewards)) > 10 and all(0 <= x <= 1 for x in rewards)
    prompts = gpu_step.make_prompts(args)
    assert [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts] == [len(p) for p in prompts]
    with pytest.raises(SystemExit):
        gpu_step.parse_args(["--tiny", "--micro-batch-size", "3"])  # not whole groups


def test_async_step_runs_both_loops_on_the_stand_in_and_locally(tiny_model_dir):
    """benchmarks/async_step.py at a toy size: the stand-in's latency is the calibrated training time,
    the asynchronous runs see staleness 0 then 1, never more, and both ratios are reported."""
    from benchmarks import async_step

    threads = torch.get_num_threads()
    try:
        report = async_step.main(["--steps", "2", "--warmup", "1", "--prompts", "4", "--group-size", "2",
                                  "--max-new-tokens", "4", "--local", "--model-dir", tiny_model_dir,
                                  "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
    runs = {r["name"]: r for r in report["runs"]}
    assert sorted(runs) == ["async", "async-process", "async-thread", "sync", "sync-local"]
    assert report["latency"] == report["calibration"]["train_s"] == runs["sync"]["latency"] == runs["async"]["latency"]
    assert runs["sync"]["staleness_seen"] == [0.0] and runs["async"]["staleness_seen"] == [0.0, 1.0]
    assert runs["async-process"]["staleness_seen"] == runs["async-thread"]["staleness_seen"] == [0.0, 1.0]
    assert report["ratio_stand_in"] == runs["async"]["step_s"] / runs["sync"]["step_s"]
    for producer in ("process", "thread"):
        assert report[f"ratio_{producer}"] == runs[f"async-{producer}"]["step_s"] / runs["sync-local"]["step_s"]

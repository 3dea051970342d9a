"""Generation batching of the hf engine: ``rollout.max_tokens_per_batch`` (rows sorted by prompt
length, cut into generate calls by a token budget, returned in the original order) and
``rollout.continuous_batching`` (transformers' ``generate_batch``) against the plain path."""
from __future__ import annotations

import functools

import pytest
import torch

from rltk.engines.base import SamplingParams
from rltk.engines.hf import HFEngine, plan_token_batches
from rltk.schema import ConfigError

# prompt lengths 5, 7, 13, 2, 13, 4, 3 (the tiny tokenizer is one token per character)
PROMPTS = ["1+11=", "12+34=?", "123+456+789=?", "7=", "99+1+2+3+4+5=", "7+7=", "ab="]
GREEDY = SamplingParams(n=3, top_k=1, max_new_tokens=12, return_logps=True)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    """The tiny model with its weights scaled ×6 and 6 added to the EOS logit (a hook on the LM head):
    a random init at its own scale greedily repeats one token for every prompt, which would make
    any row order look right; so changed, the greedy completions differ by prompt and end in EOS
    after 1 to 7 tokens, or not at all within 12."""
    from transformers import AutoModelForCausalLM

    from rltk.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6)

    def eos_bias(module, inputs, output):
        output[..., tok.eos_token_id] += 6.0

    model.lm_head.register_forward_hook(eos_bias)
    model.train()  # the engine must put it back in this mode
    return model, tok


def record_calls(model):
    """Wrap ``model.generate`` to record each call's input_ids shape; returns the list."""
    calls = []
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    model.generate = generate
    return calls


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


_PLAIN: dict = {}


def plain_and(model, tok, params, **engine_kwargs):
    """(plain Generation, other Generation, the other engine's generate call shapes); the plain
    path's Generation is computed once per SamplingParams (greedy: the same every time)."""
    if params not in _PLAIN:
        _PLAIN[params] = HFEngine(lambda: model, tok, batch_size=4).generate(PROMPTS, params)
    plain = _PLAIN[params]
    calls = record_calls(model)
    try:
        other = HFEngine(lambda: model, tok, batch_size=4, **engine_kwargs).generate(PROMPTS, params)
    finally:
        del model.generate  # the instance attribute; the class method is back
    return plain, other, calls


def test_plan_sorts_longest_first_and_respects_budget_and_rows():
    lengths = [5, 7, 13, 2, 14, 4]
    calls = plan_token_batches(lengths, max_new_tokens=6, max_tokens=60, max_rows=3)
    # sorted 14, 13, 7, 5, 4, 2: 3 × 20 = 60 fits, then 3 rows of ≤ 7 + 6 (39 tokens), stable order
    assert calls == [[4, 2, 1], [0, 5, 3]]
    assert plan_token_batches(lengths, max_new_tokens=6, max_tokens=40, max_rows=8) == [[4, 2], [1, 0, 5], [3]]
    # equal lengths keep their original order; a row larger than the budget is a call of its own
    assert plan_token_batches([3, 3, 3, 3], 1, 8, 8) == [[0, 1], [2, 3]]
    assert plan_token_batches([50, 3], 10, 20, 8) == [[0], [1]]


def test_default_path_is_batch_size_rows_in_order(model_and_tokenizer):
    model, tok = model_and_tokenizer
    calls = record_calls(model)
    try:
        out = HFEngine(lambda: model, tok, batch_size=4).generate(PROMPTS, SamplingParams(n=3, max_new_tokens=4))
    finally:
        del model.generate
    # 21 rows: calls of 4 rows in the original order, each left-padded to its own longest prompt
    rows = [len(p) for p in PROMPTS for _ in range(3)]
    assert calls == [(len(rows[s : s + 4]), max(rows[s : s + 4])) for s in range(0, 21, 4)]
    assert [len(r) for r in unpadded(out.prompt_ids, out.prompt_mask)] == rows
    assert model.training


def test_token_budget_keeps_row_order_and_each_call_within_budget(model_and_tokenizer):
    model, tok = model_and_tokenizer
    budget = 60
    params = SamplingParams(n=3, max_new_tokens=6)
    plain, batched, calls = plain_and(model, tok, params, max_tokens_per_batch=budget)
    assert model.training
    # every call: at most batch_size rows and rows × (its longest prompt + max_new_tokens) tokens
    assert calls and all(rows <= 4 and rows * (width + params.max_new_tokens) <= budget for rows, width in calls)
    assert sum(rows for rows, _ in calls) == len(PROMPTS) * 3
    # sorted by prompt length: calls' widths never grow, and the longest prompts come first
    assert [w for _, w in calls] == sorted((w for _, w in calls), reverse=True) and calls[0][1] == 13
    # each row's prompt (padding stripped) is the plain path's: the original order, n rows per prompt
    expected = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS for _ in range(3)]
    assert unpadded(batched.prompt_ids, batched.prompt_mask) == expected
    assert unpadded(plain.prompt_ids, plain.prompt_mask) == expected
    assert torch.equal(batched.prompt_ids, plain.prompt_ids) and torch.equal(batched.prompt_mask, plain.prompt_mask)
    assert batched.completion_ids.shape[0] == len(batched.texts) == len(expected)


def test_token_budget_greedy_completions_equal_plain(model_and_tokenizer):
    model, tok = model_and_tokenizer
    plain, batched, calls = plain_and(model, tok, GREEDY, max_tokens_per_batch=70)
    assert len(calls) >= 3
    texts = plain.texts
    # the check can fail: completions differ by prompt, and some rows end in EOS, some are truncated
    assert len(set(texts[::3])) >= 4 and plain.truncated.any() and not plain.truncated.all()
    assert batched.texts == texts
    assert torch.equal(batched.completion_ids, plain.completion_ids)
    assert torch.equal(batched.completion_mask, plain.completion_mask)
    assert torch.equal(batched.truncated, plain.truncated)
    torch.testing.assert_close(batched.sampling_logps, plain.sampling_logps, atol=1e-5, rtol=0)
    # top_k = 1: the sampled token has probability 1; no NaN after EOS (a filtered pad token's -inf)
    assert not torch.isnan(plain.sampling_logps).any()
    assert plain.sampling_logps.abs().max() < 1e-5


def test_continuous_batching_greedy_equals_generate(model_and_tokenizer):
    model, tok = model_and_tokenizer
    for extra in ({}, {"max_tokens_per_batch": 64}):
        plain, cb, calls = plain_and(model, tok, GREEDY, continuous_batching=True, **extra)
        assert calls == []  # not through generate
        assert model.training and model.config._attn_implementation == "sdpa"
        assert len(set(plain.texts[::3])) >= 4 and plain.truncated.any() and not plain.truncated.all()
        assert cb.texts == plain.texts
        assert torch.equal(cb.prompt_ids, plain.prompt_ids) and torch.equal(cb.prompt_mask, plain.prompt_mask)
        assert torch.equal(cb.completion_ids, plain.completion_ids)
        assert torch.equal(cb.completion_mask, plain.completion_mask)
        assert torch.equal(cb.truncated, plain.truncated)
        assert cb.sampling_logps is not None and cb.sampling_logps.shape == plain.sampling_logps.shape
        torch.testing.assert_close(cb.sampling_logps, plain.sampling_logps, atol=1e-5, rtol=0)


def test_continuous_batching_sampled_logps_match_a_forward(model_and_tokenizer):
    """At temperature 0.7 the returned log-probs are those of the sampled tokens under the
    temperature-scaled distribution: a teacher-forced forward of the same rows gives them back."""
    model, tok = model_and_tokenizer
    torch.manual_seed(0)
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=6, return_logps=True)
    out = HFEngine(lambda: model, tok, batch_size=3, continuous_batching=True).generate(PROMPTS[:3], params)
    assert len(set(out.texts)) > 1
    ids = torch.cat([out.prompt_ids, out.completion_ids], dim=1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], dim=1)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, attention_mask=mask,
                              position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits.float()
    model.train()
    width = out.prompt_ids.shape[1]
    expected = (logits[:, width - 1 : -1] / 0.7).log_softmax(-1).gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.sampling_logps, expected * out.completion_mask, atol=1e-3, rtol=0)


def test_continuous_batching_refuses_autocast_over_float32_weights(model_and_tokenizer):
    model, tok = model_and_tokenizer
    model._original_forward = model.forward  # accelerate's mark of a forward wrapped in autocast
    try:
        with pytest.raises(ConfigError, match="rollout.continuous_batching: .*autocast"):
            HFEngine(lambda: model, tok, continuous_batching=True).generate(PROMPTS[:1], GREEDY)
    finally:
        del model._original_forward
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ConfigError, match="autocast over float32"):
        HFEngine(lambda: model, tok, continuous_batching=True).generate(PROMPTS[:1], GREEDY)
    assert model.training


def test_factory_passes_the_keys_and_loading_refuses_them_with_vllm(tiny_model_dir):
    from rltk.engines.factory import make_engine, require_engine
    from rltk.schema import RolloutConfig

    cfg = RolloutConfig(batch_size=16, max_tokens_per_batch=512, continuous_batching=True)
    require_engine(cfg)
    engine = make_engine(cfg, lambda: None, tokenizer=None)
    assert (engine.batch_size, engine.max_tokens_per_batch, engine.continuous_batching) == (16, 512, True)
    plain = make_engine(RolloutConfig(), lambda: None, tokenizer=None)
    assert (plain.max_tokens_per_batch, plain.continuous_batching) == (None, False)
    from rltk.validate import build_recipe

    for key, value in (("max_tokens_per_batch", 4096), ("continuous_batching", True)):
        with pytest.raises(ConfigError, match=f"^rollout.{key}: applies to the hf engine only"):
            build_recipe({"model": {"name_or_path": tiny_model_dir}, "rollout": {"engine": "vllm", key: value}})


def test_generation_benchmark_runs(tiny_model_dir, capsys):
    """benchmarks/generation.py end to end at a toy size: one line per mode, ratios to plain."""
    from benchmarks import generation

    threads = torch.get_num_threads()
    try:
        generation.main(["--prompts", "3", "--group-size", "2", "--max-new-tokens", "4", "--repeats", "1",
                         "--model-dir", tiny_model_dir, "--threads", str(threads),
                         "--modes", "plain,budget,continuous:2"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["plain", "budget", "continuous:2"]
    assert rows["plain"][-1] == "1.00" and rows["continuous:2"][1] == "2"
    assert all(float(r[-1]) > 0 and int(r[4]) > 0 for r in rows.values())

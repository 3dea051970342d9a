"""rltk's own decode loop (``rollout.drop_finished``, rltk/engines/decode.py): it samples as
transformers' ``generate`` does, and dropping finished rows from the batch and the KV cache keeps
every remaining row's distribution exact."""
from __future__ import annotations

import pytest
import torch

from rltk.engines.base import SamplingParams
from rltk.engines.decode import sample_dropping_finished
from rltk.engines.hf import HFEngine, logits_processors
from rltk.schema import ConfigError

PROMPTS = ["1+11=", "12+34=?", "123+456+789=?", "7=", "99+1+2+3+4+5=", "7+7="]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    """The tiny model with its weights scaled ×4: sharper distributions than a random init's, so
    that a wrong position or a stale cache row changes the sampled log-probs visibly."""
    from transformers import AutoModelForCausalLM

    from rltk.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    model.eval()
    return model, tok


def end_at(lengths: list[int], prompt_width: int, eos: int):
    """A row processor ending original row ``i`` at exactly ``lengths[i]`` new tokens (EOS counted):
    EOS suppressed before, forced at that step."""
    def process(input_ids, scores, rows):
        step = input_ids.shape[1] - prompt_width  # tokens generated so far
        due = torch.tensor([lengths[r] - 1 == step for r in rows.tolist()])
        scores = scores.clone()
        scores[~due, eos] = -float("inf")
        scores[due] = torch.where(torch.arange(scores.shape[1]) == eos, 0.0, -float("inf"))
        return scores
    return process


def encode(tok, prompts):
    from rltk.engines.base import pad_left

    rows = [tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"] for p in prompts]
    return pad_left(rows, tok.pad_token_id), pad_left([torch.ones_like(r) for r in rows], 0)


def sample(model, tok, ids, mask, params, **kwargs):
    gen = HFEngine(lambda: model, tok).generation_config(model, params)
    return sample_dropping_finished(
        model, ids, mask, processors_for=lambda i, m: logits_processors(model, gen, i, m),
        max_new_tokens=params.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        return_logps=True, **kwargs)


def teacher_forced_logps(model, ids, mask, completion, temperature):
    """log p(token) of each completion token under one forward over prompt + completion, at
    ``temperature`` (top-p 1, no top-k): what the sampler must have drawn from."""
    full = torch.cat([ids, completion], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(completion)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=positions).logits.float()
    logits = logits[:, ids.shape[1] - 1 : -1] / temperature
    return logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)


def test_without_drops_it_draws_the_same_tokens_as_generate(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids, mask = encode(tok, PROMPTS)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=10)
    torch.manual_seed(3)
    ours, _ = sample(model, tok, ids, mask, params, compact_share=1.0)
    torch.manual_seed(3)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.9, top_k=20,
                         max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    theirs = out[:, ids.shape[1]:]
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("share", [0.25, 1e-6])
def test_dropping_rows_keeps_each_rows_distribution(model_and_tokenizer, share):
    """Rows end at 1..12 tokens; with drops (``share`` 1e-6: after every finished row) each sampled
    token's log-prob equals a teacher-forced forward's, so the cache, the positions and the mask
    of the kept rows stay right; finished rows are padded after their EOS."""
    model, tok = model_and_tokenizer
    ids, mask = encode(tok, PROMPTS * 2)
    lengths = [1, 12, 3, 7, 2, 9, 5, 12, 4, 6, 11, 8]
    params = SamplingParams(temperature=0.7, max_new_tokens=12)
    torch.manual_seed(0)
    completion, logps = sample(model, tok, ids, mask, params, compact_share=share,
                               row_processor=end_at(lengths, ids.shape[1], tok.eos_token_id))
    assert completion.shape == (12, 12)
    for row, n in enumerate(lengths):
        assert completion[row, n - 1] == tok.eos_token_id
        assert (completion[row, n:] == tok.pad_token_id).all() and (logps[row, n:] == 0).all()
        assert (completion[row, : n - 1] != tok.eos_token_id).all()
    # the forced EOS was drawn from an altered distribution: compare the free tokens only
    free = torch.arange(12).unsqueeze(0) < (torch.tensor(lengths) - 1).unsqueeze(1)
    reference = teacher_forced_logps(model, ids, mask, completion, 0.7)
    # the EOS was also suppressed at free steps: renormalise the reference without it
    eos_mass = teacher_forced_eos_mass(model, ids, mask, completion, 0.7, tok.eos_token_id)
    expected = reference - torch.log1p(-eos_mass)
    assert torch.allclose(logps[free], expected[free], atol=1e-5)


def teacher_forced_eos_mass(model, ids, mask, completion, temperature, eos):
    full = torch.cat([ids, completion], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(completion)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=positions).logits.float()
    return (logits[:, ids.shape[1] - 1 : -1] / temperature).softmax(-1)[..., eos]


def test_engine_drop_finished_returns_the_generation_contract(model_and_tokenizer):
    """Through the engine, with a token budget that sorts the rows: prompts come back in their
    order, completions end at their first EOS, log-probs are 0 outside the mask; the model's
    training mode is put back."""
    model, tok = model_and_tokenizer
    model.train()
    try:
        engine = HFEngine(lambda: model, tok, batch_size=4, drop_finished=True, max_tokens_per_batch=60)
        out = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, return_logps=True))
        assert model.training
    finally:
        model.eval()
    prompts = tok.batch_decode([row[m.bool()] for row, m in zip(out.prompt_ids, out.prompt_mask)])
    assert prompts == [p for p in PROMPTS for _ in range(2)]
    assert out.completion_ids.shape[0] == 12 and len(out.texts) == 12
    assert out.sampling_logps.shape == out.completion_ids.shape
    assert (out.sampling_logps[out.completion_mask == 0] == 0).all()
    assert torch.isfinite(out.sampling_logps).all() and (out.sampling_logps <= 0).all()
    ends = (out.completion_ids == tok.eos_token_id).int()
    assert (ends.sum(1) <= 1).all()  # nothing sampled after an EOS
    assert torch.equal(out.completion_mask.sum(1), torch.where(ends.any(1), ends.argmax(1) + 1, 6))


def test_drop_finished_and_continuous_batching_refused_together(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ConfigError, match="rollout.drop_finished and rollout.continuous_batching"):
        HFEngine(lambda: model, tok, drop_finished=True, continuous_batching=True)


def test_recipe_key_reaches_the_engine_and_is_refused_where_it_cannot_apply(tiny_model_dir):
    from rltk.engines.factory import make_engine
    from rltk.schema import RolloutConfig
    from rltk.validate import build_recipe

    assert make_engine(RolloutConfig(drop_finished=True), lambda: None, tokenizer=None).drop_finished
    assert not make_engine(RolloutConfig(), lambda: None, tokenizer=None).drop_finished
    model = {"name_or_path": tiny_model_dir}
    assert build_recipe({"model": model, "rollout": {"drop_finished": True}}).rollout.drop_finished
    with pytest.raises(ConfigError, match="^rollout.drop_finished: applies to the hf engine only"):
        build_recipe({"model": model, "rollout": {"engine": "vllm", "drop_finished": True}})
    with pytest.raises(ConfigError, match="^rollout.drop_finished and rollout.continuous_batching: pick one"):
        build_recipe({"model": model, "rollout": {"drop_finished": True, "continuous_batching": True}})

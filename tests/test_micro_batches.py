"""Token-budget micro-batches and padding-free packing (rltk/batching.py,
rltk/trainer/packing.py): the plans respect their budgets and cover every row once, and trimmed and
packed forwards give the padded forward's log-probs, entropies, hidden states and gradients; the
trainer's step loss and gradient do not depend on the cut."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rltk.schema import ConfigError
from rltk.trainer.logprobs import ForwardOptions, TokenBatch, chunked_logps, forward_logps
from rltk.batching import fixed_rows, plan, token_budget
from rltk.trainer.packing import first_fit_decreasing, pack, packing_unavailable
from rltk.trainer.rl import RLTrainer
from rltk.validate import build_recipe
from tests.conftest import small_recipe_data
from tests.factories import ScriptedEngine

VOCAB = 97


def _model(attn: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return Qwen2ForCausalLM(cfg).to(dtype)


def _batch(prompt_lens, completion_lens, p=7, t=11, seed=1) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    n = len(prompt_lens)
    prompt_mask = torch.zeros(n, p, dtype=torch.long)
    completion_mask = torch.zeros(n, t, dtype=torch.long)
    for i, (a, b) in enumerate(zip(prompt_lens, completion_lens)):
        prompt_mask[i, p - a:] = 1
        completion_mask[i, :b] = 1
    ids = torch.randint(1, VOCAB, (n, p), generator=g) * prompt_mask
    completion = torch.randint(1, VOCAB, (n, t), generator=g) * completion_mask
    return TokenBatch(ids, prompt_mask, completion, completion_mask)


PROMPTS, COMPLETIONS = [3, 7, 5, 2, 6, 4], [11, 2, 9, 1, 4, 6]


# ---------------------------------------------------------------------------------------------- plans
def test_fixed_rows_is_todays_cut():
    assert [r.tolist() for r in fixed_rows(torch.arange(10), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [r.tolist() for r in plan(torch.arange(5), torch.ones(5), torch.ones(5), max_rows=2, max_tokens=None)] \
        == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("budget", [18, 30, 64, 1000])
def test_token_budget_respects_the_budget_and_covers_every_row_once(packed, budget):
    prompt, completion = torch.tensor(PROMPTS), torch.tensor(COMPLETIONS)
    rows = torch.arange(10, 16)  # row ids need not start at 0
    batches = token_budget(rows, prompt, completion, budget, packed=packed)
    assert sorted(torch.cat(batches).tolist()) == rows.tolist()
    for mb in batches:
        local = mb - 10
        cost = int((prompt[local] + completion[local]).sum()) if packed else \
            len(mb) * (int(prompt[local].max()) + int(completion[local].max()))
        assert cost <= budget or len(mb) == 1
    lengths = [int((prompt[mb - 10] + completion[mb - 10]).max()) for mb in batches]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    if budget == 1000:
        assert len(batches) == 1


def test_token_budget_exact_cut():
    # lengths 14, 9, 14, 3, 10, 10 -> order 0, 2, 4, 5, 1, 3. Padded, budget 30, cost rows × (longest prompt +
    # longest completion): 0 + 2 = 2 × (5 + 11) = 32 > 30; 2 + 4 = 2 × (6 + 9) = 30; + 5 = 45; 5 + 1 = 2 × (7 + 6)
    # = 26; + 3 = 39
    batches = token_budget(torch.arange(6), torch.tensor(PROMPTS), torch.tensor(COMPLETIONS), 30)
    assert [b.tolist() for b in batches] == [[0], [2, 4], [5, 1], [3]]
    # packed: 14 + 14 = 28, + 10 = 38 > 30 -> [0, 2]; 10 + 10 + 9 = 29 -> [4, 5, 1]; [3]
    batches = token_budget(torch.arange(6), torch.tensor(PROMPTS), torch.tensor(COMPLETIONS), 30, packed=True)
    assert [b.tolist() for b in batches] == [[0, 2], [4, 5, 1], [3]]


def test_whole_units_stay_together():
    prompt = torch.tensor([2, 2, 5, 5, 1, 1, 3, 3])
    completion = torch.tensor([1, 9, 1, 1, 2, 2, 4, 1])
    batches = token_budget(torch.arange(8), prompt, completion, 24, unit=2)
    for mb in batches:
        pairs = mb.view(-1, 2)
        assert torch.all(pairs[:, 1] == pairs[:, 0] + 1) and torch.all(pairs[:, 0] % 2 == 0)
    assert sorted(torch.cat(batches).tolist()) == list(range(8))
    with pytest.raises(ValueError, match="whole units of 3"):
        token_budget(torch.arange(8), prompt, completion, 24, unit=3)


def test_every_process_gets_as_many_micro_batches():
    """The planner splits its largest micro-batches until it has the count of the busiest process."""
    batches = token_budget(torch.arange(6), torch.tensor(PROMPTS), torch.tensor(COMPLETIONS), 1000,
                           count_over_ranks=lambda count: max(count, 4))
    assert len(batches) == 4 and sorted(torch.cat(batches).tolist()) == list(range(6))
    with pytest.raises(RuntimeError, match="cannot split"):
        token_budget(torch.arange(2), torch.tensor([1, 1]), torch.tensor([1, 1]), 1000, count_over_ranks=lambda c: 3)


def test_first_fit_decreasing_and_pack_layout():
    assert first_fit_decreasing([5, 3, 8, 2, 4], 8) == [[2], [0, 1], [4, 3]]
    batch = _batch([2, 3], [2, 1], p=4, t=3)
    prompt_len, completion_len = batch.lengths()
    packed = pack(batch.prompt_ids, prompt_len, batch.completion_ids, completion_len, one_row=True)
    # row 0 (2 + 2 tokens) then row 1 (3 + 1): one row of 8, positions restarting at each sequence
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert packed.input_ids[0, :4].tolist() == batch.prompt_ids[0, 2:].tolist() + batch.completion_ids[0, :2].tolist()
    # completion token t of row i is predicted at (its offset + prompt length - 1 + t)
    assert packed.source[1].tolist() == [1, 2, 6] and packed.target[0].tolist() == [0, 0, 1]
    binned = pack(batch.prompt_ids, prompt_len, batch.completion_ids, completion_len, one_row=False)
    assert binned.input_ids.shape == (2, 4) and binned.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


# ---------------------------------------------------------------------------------------------- forwards
@pytest.mark.parametrize("attn, dtype", [("sdpa", torch.float64), ("eager", torch.float32)])
def test_trimmed_and_packed_forwards_equal_the_padded_one(attn, dtype):
    """Log-probs, entropy, final and per-layer hidden states and every parameter's gradient of a loss
    on them: trimmed and packed equal padded, in float64 to 1e-10 (the layouts differ only in the
    order of sums); eager attention in float32 (its padded float64 path gives NaN on fully masked
    left-padding rows) to 1e-5, gradients to 1e-4 of their largest entry."""
    model = _model(attn, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    batch = _batch(PROMPTS, COMPLETIONS)
    mask = batch.completion_mask.float()
    results = {}
    for layout in ("padded", "trimmed", "packed"):
        model.zero_grad()
        out = forward_logps(model, batch, 0.7, with_entropy=True, with_final_hidden=True, hidden_layers=(1,),
                            options=ForwardOptions(chunk=5, layout=layout))
        loss = (out.logps * mask).sum() - 0.1 * (out.entropy * mask).sum() \
            + (out.final_hidden * mask[..., None]).pow(2).sum()
        loss.backward()
        results[layout] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    padded, padded_grads = results["padded"]
    real = mask.bool()
    for layout in ("trimmed", "packed"):
        out, grads = results[layout]
        assert out.logps.shape == padded.logps.shape == (6, 11)
        torch.testing.assert_close(out.logps[real], padded.logps[real], rtol=0, atol=tol)
        torch.testing.assert_close(out.entropy[real], padded.entropy[real], rtol=0, atol=tol)
        torch.testing.assert_close(out.final_hidden[real], padded.final_hidden[real], rtol=0, atol=tol * 10)
        torch.testing.assert_close(out.hidden[1][real], padded.hidden[1][real], rtol=0, atol=tol * 10)
        for name, grad in padded_grads.items():
            assert grad.abs().max() > 0, name
            scale = 1e-9 if dtype == torch.float64 else 1e-4 * float(grad.abs().max())
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=scale, msg=f"{layout}: {name}")
    # positions run: padded 6 × (7 + 11); packed rows as long as the longest sequence (14)
    assert padded.positions == 6 * 18
    assert results["trimmed"][0].positions == 6 * 18  # the longest prompt and completion are both here
    # first-fit decreasing into rows of 14 (the longest): 14 | 14 | 10 + 3 | 10 | 9 -> 5 rows
    assert results["packed"][0].positions == 14 * 5
    assert results["packed"][0].positions < padded.positions


def test_trimmed_forward_cuts_shared_padding():
    batch = _batch([2, 3], [4, 2], p=7, t=11)
    out = forward_logps(_model(), batch, options=ForwardOptions(layout="trimmed"))
    assert out.positions == 2 * (3 + 4) and out.logps.shape == (2, 11)
    assert torch.all(out.logps[:, 4:] == 0)


@pytest.mark.parametrize("layout", ["trimmed", "packed"])
def test_no_grad_forwards_by_token_budget_equal_fixed_rows(layout):
    model = _model()
    batch = _batch(PROMPTS, COMPLETIONS)
    fixed = chunked_logps(model, batch, 1.0, 2, hidden_layers=(1,), options=ForwardOptions(chunk=4))
    budget = chunked_logps(model, batch, 1.0, 2, hidden_layers=(1,),
                           options=ForwardOptions(chunk=4, layout=layout, max_tokens=30))
    torch.testing.assert_close(budget.logps, fixed.logps, rtol=0, atol=1e-5)
    real = batch.completion_mask.bool()
    torch.testing.assert_close(budget.hidden[1][real], fixed.hidden[1][real], rtol=0, atol=1e-5)


def test_packing_availability_is_named():
    assert packing_unavailable(_model("sdpa")) is None and packing_unavailable(_model("eager")) is None
    model = _model()
    model.config._attn_implementation = "some_kernel"
    assert "'some_kernel'" in packing_unavailable(model)


# ---------------------------------------------------------------------------------------------- trainer
def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss", ["ppo_clip", "paft"])
def test_step_loss_and_gradient_do_not_depend_on_the_cut(tmp_path, tiny_model_dir, loss):
    """One step of 16 completions with a KL term: row-count micro-batches (padded), token budgets
    (trimmed) and padding-free packing give the same loss and gradient (1e-6); the padding share
    drops."""
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"prompts_per_step": 4, "micro_batch_size": 16},
                             algorithm={"loss": {"name": loss}, "terms": [{"name": "kl", "coef": 0.05}]},
                             rollout={"group_size": 4, "max_new_tokens": 12})
    trainer = RLTrainer(build_recipe(data))
    # completions of 1 to 12 tokens, mostly short (as in real batches)
    texts = ["7", "12", "3", "9 + 4 = 13", "5", "1", "42", "6", "8 * 8 = 64 so", "2", "0", "11", "3", "4 4", "9", "10"]
    trainer.collector.engine = ScriptedEngine(trainer.tokenizer, texts)
    try:
        torch.manual_seed(3)
        batch = trainer.collect()
        # some correct completions in each group but the last (PAFT trains on the correct ones)
        correct = torch.tensor([1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]).bool()
        batch = replace(batch, rollouts=replace(batch.rollouts, correct=correct))
        rows = torch.arange(16)
        base_options = trainer.forward_options
        results = {}
        for name, budget, layout in [("rows", None, "padded"), ("budget", 200, "trimmed"),
                                     ("packed", 200, "packed")]:
            trainer.recipe.trainer.max_tokens_per_micro_batch = budget
            trainer.forward_options = base_options.__class__(**{**base_options.__dict__, "layout": layout,
                                                                "max_tokens": budget})
            trainer.optimizer.zero_grad(set_to_none=True)
            cut = trainer.micro_batches(batch, rows)
            metrics = trainer.accumulate_gradients(batch, rows)
            results[name] = (metrics, _grads(trainer.model).clone(), len(cut))
    finally:
        trainer.close()
    (m0, g0, n0) = results["rows"]
    assert n0 == 1 and g0.abs().sum() > 0
    for name in ("budget", "packed"):
        metrics, grad, count = results[name]
        assert count > 1, name
        assert abs(metrics["loss"] - m0["loss"]) < 1e-6, name
        torch.testing.assert_close(grad, g0, atol=1e-6, rtol=0, msg=name)
        assert metrics["tokens/padding_share"] < m0["tokens/padding_share"], name
    assert m0["tokens/padding_share"] > 0.3 and results["packed"][0]["tokens/padding_share"] < 0.1


def test_a_budget_below_the_longest_sequence_is_one_line(tmp_path, tiny_model_dir):
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"max_tokens_per_micro_batch": 100},
                             data={"max_prompt_length": 96})
    with pytest.raises(ConfigError, match=r"^trainer.max_tokens_per_micro_batch \(100\) is smaller than the longest "
                                          r"sequence, data.max_prompt_length \+ rollout.max_new_tokens = 104 tokens$"):
        build_recipe(data)
    data = small_recipe_data(tiny_model_dir, tmp_path, trainer={"max_tokens_per_micro_batch": 300},
                             data={"max_prompt_length": 64}, algorithm={"loss": {"name": "paft"}})
    with pytest.raises(ConfigError, match=r"must hold a whole group of the paft loss: .* = 4 × 72 = 288"):
        build_recipe({**data, "trainer": {**data["trainer"], "max_tokens_per_micro_batch": 287}})
    build_recipe(data)  # 300 holds a group of 4 × 72

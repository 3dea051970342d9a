"""The chunked LM-head log-prob path (rltk/algos/linear_logps.py, rltk/trainer/logprobs.py) equals
the dense path — values and gradients — and never needs the full logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rltk.algos.linear_logps import linear_logps
from rltk.algos.registry import StageError
from rltk.trainer.logprobs import FinalHidden, ForwardOptions, TokenBatch, chunkable_head, chunked_logps, forward_logps


def _dense(h, w, b, target, temperature):
    z = (h @ w.T + (0 if b is None else b)) / temperature
    logp = F.log_softmax(z.float(), dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _inputs(rows=37, hidden=16, vocab=101, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    b = (torch.randn(vocab, generator=g, dtype=dtype) * 0.1).requires_grad_(True) if bias else None
    target = torch.randint(0, vocab, (rows,), generator=g)
    return h, w, b, target


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_gradients_equal_dense(chunk, temperature):
    """float32 in, float32 out: log-probs and entropy equal the dense path within 1e-5, the three
    gradients within 1e-5 of their largest entry (both paths sum float32 products in other orders)."""
    h, w, b, target = _inputs(dtype=torch.float32)
    coef_lp = torch.randn(h.shape[0], dtype=h.dtype)
    coef_ent = torch.randn(h.shape[0], dtype=h.dtype)

    def run(fn):
        for t in (h, w, b):
            t.grad = None
        logp, ent = fn()
        ((logp * coef_lp).sum() + (ent * coef_ent).sum()).backward()
        return logp.detach(), ent.detach(), h.grad.clone(), w.grad.clone(), b.grad.clone()

    dense = run(lambda: _dense(h, w, b, target, temperature))
    chunked = run(lambda: linear_logps(h, w, target, bias=b, temperature=temperature, chunk_size=chunk,
                                       with_entropy=True))
    for a, c in zip(dense[:2], chunked[:2]):
        torch.testing.assert_close(c, a, rtol=0, atol=1e-5)
    for a, c in zip(dense[2:], chunked[2:]):
        assert a.abs().max() > 1
        torch.testing.assert_close(c, a, rtol=0, atol=1e-5 * float(a.abs().max()))


def test_gradcheck_float64():
    h, w, b, target = _inputs(rows=6, hidden=4, vocab=9)

    def fn(h, w, b):
        logp, ent = linear_logps(h, w, target, bias=b, temperature=0.7, chunk_size=4, with_entropy=True,
                                 compute_dtype=torch.float64)
        return logp.double(), ent.double()

    # the softmax arithmetic is float32 by design, so the numerical Jacobian is checked loosely
    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_logps_only_needs_no_entropy_and_leaves_rows_past_vocab_without_gradient():
    h, w, b, target = _inputs(bias=False)
    target = target.clamp(max=89)
    logp, ent = linear_logps(h, w, target, vocab=90, chunk_size=8, compute_dtype=torch.float64)
    assert ent is None
    expected, _ = _dense(h, w[:90], None, target, 1.0)
    torch.testing.assert_close(logp.double(), expected.double(), rtol=0, atol=1e-5)
    logp.sum().backward()
    assert torch.all(w.grad[90:] == 0) and w.grad[:90].abs().sum() > 0


def test_bfloat16_compute_is_close_and_float32_softmax():
    h, w, b, target = _inputs(dtype=torch.float32)
    exact, _ = _dense(h, w, b, target, 1.0)
    bf16, _ = linear_logps(h, w, target, bias=b, compute_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert (bf16 - exact).abs().max() < 0.1
    assert (bf16 - exact).abs().max() > 0  # the matmul really ran in bf16


def test_bad_arguments_are_one_line_errors():
    h, w, b, target = _inputs()
    with pytest.raises(StageError, match="chunk_size"):
        linear_logps(h, w, target, chunk_size=0)
    with pytest.raises(StageError, match="temperature"):
        linear_logps(h, w, target, temperature=0)
    with pytest.raises(StageError, match="differ"):
        linear_logps(h, w, target[:-1])


def _tiny_qwen(vocab=211, tie=True, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg)


def _batch(vocab=211, n=4, p=6, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(n, p, dtype=torch.long)
    prompt_mask[0, :3] = 0  # left padding
    completion_mask = torch.ones(n, t, dtype=torch.long)
    completion_mask[1, 5:] = 0  # right padding
    completion_mask[2, 1:] = 0
    return TokenBatch(torch.randint(0, vocab, (n, p), generator=g), prompt_mask,
                      torch.randint(0, vocab, (n, t), generator=g), completion_mask)


@pytest.mark.parametrize("tie", [True, False])
def test_model_forward_equals_dense_path(tie):
    """A whole Qwen2: log-probs, entropy, final hidden states and every parameter's gradient of a
    loss on them match the dense path (full logits) within 1e-5 in float32."""
    model = _tiny_qwen(tie=tie)
    batch = _batch()
    mask = batch.completion_mask.float()
    results = []
    for options in (ForwardOptions(chunk=0), ForwardOptions(chunk=7)):
        model.zero_grad()
        out = forward_logps(model, batch, 0.8, with_entropy=True, with_final_hidden=True, options=options)
        loss = (out.logps * mask).sum() * 0.3 - (out.entropy * mask).sum() * 0.1 + out.final_hidden.pow(2).mean()
        loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (dense, dense_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked.logps, dense.logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.entropy, dense.entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.final_hidden, dense.final_hidden, rtol=0, atol=1e-6)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_chunked_forward_never_builds_full_logits():
    """The model's own LM head runs on one position per row: the logits it returns are [N, 1, V]."""
    model = _tiny_qwen()
    batch = _batch()
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        forward_logps(model, batch, 1.0, options=ForwardOptions(chunk=4))
    finally:
        hook.remove()
    assert shapes == [(len(batch), 1, 211)]


def test_no_grad_chunked_logps_and_hidden_layers_match_dense():
    model = _tiny_qwen()
    batch = _batch()
    dense = chunked_logps(model, batch, 1.0, 3, hidden_layers=(-2,), options=ForwardOptions(chunk=0))
    chunked = chunked_logps(model, batch, 1.0, 3, hidden_layers=(-2,), options=ForwardOptions(chunk=5))
    torch.testing.assert_close(chunked.logps, dense.logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.hidden[-2], dense.hidden[-2])
    assert torch.all(chunked.logps[batch.completion_mask == 0] == 0)


def test_unusual_heads_fall_back_to_dense():
    model = _tiny_qwen(tie=False)
    assert chunkable_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert chunkable_head(model) is None
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Sequential(model.lm_head)  # e.g. a wrapped (LoRA) head
    assert chunkable_head(model) is None
    out = forward_logps(model, _batch(), 1.0)  # runs, densely
    assert out.logps.shape == (4, 9)


def test_final_hidden_hook_is_removed():
    model = _tiny_qwen()
    with FinalHidden(model.get_decoder()) as final:
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert final.value.shape == (1, 3, 32)
    assert not model.get_decoder()._forward_hooks

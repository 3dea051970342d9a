"""REDI (docs/algorithms/reference.md §6; arXiv 2505.24850) and PACED (§7; arXiv 2603.11178)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from rltk.algos import StageError
from rltk.algos.chunked_kl import chunked_kl, linear_kl
from rltk.algos.distill import (
    paced_loss,
    paced_schedule,
    paced_weights,
    redi_loss,
    redi_unpaired_loss,
)

TOL = 1e-4


def padded(rows, width=None):
    """Per-token logps (leaf, requires grad) and mask from ragged rows."""
    width = width or max(len(r) for r in rows)
    logps = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, row in enumerate(rows):
        logps[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[i, : len(row)] = 1
        logps[i, len(row) :] = -7.0  # padding garbage must not matter
    return logps.requires_grad_(True), mask


# ---------------------------------------------------------------- REDI (§6)


def test_redi_vector_and_per_token_gradient():
    pos, pos_mask = padded([[-0.1, -0.3, -0.5]], width=4)  # mean −0.3, |y_w| = 3
    neg, neg_mask = padded([[-0.4, -0.6]], width=4)  # mean −0.5, |y_l| = 2
    loss, metrics = redi_loss(pos, pos_mask, neg, neg_mask, alpha=0.8)
    assert loss.item() == pytest.approx(-0.1, abs=1e-9)
    loss.backward()
    assert torch.allclose(pos.grad, torch.tensor([[-1 / 3] * 3 + [0.0]], dtype=torch.float64))
    assert torch.allclose(neg.grad, torch.tensor([[0.8 / 2] * 2 + [0.0, 0.0]], dtype=torch.float64))
    assert metrics == pytest.approx({"pos_logp": -0.3, "neg_logp": -0.5, "gap": 0.2})


def test_redi_mean_over_pairs_gradient():
    pos, pos_mask = padded([[-0.1, -0.3, -0.5], [-1.0]])
    neg, neg_mask = padded([[-0.4, -0.6], [-0.2, -0.2, -0.2]])
    loss, _ = redi_loss(pos, pos_mask, neg, neg_mask, alpha=0.5)
    assert loss.item() == pytest.approx(((0.3 + 0.5 * -0.5) + (1.0 + 0.5 * -0.2)) / 2, abs=1e-9)
    loss.backward()
    want_pos = -pos_mask / pos_mask.sum(-1, keepdim=True) / 2
    want_neg = 0.5 * neg_mask / neg_mask.sum(-1, keepdim=True) / 2
    assert torch.allclose(pos.grad, want_pos) and torch.allclose(neg.grad, want_neg)


def test_redi_alpha_zero_is_sft():
    pos, pos_mask = padded([[-0.1, -0.3, -0.5]])
    neg, neg_mask = padded([[-0.4, -0.6]])
    loss, _ = redi_loss(pos, pos_mask, neg, neg_mask, alpha=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.3)
    assert torch.equal(neg.grad, torch.zeros_like(neg))


def test_redi_errors():
    pos, pos_mask = padded([[-0.1], [-0.2]])
    neg, neg_mask = padded([[-0.4]])
    with pytest.raises(StageError, match="2 positive but 1 negative"):
        redi_loss(pos, pos_mask, neg, neg_mask)
    empty = torch.zeros(0, 3)
    with pytest.raises(StageError, match="no pairs"):
        redi_loss(empty, empty, empty, empty)


def test_redi_empty_trace_contributes_zero():
    pos, pos_mask = padded([[-0.1, -0.3, -0.5]])
    neg, neg_mask = padded([[-0.4]])
    neg_mask.zero_()
    loss, _ = redi_loss(pos, pos_mask, neg, neg_mask)
    assert loss.item() == pytest.approx(0.3)


def test_redi_unpaired_matches_paired_and_gradient():
    logps, mask = padded([[-0.1, -0.3, -0.5], [-0.4, -0.6], [-1.0], [-0.2, -0.2, -0.2]])
    label = torch.tensor([True, False, True, False])
    loss, metrics = redi_unpaired_loss(logps, mask, label, alpha=0.8)
    pos, pos_mask = padded([[-0.1, -0.3, -0.5], [-1.0]])
    neg, neg_mask = padded([[-0.4, -0.6], [-0.2, -0.2, -0.2]])
    paired, paired_metrics = redi_loss(pos, pos_mask, neg, neg_mask, alpha=0.8)
    assert loss.item() == pytest.approx(paired.item(), abs=1e-12)
    assert metrics == pytest.approx(paired_metrics)
    loss.backward()
    lengths = mask.sum(-1, keepdim=True)
    sign = torch.where(label, -1.0, 0.8).double().unsqueeze(-1)
    assert torch.allclose(logps.grad, sign * mask / lengths / 2)  # N/2 = 2 pairs
    per_trace, _ = redi_unpaired_loss(logps, mask, label, alpha=0.8, reduction="trace")
    assert per_trace.item() == pytest.approx(paired.item() / 2, abs=1e-12)
    with pytest.raises(StageError, match="reduction must be pair or trace"):
        redi_unpaired_loss(logps, mask, label, reduction="sum")


def test_redi_unpaired_all_one_label():
    logps, mask = padded([[-0.5, -0.5], [-1.0]])
    loss, metrics = redi_unpaired_loss(logps, mask, torch.tensor([True, True]))
    assert loss.item() == pytest.approx((0.5 + 1.0) / 1)
    assert metrics["neg_logp"] == 0.0


# ---------------------------------------------------------------- PACED weights and schedule (§7)


def test_paced_weight_vectors():
    assert paced_weights(torch.tensor([0.25])).raw.item() == pytest.approx(0.1875)
    assert paced_weights(torch.tensor([0.25]), alpha=2.0, beta=1.0).raw.item() == pytest.approx(0.046875)
    out = paced_weights(torch.tensor([0.25, 0.5, 0.0, 1.0]))
    assert torch.allclose(out.raw, torch.tensor([0.1875, 0.25, 0.0, 0.0]))
    assert torch.allclose(out.normalized, torch.tensor([0.428571, 0.571429, 0.0, 0.0]), atol=TOL)
    assert out.skipped is False


def test_paced_all_zero_batch_is_skipped():
    out = paced_weights(torch.tensor([0.0, 1.0, 1.0]))
    assert out.skipped is True
    assert torch.equal(out.normalized, torch.zeros(3))
    assert paced_weights(torch.zeros(0)).skipped is True


def test_paced_weight_errors():
    with pytest.raises(StageError, match=r"pass rates must lie in \[0, 1\]"):
        paced_weights(torch.tensor([1.5]))
    with pytest.raises(StageError, match="alpha and beta must be >= 0"):
        paced_weights(torch.tensor([0.5]), alpha=-1.0)


def test_paced_loss_weighted_mean_and_gradient():
    token_kl = torch.tensor([[1.0, 3.0, 9.0], [2.0, 2.0, 2.0], [5.0, 5.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    weights = paced_weights(torch.tensor([0.25, 0.5, 1.0])).raw.double()
    loss = paced_loss(token_kl, mask, weights, float(weights.sum()))
    assert loss.item() == pytest.approx(0.428571 * 2.0 + 0.571429 * 2.0, abs=TOL)
    loss.backward()
    want = torch.tensor([[0.428571 / 2] * 2 + [0.0], [0.571429 / 3] * 3, [0.0] * 3])
    assert torch.allclose(token_kl.grad, want, atol=TOL)


def test_paced_loss_of_micro_batches_adds_up_to_the_step():
    """Each micro-batch divides by the step's Σw, so the parts sum to the whole step's loss."""
    token_kl = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(4) < torch.tensor([4, 3, 2, 4, 1, 3]).unsqueeze(1)).float()
    weights = paced_weights(torch.tensor([0.25, 0.25, 0.5, 0.5, 0.75, 0.75])).raw.double()
    total = float(weights.sum())
    parts = sum(paced_loss(token_kl[i : i + 2], mask[i : i + 2], weights[i : i + 2], total) for i in (0, 2, 4))
    assert float(parts) == pytest.approx(float(paced_loss(token_kl, mask, weights, total)), abs=1e-6)


def test_paced_schedule():
    assert paced_schedule(100, "forward") == "forward"
    assert paced_schedule(0, "reverse") == "reverse"
    assert paced_schedule(9, "forward_then_reverse", 10) == "forward"
    assert paced_schedule(10, "forward_then_reverse", 10) == "reverse"
    with pytest.raises(StageError, match="needs a switch_step"):
        paced_schedule(3, "forward_then_reverse")
    with pytest.raises(StageError, match="schedule must be one of"):
        paced_schedule(3, "backward")


# ---------------------------------------------------------------- chunked KL (§7)


def dense_kl(student, teacher, direction):
    log_s = F.log_softmax(student.double(), -1)
    log_t = F.log_softmax(teacher.double(), -1)
    if direction == "forward":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def logits(shape, seed, scale=3.0, dtype=torch.float64):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1000])
def test_chunked_kl_matches_dense(direction, chunk_size):
    student, teacher = logits((2, 3, 37), 0), logits((2, 3, 37), 1)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    kl = chunked_kl(student, teacher, mask, direction=direction, chunk_size=chunk_size)
    assert kl.shape == (2, 3)
    assert torch.allclose(kl, dense_kl(student, teacher, direction) * mask, atol=1e-6, rtol=0)
    assert kl[0, 2] == 0 and (kl[mask > 0] > 0).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chunked_kl_gradient_matches_dense(direction):
    student = logits((2, 3, 37), 2).requires_grad_(True)
    teacher = logits((2, 3, 37), 3)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    upstream = torch.rand(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (chunked_kl(student, teacher, mask, direction=direction, chunk_size=8) * upstream).sum().backward()
    chunked_grad = student.grad.clone()
    student.grad = None
    (dense_kl(student, teacher, direction) * mask * upstream).sum().backward()
    assert torch.allclose(chunked_grad, student.grad, atol=1e-10)
    assert torch.equal(chunked_grad[0, 1], torch.zeros(37, dtype=torch.float64))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chunked_kl_gradcheck(direction):
    student = logits((2, 11), 5).requires_grad_(True)
    teacher = logits((2, 11), 6)
    assert torch.autograd.gradcheck(lambda s: chunked_kl(s, teacher, direction=direction, chunk_size=4), (student,))


def test_chunked_kl_teacher_gets_no_gradient():
    student = logits((3, 9), 7).requires_grad_(True)
    teacher = logits((3, 9), 8).requires_grad_(True)
    chunked_kl(student, teacher, chunk_size=4).sum().backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chunked_kl_is_stable_for_large_logits(direction):
    student, teacher = logits((4, 50), 9, scale=300.0), logits((4, 50), 10, scale=300.0)
    kl = chunked_kl(student.float(), teacher.float(), direction=direction, chunk_size=7)
    assert torch.isfinite(kl).all()
    dense = dense_kl(student.float(), teacher.float(), direction)
    assert torch.allclose(kl.double(), dense, rtol=1e-5, atol=1e-3)


def test_chunked_kl_identical_distributions_is_zero():
    student = logits((2, 4, 33), 11)
    for direction in ("forward", "reverse"):
        kl = chunked_kl(student, student + 5.0, direction=direction, chunk_size=5)  # shift-invariant
        assert torch.allclose(kl, torch.zeros(2, 4, dtype=torch.float64), atol=1e-12)


def test_chunked_kl_bf16_inputs_computed_in_float32():
    student, teacher = logits((2, 64), 12, dtype=torch.bfloat16), logits((2, 64), 13, dtype=torch.bfloat16)
    student.requires_grad_(True)
    kl = chunked_kl(student, teacher, chunk_size=16)
    assert kl.dtype == torch.float32
    assert torch.allclose(kl.double(), dense_kl(student.detach(), teacher, "forward"), atol=1e-5)
    kl.sum().backward()
    assert student.grad.dtype == torch.bfloat16


def test_chunked_kl_saves_no_full_vocabulary_temporaries():
    """Only the two input tensors (views) and per-row vectors are kept for backward."""
    student = logits((2, 3, 100), 14).requires_grad_(True)
    teacher = logits((2, 3, 100), 15)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_kl(student, teacher, chunk_size=10, direction="reverse")
    full = student.numel()
    assert saved
    assert sum(n for n in saved if n == full) <= 2 * full
    assert all(n == full or n <= 2 * 3 for n in saved)


def test_chunked_kl_errors():
    a, b = torch.zeros(2, 5), torch.zeros(2, 6)
    with pytest.raises(StageError, match="differ in shape"):
        chunked_kl(a, b)
    with pytest.raises(StageError, match="direction must be forward or reverse"):
        chunked_kl(a, a, direction="js")
    with pytest.raises(StageError, match="chunk_size must be >= 1"):
        chunked_kl(a, a, chunk_size=0)


# ---------------------------------------------------------------- KL from hidden states (§7)


def _heads(seed, rows=6, hidden_s=5, hidden_t=7, vocab=41, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(rows, hidden_s), make(vocab, hidden_s), make(rows, hidden_t), make(vocab, hidden_t)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_size", [1, 6, 41, 4096])
def test_linear_kl_equals_unchunked_kl_and_gradient(direction, chunk_size):
    """The chunked KL from hidden states equals the unchunked full-logits KL (value and gradient
    w.r.t. the student's hidden states and LM head), float32, to 1e-5."""
    h_s, w_s, h_t, w_t = (x.float() for x in _heads(0))
    h_s.requires_grad_(True), w_s.requires_grad_(True)
    upstream = torch.rand(6, generator=torch.Generator().manual_seed(1))
    kl = linear_kl(h_s, w_s, h_t, w_t, direction=direction, chunk_size=chunk_size)
    (kl * upstream).sum().backward()
    grads = h_s.grad.clone(), w_s.grad.clone()
    h_s.grad = w_s.grad = None
    dense = dense_kl(h_s @ w_s.T, h_t @ w_t.T, direction).float()
    (dense * upstream).sum().backward()
    assert torch.allclose(kl, dense, atol=1e-5, rtol=0)
    assert torch.allclose(grads[0], h_s.grad, atol=1e-5, rtol=0)
    assert torch.allclose(grads[1], w_s.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_linear_kl_gradcheck_and_teacher_constant(direction):
    h_s, w_s, h_t, w_t = _heads(2, rows=3, vocab=9)
    h_s.requires_grad_(True), w_s.requires_grad_(True), h_t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: linear_kl(a, b, h_t, w_t, direction=direction, chunk_size=4), (h_s, w_s))
    linear_kl(h_s, w_s, h_t, w_t, direction=direction, chunk_size=4).sum().backward()
    assert h_t.grad is None


def test_linear_kl_matches_chunked_kl_on_logits_with_mask():
    h_s, w_s, h_t, w_t = _heads(3, rows=6)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    kl = linear_kl(h_s.view(2, 3, -1), w_s, h_t.view(2, 3, -1), w_t, mask.view(2, 3), "reverse", 8)
    want = chunked_kl(h_s @ w_s.T, h_t @ w_t.T, mask, "reverse", 8).view(2, 3)
    assert kl.shape == (2, 3) and torch.allclose(kl, want, atol=1e-12)
    assert kl[0, 2] == 0


def test_linear_kl_frozen_head_and_identical_models():
    h_s, w_s, _, _ = _heads(4)
    h_s.requires_grad_(True)  # e.g. LoRA: the LM head is frozen
    kl = linear_kl(h_s, w_s, h_s, w_s, chunk_size=10)
    assert torch.allclose(kl, torch.zeros(6, dtype=torch.float64), atol=1e-12)
    kl.sum().backward()
    assert h_s.grad is not None and w_s.grad is None


def test_linear_kl_leading_rows_and_gather_entered_in_forward_and_backward():
    """``vocab`` takes the leading rows of heads padded differently (as Qwen2.5 1.5B vs 7B); the
    weights are read only inside ``gather`` (ZeRO-3), entered once for forward, once for backward."""
    h_s, w_s, h_t, w_t = _heads(7)
    padded_s = torch.cat([w_s, torch.randn(3, w_s.shape[1], dtype=w_s.dtype)]).requires_grad_(True)
    padded_t = torch.cat([w_t, torch.randn(9, w_t.shape[1], dtype=w_t.dtype)])
    plain = w_s.clone().requires_grad_(True)
    entered = []

    @contextlib.contextmanager
    def gather():
        entered.append("in")
        yield
        entered.append("out")

    kl = linear_kl(h_s, padded_s, h_t, padded_t, direction="reverse", chunk_size=8, vocab=41, gather=gather)
    assert entered == ["in", "out"]
    expected = linear_kl(h_s, plain, h_t, w_t, direction="reverse", chunk_size=8)
    assert torch.allclose(kl, expected, atol=1e-12)
    kl.sum().backward()
    expected.sum().backward()
    assert entered == ["in", "out", "in", "out"]
    assert torch.allclose(padded_s.grad[:41], plain.grad, atol=1e-12)
    assert torch.equal(padded_s.grad[41:], torch.zeros(3, w_s.shape[1], dtype=w_s.dtype))
    with pytest.raises(StageError, match="vocab 42 is not within both heads"):
        linear_kl(h_s, w_s, h_t, padded_t, vocab=42)


def test_linear_kl_errors():
    h_s, w_s, h_t, w_t = _heads(5)
    with pytest.raises(StageError, match="student vocabulary 41 != teacher vocabulary 40"):
        linear_kl(h_s, w_s, h_t, w_t[:40])
    with pytest.raises(StageError, match="positions"):
        linear_kl(h_s, w_s, h_t[:5], w_t)
    with pytest.raises(StageError, match="direction must be forward or reverse"):
        linear_kl(h_s, w_s, h_t, w_t, direction="js")

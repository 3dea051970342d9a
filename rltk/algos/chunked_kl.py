"""Token-level full-vocabulary KL between teacher and student next-token distributions, computed
in vocabulary chunks so no ``[rows, vocab]`` temporary is ever built (PACED, arXiv 2603.11178;
docs/algorithms/reference.md §7).

- ``forward``: KL(teacher ‖ student) = Σ_v p_t,v (log p_t,v − log p_s,v)
- ``reverse``: KL(student ‖ teacher) = Σ_v p_s,v (log p_s,v − log p_t,v)

One pass over the vocabulary keeps running maxima, normalisers and the expectation E_p[s − t] per
row (the online-softmax rescaling of Milakov & Gimelshein 2018), from which
KL_fwd = −E_t[s − t] + lse_s − lse_t and KL_rev = E_s[s − t] − lse_s + lse_t. The gradient with
respect to the student logits is p_s − p_t (forward) and p_s·(log p_s − log p_t − KL_rev)
(reverse); the backward recomputes each chunk instead of saving it.

Two entry points share that arithmetic: :func:`chunked_kl` on logits the caller already holds, and
:func:`linear_kl` on final hidden states and LM-head weights, which computes each chunk's logits
as ``h @ W[chunk]ᵀ`` in forward and again in backward, so even the student's full logits never
exist (the fused linear + loss idea of Liger-Kernel's fused linear cross-entropy). Teachers are
constants: no gradient flows to them. Computation is in float32 (or the inputs' dtype if wider).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import Tensor

from rltk.algos.registry import StageError

KL_DIRECTIONS = ("forward", "reverse")
ChunkLogits = Callable[[slice], tuple[Tensor, Tensor]]  # vocabulary slice -> (student, teacher) [R, c]


def chunks(size: int, chunk_size: int):
    """Consecutive slices of ``range(size)`` of at most ``chunk_size`` (vocabulary or token chunks)."""
    for start in range(0, size, chunk_size):
        yield slice(start, min(start + chunk_size, size))


def _streaming_stats(logits: ChunkLogits, rows: int, vocab: int, direction: str, chunk_size: int,
                     dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """One pass over vocabulary chunks: lse_s, lse_t and E_p[s − t] per row, p the teacher's
    distribution for ``forward`` and the student's for ``reverse``. Running sums are rescaled
    whenever a running max grows, so only ``[rows, chunk_size]`` temporaries exist."""
    neg_inf = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
    max_s, max_t = neg_inf.clone(), neg_inf.clone()
    sum_s = torch.zeros(rows, dtype=dtype, device=device)
    sum_t, weighted = torch.zeros_like(sum_s), torch.zeros_like(sum_s)
    for part in chunks(vocab, chunk_size):
        s, t = logits(part)
        new_max_s = torch.maximum(max_s, s.max(-1).values)
        new_max_t = torch.maximum(max_t, t.max(-1).values)
        exp_s = torch.exp(s - new_max_s.unsqueeze(-1))
        exp_t = torch.exp(t - new_max_t.unsqueeze(-1))
        scale_s = torch.exp(max_s - new_max_s)  # exp(-inf) = 0 on the first chunk
        scale_t = torch.exp(max_t - new_max_t)
        p_exp, p_scale = (exp_t, scale_t) if direction == "forward" else (exp_s, scale_s)
        weighted = weighted * p_scale + (p_exp * (s - t)).sum(-1)
        sum_s = sum_s * scale_s + exp_s.sum(-1)
        sum_t = sum_t * scale_t + exp_t.sum(-1)
        max_s, max_t = new_max_s, new_max_t
    lse_s = max_s + torch.log(sum_s)
    lse_t = max_t + torch.log(sum_t)
    mean_diff = weighted / (sum_t if direction == "forward" else sum_s)
    return lse_s, lse_t, mean_diff


def _kl_forward(logits: ChunkLogits, rows: int, vocab: int, direction: str, chunk_size: int, dtype, device):
    lse_s, lse_t, mean_diff = _streaming_stats(logits, rows, vocab, direction, chunk_size, dtype, device)
    if direction == "forward":  # Σ p_t (log p_t − log p_s) = −E_t[s − t] + lse_s − lse_t
        kl = -mean_diff + lse_s - lse_t
    else:  # Σ p_s (log p_s − log p_t) = E_s[s − t] − lse_s + lse_t
        kl = mean_diff - lse_s + lse_t
    return kl, lse_s, lse_t


def _logit_grad(s: Tensor, t: Tensor, lse_s: Tensor, lse_t: Tensor, kl: Tensor, grad_kl: Tensor,
                direction: str) -> Tensor:
    """∂(grad_kl · KL)/∂s on one chunk ``[R, c]``."""
    log_ps = s - lse_s.unsqueeze(-1)
    p_s = torch.exp(log_ps)
    if direction == "forward":  # ∂/∂s_j = p_s,j − p_t,j
        local = p_s - torch.exp(t - lse_t.unsqueeze(-1))
    else:  # ∂/∂s_j = p_s,j·(log p_s,j − log p_t,j − KL)
        local = p_s * (log_ps - (t - lse_t.unsqueeze(-1)) - kl.unsqueeze(-1))
    return grad_kl.unsqueeze(-1) * local


def _check(direction: str, chunk_size: int, name: str) -> None:
    if direction not in KL_DIRECTIONS:
        raise StageError(f"{name}: direction must be forward or reverse, got '{direction}'")
    if chunk_size < 1:
        raise StageError(f"{name}: chunk_size must be >= 1, got {chunk_size}")


# --------------------------------------------------------------------------------------------
# On logits


class _ChunkedKL(torch.autograd.Function):
    """Token KL over rows ``[R, V]`` of logits with a chunked backward; the teacher is a constant."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, direction: str, chunk_size: int) -> Tensor:
        dtype = torch.promote_types(student.dtype, torch.float32)

        def logits(part):
            return student[:, part].to(dtype), teacher[:, part].to(dtype)

        kl, lse_s, lse_t = _kl_forward(logits, student.shape[0], student.shape[-1], direction, chunk_size,
                                       dtype, student.device)
        ctx.save_for_backward(student, teacher, lse_s, lse_t, kl)
        ctx.direction, ctx.chunk_size = direction, chunk_size
        return kl

    @staticmethod
    def backward(ctx, grad_kl: Tensor):
        student, teacher, lse_s, lse_t, kl = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad = torch.empty_like(student)
        g = grad_kl.to(kl.dtype)
        for part in chunks(student.shape[-1], ctx.chunk_size):
            s, t = student[:, part].to(kl.dtype), teacher[:, part].to(kl.dtype)
            grad[:, part] = _logit_grad(s, t, lse_s, lse_t, kl, g, ctx.direction).to(grad.dtype)
        return grad, None, None, None


def chunked_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    direction: str = "forward",
    chunk_size: int = 4096,
) -> Tensor:
    """Token-level full-vocabulary KL ``[...]`` between next-token distributions given as logits
    ``[..., V]`` (e.g. ``[N, T, V]``). ``direction`` ``forward`` = KL(teacher ‖ student),
    ``reverse`` = KL(student ‖ teacher). Extra memory beyond the inputs and the gradient is
    O(rows · chunk_size). The gradient flows to the student only. Positions where ``mask`` is 0
    give 0.
    """
    _check(direction, chunk_size, "chunked_kl")
    if student_logits.shape != teacher_logits.shape:
        raise StageError(
            f"chunked_kl: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    kl = _ChunkedKL.apply(
        student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab), direction, chunk_size
    ).reshape(lead)
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    return kl


# --------------------------------------------------------------------------------------------
# On hidden states and LM-head weights (the student's logits are never materialised)


class _LinearKL(torch.autograd.Function):
    """KL per row of ``h_s @ W_s[:vocab]ᵀ`` against ``h_t @ W_t[:vocab]ᵀ``; each chunk's logits are
    recomputed in backward. Gradients flow to ``h_s`` and ``W_s`` only.

    The weights are read only inside ``gather()``, entered once in forward and once in backward
    (under ZeRO-3 it makes the sharded heads whole on every rank for that time only), so they are
    kept on ``ctx`` as the parameters themselves rather than saved tensors: a saved tensor would
    hold the whole head from forward to backward, or go stale when ZeRO-3 re-shards it."""

    @staticmethod
    def forward(ctx, h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, vocab: int | None, direction: str,
                chunk_size: int, gather: Callable[[], ContextManager]) -> Tensor:
        dtype = torch.promote_types(h_s.dtype, torch.float32)
        hs, ht = h_s.to(dtype), h_t.to(dtype)
        with gather():
            vocab = _shared_rows(w_s, w_t, vocab)

            def logits(part):
                return hs @ w_s[part].to(dtype).T, ht @ w_t[part].to(device=ht.device, dtype=dtype).T

            kl, lse_s, lse_t = _kl_forward(logits, h_s.shape[0], vocab, direction, chunk_size, dtype, h_s.device)
        ctx.save_for_backward(h_s, h_t, lse_s, lse_t, kl)
        ctx.weights, ctx.gather = (w_s, w_t), gather
        ctx.vocab, ctx.direction, ctx.chunk_size = vocab, direction, chunk_size
        return kl

    @staticmethod
    def backward(ctx, grad_kl: Tensor):
        h_s, h_t, lse_s, lse_t, kl = ctx.saved_tensors
        w_s, w_t = ctx.weights
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None, None, None, None
        dtype = kl.dtype
        hs, ht, g = h_s.to(dtype), h_t.to(dtype), grad_kl.to(dtype)
        grad_h = torch.zeros_like(hs) if need_h else None
        with ctx.gather():
            grad_w = torch.zeros_like(w_s) if need_w else None  # rows past ``vocab`` get no gradient
            for part in chunks(ctx.vocab, ctx.chunk_size):
                ws = w_s[part].to(dtype)
                d = _logit_grad(hs @ ws.T, ht @ w_t[part].to(device=ht.device, dtype=dtype).T, lse_s, lse_t, kl, g,
                                ctx.direction)
                if need_h:
                    grad_h += d @ ws
                if need_w:
                    grad_w[part] = (d.T @ hs).to(grad_w.dtype)
        return (None if grad_h is None else grad_h.to(h_s.dtype)), grad_w, None, None, None, None, None, None


def _shared_rows(w_s: Tensor, w_t: Tensor, vocab: int | None) -> int:
    """The vocabulary rows the KL runs over: ``vocab`` leading rows of both heads, or all of them."""
    if vocab is None:
        if w_s.shape[0] != w_t.shape[0]:
            raise StageError(f"linear_kl: student vocabulary {w_s.shape[0]} != teacher vocabulary {w_t.shape[0]}")
        return w_s.shape[0]
    if not 0 < vocab <= min(w_s.shape[0], w_t.shape[0]):
        raise StageError(f"linear_kl: vocab {vocab} is not within both heads ({w_s.shape[0]} and {w_t.shape[0]} rows)")
    return vocab


def linear_kl(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor | None = None,
    direction: str = "forward",
    chunk_size: int = 4096,
    vocab: int | None = None,
    gather: Callable[[], ContextManager] | None = None,
) -> Tensor:
    """Token-level full-vocabulary KL ``[...]`` of the distributions softmax(h @ W[:vocab]ᵀ).

    ``student_hidden`` ``[..., H_s]`` and ``teacher_hidden`` ``[..., H_t]`` are final (post-norm)
    hidden states at the same positions; the weights are the LM heads ``[V, H]``, of which the
    first ``vocab`` rows are the vocabulary (default: all rows, which must then agree in number).
    ``gather`` is a context factory under which both weights are whole (ZeRO-3's
    :func:`rltk.trainer.distributed.gathered`), entered in forward and again in backward; default:
    they are whole already. Memory beyond the inputs and the weight gradient is O(rows ·
    chunk_size): neither model's ``[rows, V]`` logits are built. Gradients flow to the student's
    hidden states and weight; teacher tensors are constants.
    """
    _check(direction, chunk_size, "linear_kl")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise StageError(f"linear_kl: student positions {tuple(student_hidden.shape[:-1])} and teacher "
                         f"positions {tuple(teacher_hidden.shape[:-1])} differ")
    lead = student_hidden.shape[:-1]
    kl = _LinearKL.apply(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
                         teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight, vocab,
                         direction, chunk_size, gather or contextlib.nullcontext).reshape(lead)
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    return kl

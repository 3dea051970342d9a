"""Per-token log-probabilities (and entropy) of target tokens from final hidden states and an LM
head, in token chunks, so the ``[rows, T, V]`` logits never exist.

For each chunk of ``c`` token positions the logits ``z = (h W[:vocab]ᵀ + b) / τ`` (``τ`` the
sampling temperature) are built in float32, reduced to ``log p(y) = z_y − lse(z)`` (and the
entropy ``H = lse(z) − Σ_v p_v z_v``), and dropped; backward recomputes each chunk's logits and
applies

    ∂ log p(y) / ∂z_v = 1[v = y] − p_v,        ∂H / ∂z_v = −p_v (log p_v + H),

then ``∂/∂h = (∂/∂z) W / τ`` and ``∂/∂W = (∂/∂z)ᵀ h / τ``. Working memory is O(c · V), whatever the
number of rows: the fused linear + cross-entropy idea (Liger-Kernel's fused linear cross entropy;
Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009),
written for log-probs of sampled tokens, with temperature inside the chunk.

The LM-head weight is read only inside ``gather()`` — entered once in forward and once in backward
— exactly as :func:`rltk.algos.chunked_kl.linear_kl` does, so under ZeRO-3 the sharded head is whole
for that time only and its gradient reaches ZeRO's reduce like any parameter's. The matrix products
run in ``compute_dtype`` (bf16 under mixed precision), the softmax arithmetic in float32.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import Tensor

from rltk.algos.chunked_kl import chunks
from rltk.algos.registry import StageError

DEFAULT_TOKEN_CHUNK = 1024  # positions per chunk: [1024, 151,936] float32 logits are 0.58 GiB


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, vocab: int, temperature: float,
                  compute_dtype: torch.dtype) -> Tensor:
    """``(h W[:vocab]ᵀ + b) / τ`` of one chunk ``[c, H]``, float32 ``[c, vocab]``."""
    z = (h.to(compute_dtype) @ weight[:vocab].to(compute_dtype).T).float()
    if bias is not None:
        z += bias[:vocab].float()
    return z.div_(temperature)


class _LinearLogps(torch.autograd.Function):
    """log p(target) and (optionally) entropy per row of ``h`` under ``softmax((h Wᵀ + b)/τ)``."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, vocab: int | None,
                temperature: float, chunk_size: int, with_entropy: bool, compute_dtype: torch.dtype | None,
                gather: Callable[[], ContextManager]):
        rows = h.shape[0]
        logps = torch.empty(rows, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if with_entropy else logps.new_empty(0)
        with gather():
            vocab = weight.shape[0] if vocab is None else vocab
            dtype = compute_dtype or torch.promote_types(h.dtype, weight.dtype)
            for part in chunks(rows, chunk_size):
                z = _chunk_logits(h[part], weight, bias, vocab, temperature, dtype)
                picked = z.gather(-1, target[part].unsqueeze(-1)).squeeze(-1)
                top = z.max(-1, keepdim=True).values
                if with_entropy:  # H = lse − Σ_v p_v z_v, with p = exp(z − lse)
                    exp = torch.exp(z - top)
                    total = exp.sum(-1)
                    entropy[part] = (top.squeeze(-1) + total.log()) - (exp * z).sum(-1) / total
                    del exp
                else:  # one [c, V] buffer: z becomes exp(z − max) in place
                    total = z.sub_(top).exp_().sum(-1)
                lse[part] = top.squeeze(-1) + total.log()
                logps[part] = picked - lse[part]
                del z  # before the next chunk's logits exist: one [c, V] buffer at a time
        ctx.save_for_backward(h, target, lse, entropy)
        ctx.weights, ctx.gather = (weight, bias), gather
        ctx.vocab, ctx.temperature, ctx.chunk_size, ctx.dtype = vocab, temperature, chunk_size, dtype
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps: Tensor, grad_entropy: Tensor):
        h, target, lse, entropy = ctx.saved_tensors
        weight, bias = ctx.weights
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        if not (need_h or need_w or need_b):
            return (None,) * 10
        with_entropy = entropy.numel() > 0 and grad_entropy is not None
        grad_h = torch.empty_like(h) if need_h else None
        with ctx.gather():
            grad_w = torch.zeros_like(weight) if need_w else None  # rows past ``vocab`` get no gradient
            grad_b = torch.zeros_like(bias) if need_b else None
            w = weight[: ctx.vocab].to(ctx.dtype)
            for part in chunks(h.shape[0], ctx.chunk_size):
                h_part = h[part].to(ctx.dtype)
                z = _chunk_logits(h_part, weight, bias, ctx.vocab, ctx.temperature, ctx.dtype)
                log_p = z.sub_(lse[part].unsqueeze(-1))  # in place: z is not needed again
                g = grad_logps[part].float().unsqueeze(-1)
                if with_entropy:  # ∂H/∂z = −p (log p + H)
                    p = log_p.exp()
                    log_p.add_(entropy[part].unsqueeze(-1)).mul_(p).mul_(-grad_entropy[part].float().unsqueeze(-1))
                    d = log_p.sub_(p.mul_(g))
                    del p
                else:  # one [c, V] buffer: log p becomes −g·p in place
                    d = log_p.exp_().mul_(-g)
                d.scatter_add_(-1, target[part].unsqueeze(-1), g)  # + g · 1[v = y]
                d.div_(ctx.temperature)
                d_c = d.to(ctx.dtype)
                if need_h:
                    grad_h[part] = (d_c @ w).to(h.dtype)
                if need_w:
                    grad_w[: ctx.vocab] += (h_part.T @ d_c).T.to(grad_w.dtype)  # d_cᵀ h without a transposed copy of d_c
                if need_b:
                    grad_b[: ctx.vocab] += d.sum(0).to(grad_b.dtype)
                del z, log_p, d, d_c  # one [c, V] buffer at a time (all four name it)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def linear_logps(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_TOKEN_CHUNK,
    with_entropy: bool = False,
    vocab: int | None = None,
    compute_dtype: torch.dtype | None = None,
    gather: Callable[[], ContextManager] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(log p(target), entropy or None)``, each ``[...]`` float32, of the distributions
    ``softmax((hidden W[:vocab]ᵀ + bias) / temperature)``.

    ``hidden`` ``[..., H]`` are final (post-norm) hidden states, ``weight`` the LM head ``[V, H]``
    (``vocab`` leading rows are scored; default all), ``target`` ``[...]`` token ids. Memory beyond
    the inputs and the weight gradient is O(chunk_size · V); the logits of all positions are never
    held. ``gather`` is a context factory under which ``weight`` (and ``bias``) are whole (ZeRO-3's
    :func:`rltk.trainer.distributed.gathered`); ``compute_dtype`` the matmul dtype (default: the
    inputs' promoted dtype). Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """
    if chunk_size < 1:
        raise StageError(f"linear_logps: chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise StageError(f"linear_logps: temperature must be > 0, got {temperature}")
    if hidden.shape[:-1] != target.shape:
        raise StageError(f"linear_logps: hidden positions {tuple(hidden.shape[:-1])} and targets "
                         f"{tuple(target.shape)} differ")
    lead = target.shape
    logps, entropy = _LinearLogps.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, target.reshape(-1).to(hidden.device), vocab,
        float(temperature), chunk_size, with_entropy, compute_dtype, gather or contextlib.nullcontext)
    return logps.reshape(lead), (entropy.reshape(lead) if with_entropy else None)

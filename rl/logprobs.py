"""Token log-probabilities at the scored positions only.

``log p(y) = z_y - logsumexp(z)`` computed row by row in chunks of positions: the float32
copy of a chunk of logits (``chunk_size x V``) is the largest float32 tensor ever made, in the
forward and in the backward pass. There is never a ``[B, T, V]`` float32 log-softmax, and
positions that are not scored cost nothing (LLaDA's vocabulary has 126k entries). Works with
bf16/fp16 logits; results are float32.

The backward pass is written by hand (``d log p(y) / d z = onehot(y) - softmax(z)``, the
softmax recomputed per chunk from the saved logsumexp), so autograd keeps no float32 copy of
the logits alive between forward and backward.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 256  # positions per float32 chunk: 256 x 126k x 4 B = 129 MB for LLaDA


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 logits (kept exact for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SelectedLogSoftmax(torch.autograd.Function):
    """``out[i] = log_softmax(logits2d[rows[i]])[targets[i]]``, chunked over ``i``."""

    @staticmethod
    def forward(ctx, logits2d: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        n, acc = rows.numel(), _accumulate_dtype(logits2d.dtype)
        out = torch.empty(n, dtype=acc, device=logits2d.device)
        lse = torch.empty(n, dtype=acc, device=logits2d.device)
        for s in range(0, n, chunk_size):
            x = logits2d[rows[s:s + chunk_size]].to(acc)
            lse[s:s + chunk_size] = torch.logsumexp(x, dim=-1)
            out[s:s + chunk_size] = x.gather(-1, targets[s:s + chunk_size, None]).squeeze(-1) - lse[s:s + chunk_size]
        if ctx.needs_input_grad[0]:
            # Keep only the scored rows alive for backward when they are a small part of the logits.
            if 2 * n < logits2d.shape[0]:
                saved, saved_rows = logits2d[rows], torch.arange(n, device=rows.device)
            else:
                saved, saved_rows = logits2d, rows
            ctx.save_for_backward(saved, saved_rows, rows, targets, lse)
        ctx.shape, ctx.chunk_size = logits2d.shape, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved, saved_rows, rows, targets, lse = ctx.saved_tensors
        c = ctx.chunk_size
        grad = torch.zeros(ctx.shape, dtype=saved.dtype, device=saved.device)
        for s in range(0, rows.numel(), c):
            g_out = grad_out[s:s + c, None].to(lse.dtype)
            g = (saved[saved_rows[s:s + c]].to(lse.dtype) - lse[s:s + c, None]).exp_().mul_(-g_out)  # -g * softmax
            g.scatter_add_(-1, targets[s:s + c, None], g_out)  # + g * onehot(y)
            grad[rows[s:s + c]] = g.to(grad.dtype)  # rows are distinct
        return grad, None, None, None


def gather_logprobs(logits2d: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, *,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """``log_softmax(logits2d[rows], -1).gather(-1, targets)`` as float32 ``[N]`` (float64 for
    float64 logits) without a full float32 log-softmax. ``logits2d``: ``[M, V]``;
    ``rows``/``targets``: ``[N]`` long, ``rows`` distinct. Differentiable in ``logits2d``."""
    if chunk_size < 1:
        raise ValueError(f"gather_logprobs: chunk_size must be >= 1, got {chunk_size}")
    return _SelectedLogSoftmax.apply(logits2d, rows, targets, chunk_size)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, select: torch.Tensor | None = None, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Per-position ``log p(targets[b, t] | logits[b, t])`` as float32 ``[B, T]``, computed only
    where ``select`` (bool ``[B, T]``; all positions if None) and 0 elsewhere.

    Finding the selected positions costs one device-to-host sync (``nonzero``)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"token_logprobs: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    flat_targets = targets.reshape(-1)
    if select is None:
        rows = torch.arange(flat_targets.numel(), device=targets.device)
    else:
        if select.shape != targets.shape:
            raise ValueError(f"token_logprobs: select {tuple(select.shape)} and targets "
                             f"{tuple(targets.shape)} disagree")
        rows = select.reshape(-1).nonzero().squeeze(-1)
    logits2d = logits.reshape(-1, logits.shape[-1])  # a view for the (contiguous) model output
    vals = gather_logprobs(logits2d, rows, flat_targets[rows], chunk_size=chunk_size)
    out = torch.zeros(flat_targets.numel(), dtype=vals.dtype, device=logits.device)
    return out.index_put((rows,), vals).view(targets.shape)

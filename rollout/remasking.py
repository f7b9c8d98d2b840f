"""Per-step pieces of the denoising sampler: token proposals, confidence scores, the transfer
schedule and top-k selection (LLaDA, Nie et al. 2025, Alg. 4-5 and the reference ``generate``)."""

from __future__ import annotations

import torch

REMASKING = ("low_confidence", "random", "entropy", "margin")


def num_transfer_tokens(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """``[B] -> [B, steps]``: the masked count of a block spread evenly over its steps, the
    remainder one each in the earliest steps (LLaDA's linear schedule)."""
    base = masked_count[:, None] // steps
    rem = masked_count[:, None] % steps
    return base + (torch.arange(steps, device=masked_count.device)[None] < rem).long()


def propose_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """``x0 = argmax(logits + T * g)`` with Gumbel noise ``g = -log(-log u)``, ``u ~ U(0,1)`` in float64.

    This is the log of LLaDA's ``exp(logits) / (-log u)^T`` (same argmax, no overflow); at
    ``T = 0`` it is the plain argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits.double() - temperature * torch.log(-torch.log(u))).argmax(dim=-1)


def confidence_scores(probs: torch.Tensor, x0: torch.Tensor, remasking: str,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Score of every position (higher = commit earlier), ``[B, S]`` float32.

    ``low_confidence``: p(x0) (LLaDA); ``random``: U(0,1) (LLaDA); ``entropy``: -H(p);
    ``margin``: p_top1 - p_top2."""
    if remasking == "low_confidence":
        return probs.gather(-1, x0[..., None]).squeeze(-1)
    if remasking == "random":
        return torch.rand(x0.shape, device=x0.device, generator=generator)
    if remasking == "entropy":
        return (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    if remasking == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    raise ValueError(f"remasking={remasking!r}: expected one of {REMASKING}")


def top_k_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, S]``: the ``k[b]`` highest-scoring candidate positions of each row, without a
    host sync (rank by a stable descending sort; ties go to the earlier position)."""
    s = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return (ranks < k[:, None]) & candidates

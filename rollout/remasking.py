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


# The per-position statistics of softmax(logits) the loop may need, and the remasking strategy each
# one scores (``random`` draws U(0,1) instead). Both backends compute them with :func:`propose_and_score`.
STATS = ("p_x0", "margin", "entropy")
REMASKING_STAT = {"low_confidence": "p_x0", "margin": "margin", "entropy": "entropy"}


def needed_stats(remasking: str, threshold: float | None, early_commit: float | None) -> tuple[str, ...]:
    """The statistics a step needs: the remasking score, p(x0) for ``threshold``, the top-2 gap
    (``margin``) for ``early_commit``."""
    need = {REMASKING_STAT.get(remasking)}
    if threshold is not None:
        need.add("p_x0")
    if early_commit is not None:
        need.add("margin")
    return tuple(s for s in STATS if s in need)


def propose_and_score(logits: torch.Tensor, *, mask_id: int, temperature: float, generator: torch.Generator | None,
                      stats: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Proposals ``x0`` (the mask token never proposed, :func:`propose_tokens`) and the requested
    ``stats`` of ``p = softmax(logits)`` in float32 (LLaDA's reference computes confidences on
    the full softmax):

    ``p_x0``: p(x0) (LLaDA's low-confidence score); ``margin``: p_top1 - p_top2; ``entropy``: -H(p)."""
    proposal_logits = logits.clone()
    proposal_logits[..., mask_id] = float("-inf")  # never propose the mask token
    x0 = propose_tokens(proposal_logits, temperature, generator)
    out: dict[str, torch.Tensor] = {}
    if not stats:
        return x0, out
    probs = torch.softmax(logits.float(), dim=-1)
    if "p_x0" in stats:
        out["p_x0"] = probs.gather(-1, x0[..., None]).squeeze(-1)
    if "margin" in stats:
        top2 = probs.topk(2, dim=-1).values
        out["margin"] = top2[..., 0] - top2[..., 1]
    if "entropy" in stats:
        out["entropy"] = (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    return x0, out


def confidence_scores(stats: dict[str, torch.Tensor], x0: torch.Tensor, remasking: str,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Score of every position (higher = commit earlier), ``[B, S]`` float32.

    ``low_confidence``: p(x0) (LLaDA); ``random``: U(0,1) (LLaDA); ``entropy``: -H(p);
    ``margin``: p_top1 - p_top2 (from :func:`propose_and_score`'s ``stats``)."""
    if remasking == "random":
        return torch.rand(x0.shape, device=x0.device, generator=generator)
    if remasking in REMASKING_STAT:
        return stats[REMASKING_STAT[remasking]]
    raise ValueError(f"remasking={remasking!r}: expected one of {REMASKING}")


def top_k_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, S]``: the ``k[b]`` highest-scoring candidate positions of each row, without a
    host sync (rank by a stable descending sort; ties go to the earlier position)."""
    s = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return (ranks < k[:, None]) & candidates

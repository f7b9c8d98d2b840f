"""Plackett-Luce sampling without replacement and the log-probability of an ordered selection.

Used by the unmasking-order learner (DCoLT, Huang et al. 2025, "Reinforcing the Diffusion Chain
of Lateral Thought", unmasking policy module): at each denoising step K positions are drawn in
order from the candidates ``C`` with scores ``h``:

    log P(s_1, ..., s_K) = sum_j [ h_{s_j} - logsumexp_{c in C \\ {s_1..s_{j-1}}} h_c ].

A selection is stored as a ``rank`` tensor over positions: ``rank[i] = j`` if position ``i`` was
drawn ``j``-th (0-based), ``-1`` if it was not drawn. Sampling is Gumbel-top-k (perturb every
score with independent Gumbel(0, 1) noise and take the k largest in order), which is exactly
Plackett-Luce sampling without replacement (Yellott 1977; Kool et al. 2019, "Stochastic Beams").
"""

from __future__ import annotations

import torch


def _check(scores: torch.Tensor, candidates: torch.Tensor) -> None:
    if scores.shape != candidates.shape:
        raise ValueError(f"plackett_luce: scores {tuple(scores.shape)} and candidates "
                         f"{tuple(candidates.shape)} must have the same shape")


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard Gumbel samples ``-log(-log U)`` in float64 (drawn on the generator's device)."""
    src = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=src, dtype=torch.float64).to(device)
    tiny = torch.finfo(torch.float64).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1 - 1e-16)))


def sample_plackett_luce(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor | int, *,
                         generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
    """Draw ``k`` candidates in order (last dim = positions); returns ``rank`` (``-1`` = not drawn).

    ``k`` is an int or a tensor of the batch shape (one count per row), clipped to the number of
    candidates. ``greedy=True`` takes the top-k scores (the mode of the first k draws)."""
    _check(scores, candidates)
    cand = candidates.bool()
    keys = scores.detach().double()
    if not greedy:
        keys = keys + gumbel_noise(tuple(scores.shape), generator, scores.device)
    keys = keys.masked_fill(~cand, float("-inf"))
    pos_rank = keys.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    if not torch.is_tensor(k):
        k = torch.full(scores.shape[:-1], int(k), dtype=torch.long, device=scores.device)
    k = torch.minimum(k.to(scores.device).long(), cand.sum(-1))
    chosen = (pos_rank < k.unsqueeze(-1)) & cand
    return torch.where(chosen, pos_rank, torch.full_like(pos_rank, -1))


def plackett_luce_logprob(scores: torch.Tensor, candidates: torch.Tensor, rank: torch.Tensor, *,
                          validate: bool = True) -> torch.Tensor:
    """``sum_j [h_{s_j} - logsumexp over the not-yet-drawn candidates]`` over the last dim.

    Vectorised without a loop over j: sort the positions as (drawn ones by rank, then the
    undrawn candidates, then non-candidates); the j-th denominator is the reverse
    log-cumsum-exp of the sorted candidate scores. Differentiable in ``scores`` (float32).
    ``validate=False`` skips the drawn-are-candidates check (a host sync), for ``rank`` fresh
    from :func:`sample_plackett_luce` inside the denoising loop."""
    _check(scores, candidates)
    if rank.shape != scores.shape:
        raise ValueError(f"plackett_luce_logprob: rank {tuple(rank.shape)} must match scores {tuple(scores.shape)}")
    cand = candidates.bool()
    drawn = rank >= 0
    if validate and bool((drawn & ~cand).any()):
        raise ValueError("plackett_luce_logprob: a drawn position (rank >= 0) is not a candidate")
    n = scores.shape[-1]
    sort_key = torch.where(drawn, rank, torch.full_like(rank, n)).masked_fill(~cand, n + 1)
    perm = sort_key.argsort(dim=-1, stable=True)
    low = torch.finfo(torch.float32).min / 4  # finite: keeps gradients NaN-free on empty suffixes
    h = scores.float().masked_fill(~cand, low).gather(-1, perm)
    denom = torch.logcumsumexp(h.flip(-1), dim=-1).flip(-1)
    terms = (h - denom).masked_fill(~drawn.gather(-1, perm), 0.0)
    return terms.sum(-1)

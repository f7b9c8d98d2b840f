"""The one masking utility of the forward (noising) process of masked diffusion.

Every random draw takes an explicit ``torch.Generator``; random numbers are drawn on the
generator's device and moved to the data's device, so a CPU generator drives GPU training
reproducibly. Nothing here touches the global RNG.
"""

from __future__ import annotations

import torch


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """``U[0, 1)`` float32 samples of ``shape`` from ``generator``, placed on ``device``."""
    src = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=src).to(device)


def sample_t(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str, *,
             low: float = 1e-3, high: float = 1.0) -> torch.Tensor:
    """Mask ratios ``t ~ U(low, high)`` (LLaDA samples ``t ~ U(eps, 1)``)."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"sample_t: need 0 <= low < high <= 1, got low={low}, high={high}")
    return low + (high - low) * uniform(shape, generator, device)


def bernoulli_mask(valid: torch.Tensor, prob: torch.Tensor | float, generator: torch.Generator | None) -> torch.Tensor:
    """Mask each ``valid`` position independently with probability ``prob`` (broadcast
    against ``valid``, e.g. ``[..., 1]`` for one ratio per row). Returns a bool tensor."""
    return (uniform(tuple(valid.shape), generator, valid.device) < prob) & valid.bool()


def exact_count_mask(valid: torch.Tensor, count: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mask exactly ``min(count, #valid)`` of the ``valid`` positions of each row (last dim),
    the subset uniform among subsets of that size. ``count`` has ``valid``'s shape minus the
    last dim. Implementation: a uniformly random order of the valid positions (invalid ones
    sorted last), keep the first ``count``."""
    valid = valid.bool()
    keys = uniform(tuple(valid.shape), generator, valid.device).masked_fill(~valid, 2.0)
    rank = keys.argsort(dim=-1).argsort(dim=-1)
    return (rank < count.unsqueeze(-1)) & valid


def apply_mask(input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``input_ids`` with ``mask_id`` where ``masked`` (broadcasts, e.g. ``[K, B, T]`` masks over ``[B, T]`` ids)."""
    return torch.where(masked.bool(), torch.full_like(input_ids, mask_id), input_ids)

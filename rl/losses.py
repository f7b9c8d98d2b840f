"""Training losses shared by the trainers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_sft_loss(model, input_ids: torch.Tensor, response_mask: torch.Tensor, *, mask_id: int,
                       attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       eps: float = 1e-3) -> torch.Tensor:
    """Masked-diffusion SFT loss (LLaDA, Nie et al. 2025, Eq. 5 restricted to the response):

        L = E_t [ 1/t * sum_{i in response, x_t^i = M} -log p(x_0^i | x_t) ] / |response|

    with t ~ U(eps, 1) per row and each response token masked independently with probability t;
    prompt tokens are never masked. Averaged over rows.
    """
    b = input_ids.shape[0]
    device = input_ids.device
    resp = response_mask.bool()
    t = eps + (1 - eps) * torch.rand(b, 1, generator=generator, device=device)
    masked = (torch.rand(input_ids.shape, generator=generator, device=device) < t) & resp
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    logits = model(noisy, attention_mask=attention_mask).logits
    # cross-entropy only at masked positions (no full-vocab log-softmax elsewhere)
    ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")
    per_row = torch.zeros(b, device=device, dtype=ce.dtype).index_add_(0, masked.nonzero()[:, 0], ce)
    per_row = per_row / t.squeeze(1) / resp.sum(1).clamp(min=1)
    return per_row.mean()

"""Training losses shared by the trainers."""

from __future__ import annotations

import torch

from rl.logprobs import token_logprobs
from rl.masking import apply_mask, bernoulli_mask, sample_t


def diffusion_sft_loss(model, input_ids: torch.Tensor, response_mask: torch.Tensor, *, mask_id: int,
                       attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       eps: float = 1e-3) -> torch.Tensor:
    """Masked-diffusion SFT loss (LLaDA, Nie et al. 2025, Eq. 5 restricted to the response):

        L = E_t [ 1/t * sum_{i in response, x_t^i = M} -log p(x_0^i | x_t) ] / |response|

    with t ~ U(eps, 1) per row and each response token masked independently with probability t;
    prompt tokens are never masked. Averaged over rows.
    """
    resp = response_mask.bool()
    t = sample_t((input_ids.shape[0], 1), generator, input_ids.device, low=eps)
    masked = bernoulli_mask(resp, t, generator)
    logits = model(apply_mask(input_ids, masked, mask_id), attention_mask=attention_mask).logits
    # log-probs only at masked positions (chunked; no full-vocab float32 log-softmax)
    logp = token_logprobs(logits, input_ids, masked)
    per_row = -logp.sum(1) / t.squeeze(1) / resp.sum(1).clamp(min=1)
    return per_row.mean()

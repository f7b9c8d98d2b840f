"""Training losses shared by the trainers."""

from __future__ import annotations

import torch

from rl.logprobs import token_logprobs
from rl.masking import apply_mask, bernoulli_mask, sample_t
from rollout.adapter import PolicyAdapter, unwrap_model


def draw_sft_noise(response_mask: torch.Tensor, generator: torch.Generator | None,
                   eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process of LLaDA's SFT loss for a batch: ``t ~ U(eps, 1)`` per row (``[B, 1]``)
    and each response token masked independently with probability ``t`` (``[B, T]`` bool)."""
    resp = response_mask.bool()
    t = sample_t((resp.shape[0], 1), generator, resp.device, low=eps)
    return t, bernoulli_mask(resp, t, generator)


def masked_token_logprobs(model, input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log p(x_0^i | x_t)`` at the ``masked`` positions (0 elsewhere), float32 ``[B, T]``, for
    ``x_t`` = ``input_ids`` with ``mask_id`` at ``masked``.

    Through the policy adapter's fused scoring when it has it (the LM head on the masked positions
    only, in activation-checkpointed chunks: no ``[B, T, V]`` logits and no gradient buffer of that
    size; :meth:`rollout.PolicyAdapter.forward`), else full logits and chunked log-probs
    (:func:`rl.logprobs.token_logprobs`)."""
    noisy = apply_mask(input_ids, masked, mask_id)
    inner = unwrap_model(model)
    if isinstance(inner, PolicyAdapter) and inner.fused_scoring:
        # a shifted model (Dream) predicts position i from position i - 1: position 0 has no
        # prediction and is never a response token (every example starts with its prompt)
        keep = input_ids.shape[1] - int(bool(inner.logits_shifted))
        targets = input_ids[:, -keep:].masked_fill(~masked[:, -keep:], -1)
        logp = model(noisy, attention_mask=attention_mask, logits_to_keep=keep, score_targets=targets).token_logps
        return torch.nn.functional.pad(logp, (input_ids.shape[1] - keep, 0))
    logits = model(noisy, attention_mask=attention_mask).logits
    return token_logprobs(logits, input_ids, masked)  # chunked; no full-vocab float32 log-softmax


def diffusion_sft_loss(model, input_ids: torch.Tensor, response_mask: torch.Tensor, *, mask_id: int,
                       attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       eps: float = 1e-3, noise: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Masked-diffusion SFT loss (LLaDA, Nie et al. 2025, Eq. 5 restricted to the response):

        L = E_t [ 1/t * sum_{i in response, x_t^i = M} -log p(x_0^i | x_t) ] / |response|

    with t ~ U(eps, 1) per row and each response token masked independently with probability t;
    prompt tokens are never masked. Averaged over rows. ``noise``: ``(t [B, 1], masked [B, T])``
    drawn beforehand (:func:`draw_sft_noise`), else drawn here from ``generator``.
    """
    resp = response_mask.bool()
    t, masked = noise if noise is not None else draw_sft_noise(resp, generator, eps)
    logp = masked_token_logprobs(model, input_ids, masked, mask_id, attention_mask)
    per_row = -logp.sum(1) / t.squeeze(1) / resp.sum(1).clamp(min=1)
    return per_row.mean()

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
    fused = _fused_scores(model, noisy, input_ids, masked, attention_mask)
    if fused is not None:
        return fused[0]
    logits = model(noisy, attention_mask=attention_mask).logits
    return token_logprobs(logits, input_ids, masked)  # chunked; no full-vocab float32 log-softmax


def _fused_scores(model, noisy: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor,
                  attention_mask: torch.Tensor | None, entropy_temperature: float | None = None):
    """The adapter's fused scoring of ``masked`` positions as ``[B, T]`` tensors (log-probs; with
    ``entropy_temperature`` also entropies and argmax-correct), or None when the model has none."""
    inner = unwrap_model(model)
    if not (isinstance(inner, PolicyAdapter) and inner.fused_scoring):
        return None
    # a shifted model (Dream) predicts position i from position i - 1: position 0 has no
    # prediction and is never a response token (every example starts with its prompt)
    keep = input_ids.shape[1] - int(bool(inner.logits_shifted))
    targets = input_ids[:, -keep:].masked_fill(~masked[:, -keep:], -1)
    out = model(noisy, attention_mask=attention_mask, logits_to_keep=keep, score_targets=targets,
                **({} if entropy_temperature is None else {"entropy_temperature": entropy_temperature}))
    parts = (out.token_logps,) if entropy_temperature is None else (out.token_logps, out.token_entropy,
                                                                     out.token_correct)
    return tuple(torch.nn.functional.pad(t, (input_ids.shape[1] - keep, 0)) for t in parts)


def masked_token_scores(model, input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int,
                        attention_mask: torch.Tensor | None = None, *,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p(x_0^i | x_t), H(softmax(logits_i / temperature)), argmax_i == x_0^i)`` at the
    ``masked`` positions (0 elsewhere), each float32 ``[B, T]``; the third carries no gradient.
    Fused scoring when the adapter has it (the head on masked positions only), else full logits."""
    noisy = apply_mask(input_ids, masked, mask_id)
    fused = _fused_scores(model, noisy, input_ids, masked, attention_mask, temperature)
    if fused is not None:
        return fused
    logits = model(noisy, attention_mask=attention_mask).logits
    sel = masked.nonzero(as_tuple=True)
    z = logits[sel].float()
    logp_t = torch.log_softmax(z / temperature, dim=-1)
    parts = (torch.log_softmax(z, dim=-1).gather(-1, input_ids[sel][:, None]).squeeze(-1),
             -(logp_t.exp() * logp_t).sum(-1), (z.detach().argmax(-1) == input_ids[sel]).float())
    zeros = torch.zeros(masked.shape, dtype=torch.float32, device=logits.device)
    return tuple(zeros.index_put(sel, p) for p in parts)


def certainty_forcing_loss(entropy: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """dParallel's certainty-forcing term (Chen et al. 2025, "dParallel: Learnable Parallel
    Decoding for dLLMs", Sec. 3): the mean entropy of the temperature-scaled prediction over the
    masked positions whose greedy prediction is already the target,

        L_cert = sum_i 1[argmax p_i = x_0^i] H(softmax(z_i / T)) / max(1, sum_i 1[argmax p_i = x_0^i]).

    Minimising it makes correct predictions confident sooner, so more positions clear a decoding
    threshold (or the top-k of a few-step schedule) in the same pass; wrong ones are left to the
    cross-entropy term. ``entropy`` / ``correct``: :func:`masked_token_scores` (0 off the mask)."""
    return (entropy * correct).sum() / correct.sum().clamp(min=1)


def diffusion_sft_loss(model, input_ids: torch.Tensor, response_mask: torch.Tensor, *, mask_id: int,
                       attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       eps: float = 1e-3, noise: tuple[torch.Tensor, torch.Tensor] | None = None,
                       certainty_weight: float = 0.0, certainty_temperature: float = 0.5,
                       parts: dict | None = None) -> torch.Tensor:
    """Masked-diffusion SFT loss (LLaDA, Nie et al. 2025, Eq. 5 restricted to the response):

        L = E_t [ 1/t * sum_{i in response, x_t^i = M} -log p(x_0^i | x_t) ] / |response|

    with t ~ U(eps, 1) per row and each response token masked independently with probability t;
    prompt tokens are never masked. Averaged over rows. ``noise``: ``(t [B, 1], masked [B, T])``
    drawn beforehand (:func:`draw_sft_noise`), else drawn here from ``generator``.

    ``certainty_weight = w > 0`` adds ``w * L_cert`` (:func:`certainty_forcing_loss`, entropies at
    ``certainty_temperature``) from the same forward pass; ``parts`` (a dict) then receives the two
    terms (``ce``, ``certainty``, detached) for logging.
    """
    resp = response_mask.bool()
    t, masked = noise if noise is not None else draw_sft_noise(resp, generator, eps)
    if certainty_weight <= 0:
        logp = masked_token_logprobs(model, input_ids, masked, mask_id, attention_mask)
        return (-logp.sum(1) / t.squeeze(1) / resp.sum(1).clamp(min=1)).mean()
    logp, entropy, correct = masked_token_scores(model, input_ids, masked, mask_id, attention_mask,
                                                 temperature=certainty_temperature)
    ce = (-logp.sum(1) / t.squeeze(1) / resp.sum(1).clamp(min=1)).mean()
    cert = certainty_forcing_loss(entropy, correct)
    if parts is not None:
        parts.update(ce=ce.detach(), certainty=cert.detach())
    return ce + certainty_weight * cert

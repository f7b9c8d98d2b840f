"""Loss aggregation: per-element policy losses -> the scalar that is differentiated.

Registered in :data:`LOSS_TYPES` under TRL's ``loss_type`` names where the meaning is the same
(GRPOConfig.loss_type), plus verl's ``seq_mean_token_sum`` for TraceRL. Each returns the weight
``w [n, L]`` of every element of a micro-batch so that its loss is ``sum(loss * w)``; the same
weights average the logged metrics (kl, clip fraction).

A sequence-level loss (one value per completion) is spread over the completion's tokens first
(:func:`per_token`), so every aggregation applies to it: ``grpo`` then gives the mean over
sequences, ``dapo`` weighs each sequence by its token count (SPG's ``sum(loss * |o|) / sum |o|``).

Counts are over the step's *global* batch (every rank and micro-batch) divided by the world
size, because DeepSpeed averages gradients over ranks: the loss then does not depend on
``micro_batch_size`` or on how rows are split over ranks (tests/test_rank_equivalence.py),
except for ``bnpo``, which is per micro-batch by definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.registry import Registry

LOSS_TYPES = Registry("loss_type")


@dataclass(frozen=True)
class BatchCounts:
    """The step's normalisers, per rank (global count / world size): valid completion
    ``tokens`` and ``rows``; ``max_len``: the completion width L (TRL's max_completion_length);
    ``num_micro``: micro-batches per iteration on this rank."""

    tokens: float
    rows: float
    max_len: int
    num_micro: int


def per_token(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A ``[n]`` sequence-level loss spread over its ``[n, L]`` tokens (``[n, L]`` passes through)."""
    return loss.unsqueeze(-1).expand_as(mask) if loss.dim() == 1 else loss


@LOSS_TYPES.register(name="dapo")
def token_mean_global(mask: torch.Tensor, counts: BatchCounts) -> torch.Tensor:
    """Token mean over the global batch (DAPO, Yu et al. 2025, Eq. 8; TRL ``"dapo"``): every valid
    token of the step weighs the same. d1 Eq. 3's 1/|o_i| token mean, normalised over the batch."""
    return mask / max(counts.tokens, 1.0)


@LOSS_TYPES.register(name="grpo")
def seq_mean_token_mean(mask: torch.Tensor, counts: BatchCounts) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (GRPO, Shao et al. 2024, Eq. 3; TRL ``"grpo"``)."""
    return mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / max(counts.rows, 1.0)


@LOSS_TYPES.register(name="dr_grpo")
def token_sum_over_max_len(mask: torch.Tensor, counts: BatchCounts) -> torch.Tensor:
    """Token sum divided by rows x the completion width (Dr. GRPO, Liu et al. 2025, Sec. 3.1; TRL ``"dr_grpo"``)."""
    return mask / (max(counts.rows, 1.0) * counts.max_len)


@LOSS_TYPES.register(name="bnpo")
def token_mean_micro_batch(mask: torch.Tensor, counts: BatchCounts) -> torch.Tensor:
    """Token mean of each micro-batch, micro-batches averaged (TRL ``"bnpo"``; TRL 0.16's only
    form, so d1's code: its 12 completions in micro-batches of 6 are normalised per half)."""
    return mask / mask.sum().clamp(min=1.0) / counts.num_micro


@LOSS_TYPES.register(name="seq_mean_token_sum")
def seq_mean_token_sum(mask: torch.Tensor, counts: BatchCounts) -> torch.Tensor:
    """Token sum of each sequence, averaged over sequences (verl ``seq-mean-token-sum``; TraceRL's
    ``policy_loss = -sum(surrogate) / B``)."""
    return mask / max(counts.rows, 1.0)


def get_loss_type(name: str):
    return LOSS_TYPES.lookup(name)

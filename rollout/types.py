"""The ``Rollout`` record: what the sampler hands to rewards and trainers (one per batch)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Rollout:
    """A batch of denoising trajectories.

    Shapes: ``B`` rows, prompt width ``P`` (left-padded), completion width ``L`` (= gen_length).

    - ``sequences``: ``[B, P+L]`` prompt then completion, every mask resolved.
    - ``prompt_ids`` / ``prompt_mask``: ``[B, P]``; mask is 1 on real prompt tokens, 0 on padding.
    - ``completion_ids``: ``[B, L]``.
    - ``completion_mask``: ``[B, L]`` 1 up to and including the first EOS (all ones if none).
    - ``unmask_step``: ``[B, L]`` the global denoising step (0-based) at which each completion
      token was committed. With ``block_length``/``steps`` this gives the chosen positions and
      candidate sets of every step (candidates at step s of a block = positions of that block
      with ``unmask_step >= s``), which is all the unmasking-order learner needs.
    - ``num_forward_passes``: model forwards used (a CFG step counts 2).
    - ``step_scores``: optional ``[B, S, L]`` per-step scores of the candidate positions (NaN
      where not a candidate), recorded when ``record_scores=True``.
    """

    sequences: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    unmask_step: torch.Tensor
    num_forward_passes: int
    num_steps: int = 0
    step_scores: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[B, P+L]`` attention mask of ``sequences`` (prompt padding excluded)."""
        return torch.cat([self.prompt_mask, torch.ones_like(self.completion_ids)], dim=1).to(self.prompt_mask.dtype)

    def decode(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """Completion texts, each cut after its first EOS."""
        rows = []
        for ids, m in zip(self.completion_ids.tolist(), self.completion_mask.tolist()):
            rows.append([t for t, keep in zip(ids, m) if keep])
        return tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)

    def to(self, device) -> "Rollout":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device)
        return Rollout(**kw)


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for tokens up to and including the first ``eos_id`` of each row, 0 after it."""
    is_eos = completion_ids == eos_id
    # number of EOS strictly before each position
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).long()

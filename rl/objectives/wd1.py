"""wd1: ratio-free weighted policy optimization (Tang, Dolga, Yoon, Bogunovic 2025, "wd1: Weighted Policy
Optimization for Reasoning in Diffusion Language Models", arXiv:2507.08838, Sec. 3, the wd1 objective).

For a prompt q with G completions o_1..o_G from the rollout policy and advantages A_1..A_G,

    L_wd1(theta) = E_q [ sum_{i=1}^G ( -w+(q, o_i) + w-(q, o_i) ) log pi_theta(o_i | q) ],
    w+(q, o_i) = exp(A_i) / sum_{j=1}^G exp(A_j),      w-(q, o_i) = exp(-A_i) / sum_{j=1}^G exp(-A_j):

the completion likelihood weighted by a softmax of the group's advantages (energy-guided / advantage-
weighted regression towards pi_old * exp(A)) plus "unlearning" of the low-advantage completions
weighted by the softmax of -A. No ratio, no old-policy likelihood, no KL term: one likelihood
approximation (d1's one-step mean-field sum, rl.estimators.MeanField, by default) per update.

The authors' code (xiaohangt/wd1, wd1/trainers/rev_grpo_trainer.py ``compute_loss``) computes
``softmax(advantages, dim=0)`` over the rows handed to ``compute_loss`` (one micro-batch of
``per_device_train_batch_size`` rows) and returns the weighted *sum* over those rows; the optimizer
step averages micro-batches (gradient accumulation, DeepSpeed over ranks). Their configs
(wd1/train.yaml: per_device_train_batch_size = num_generations = 6) make every micro-batch exactly
one group, so there the code is the paper's equation, averaged over groups. Here:

- ``softmax_over="group"`` (default, the paper): weights from :meth:`WD1.prepare` on the step's
  whole batch, group by group, independent of ``micro_batch_size``;
- ``softmax_over="micro_batch"``: the authors' code literally, the softmax over the rows of each
  micro-batch (it mixes groups when a micro-batch holds several, or splits one).

Loss scale: the weights are stored as ``n * softmax`` (mean 1 over the group, or over the
micro-batch of n rows) and the terms are per-sequence sums, so the mean over completions
(``loss_type="grpo"`` for a sequence-level loss) is ``(1/#groups) sum_groups sum_i (w- - w+) log pi``:
the authors' loss (the mean over micro-batches of their per-micro-batch sums) when micro-batch =
group. No token mean anywhere, as in the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rl.estimators import Estimator, MaskSample
from rl.objectives.base import OBJECTIVES, Objective, PolicyLossInputs, PolicyLossOutput

SOFTMAX_OVER = ("group", "micro_batch")


def softmax_weights(advantages: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w+, w-)``, each ``[N]``: ``n * softmax(A)`` and ``n * softmax(-A)`` over consecutive groups of
    ``group_size`` rows (the whole of ``advantages`` when None), ``n`` the group's size, so each group's
    weights average 1. Detached: the weights are constants of the loss (wd1 Sec. 3)."""
    a = advantages.detach()
    n = a.numel() if group_size is None else group_size
    if n < 1 or a.numel() % n:
        raise ValueError(f"wd1: {a.numel()} advantages do not split into groups of {n}")
    grouped = a.reshape(-1, n)
    return (torch.softmax(grouped, dim=-1) * n).reshape(-1), (torch.softmax(-grouped, dim=-1) * n).reshape(-1)


@OBJECTIVES.register
@dataclass
class WD1(Objective):
    """wd1's weighted log-likelihood (module docstring). Options:

    ``softmax_over``: "group" (the paper: the G completions of a prompt) or "micro_batch" (the
    authors' ``softmax(advantages, dim=0)`` over each micro-batch; the same when micro-batch = group).
    ``negative``: add the unlearning term ``+ w- log pi`` (the authors' ``trainer_type=wll_d1_neg``,
    run/wll_NP_*.sh, wll_SFT_NP_*.sh); False: only ``-w+ log pi`` (``wll_d1_pos_only``,
    rev_grpo_trainer_psr.py, run/wll_P_*.sh).

    The likelihood term of a completion is its sequence estimate (sum of the mean-field token
    log-probs over the valid completion tokens by default; any estimator's ``seq`` otherwise)."""

    softmax_over: str = "group"
    negative: bool = True

    name: ClassVar[str] = "wd1"
    estimator: ClassVar[str] = "mean_field"
    estimator_options: ClassVar[dict] = {"p_mask_prompt": 0.15}  # wd1/train.yaml p_mask_prompt
    loss_type: ClassVar[str] = "grpo"
    uses_old: ClassVar[bool] = False
    supports_kl: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.softmax_over not in SOFTMAX_OVER:
            raise ValueError(f"wd1: softmax_over={self.softmax_over!r}; expected one of {', '.join(SOFTMAX_OVER)}")

    def default_loss_type(self, level: str) -> str:
        """Mean over completions of the per-sequence loss, whatever the estimator's level."""
        return "grpo"

    def prepare(self, advantages: torch.Tensor, rewards: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        if self.softmax_over != "group":
            return {}
        w_pos, w_neg = softmax_weights(advantages, group_size)
        return {"wd1_w_pos": w_pos, "wd1_w_neg": w_neg}

    def terms(self, estimator: Estimator, sample: MaskSample, logps: torch.Tensor,
              completion_mask: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """``log pi_theta(o_i | q)`` per completion ``[n]``: the estimator's sequence estimate."""
        return estimator.combine(sample, logps).seq

    def weights(self, inp: PolicyLossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w+, w-)`` of the micro-batch's rows (each scaled to mean 1 over its softmax set)."""
        if self.softmax_over == "micro_batch":
            return softmax_weights(inp.advantages)
        if "wd1_w_pos" not in inp.rows:
            raise ValueError("wd1: softmax_over='group' needs the group weights of WD1.prepare() in rows")
        return inp.rows["wd1_w_pos"], inp.rows["wd1_w_neg"]

    def loss(self, inp: PolicyLossInputs) -> PolicyLossOutput:
        w_pos, w_neg = self.weights(inp)
        coef = (w_neg - w_pos) if self.negative else -w_pos
        coef = coef.to(inp.logp.dtype)
        if inp.logp.dim() == 2:  # token-level terms (a caller's own terms()): weight every token of the row
            coef = coef.unsqueeze(-1)
        return PolicyLossOutput(coef * inp.logp)

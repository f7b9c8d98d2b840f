"""diffu-GRPO (d1: Zhao et al. 2025, "d1: Scaling Reasoning in Diffusion LLMs via RL", Eq. 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from rl.objectives.base import (OBJECTIVES, Objective, PolicyLossInputs, PolicyLossOutput, clipped_surrogate,
                                k3_kl)


@OBJECTIVES.register
@dataclass
class DiffuGRPO(Objective):
    """d1 Eq. 3, per completion token l of completion i:

        loss_il = -min(rho_il A_i, clip(rho_il, 1 - eps, 1 + eps_high) A_i) + beta * KL_k3(pi || ref)_il,
        rho_il = exp(log pi(o_il | q') - log pi_old(o_il | q')),

    with d1's one-step mean-field token log-probs (rl.estimators.MeanField: completion fully
    masked, prompt tokens masked with p = 0.15, a fresh mask per iteration) and the token mean
    over the batch. With a sequence-level estimator (mc_elbo, coupled, ...) the same clipped
    ratio is taken on the sequence estimate."""

    name: ClassVar[str] = "diffu_grpo"
    estimator: ClassVar[str] = "mean_field"
    estimator_options: ClassVar[dict] = {"p_mask_prompt": 0.15}
    def default_loss_type(self, level: str) -> str:
        """Token mean over the batch for token-level terms (d1), mean over sequences otherwise."""
        return "dapo" if level == "token" else "grpo"

    def loss(self, inp: PolicyLossInputs) -> PolicyLossOutput:
        per_el, clipped = clipped_surrogate(inp.logp, inp.old_logp, inp.adv(), inp.epsilon, inp.epsilon_high)
        kl = None
        if inp.ref_logp is not None and inp.beta > 0:
            kl = k3_kl(inp.logp, inp.ref_logp)
            per_el = per_el + inp.beta * kl
        return PolicyLossOutput(per_el, clipped, kl)

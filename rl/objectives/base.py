"""Policy objectives: what the RL trainer minimises, given likelihood terms and advantages.

An objective is a registered dataclass (:data:`OBJECTIVES`, ``rl.objective=<name>``) whose fields
are its authors' options (``rl.objective_options={...}``). It names the likelihood estimator it
uses by default (any registered estimator may be chosen with ``rl.estimator``), how its
likelihood terms are formed from the estimator's per-pass token log-probs (:meth:`terms`), and
its loss as a pure function of tensors (:meth:`loss`). The trainer (rl/grpo.py) owns the loop:
rollouts, rewards, advantages (rl/advantages.py), mask draws, old/reference terms, aggregation
(rl/aggregation.py) and the optimizer.

Shapes: ``n`` completions of width ``L``; likelihood terms are ``[n, L]`` (token level) or
``[n]`` (sequence level); the loss has the terms' shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from rl.estimators import Estimator, MaskSample, clamp_log_ratio
from rl.registry import Registry

OBJECTIVES = Registry("objective")


@dataclass
class PolicyLossInputs:
    """What a loss sees for one micro-batch.

    ``logp``: the policy's likelihood terms (with gradient); ``old_logp``: the same terms under the
    rollout policy (detached; equal to ``logp.detach()`` at the first iteration); ``ref_logp``:
    under the reference model (None when ``beta == 0``); ``advantages [n]``; ``mask [n, L]``: valid
    completion tokens; ``rows``: the per-completion tensors of :meth:`Objective.prepare` for
    these rows; ``epsilon`` / ``epsilon_high``: the clip range (TRL's names); ``beta``: the KL
    coefficient; ``sample``: the micro-batch's masks (trajectory objectives read the pass structure)."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor
    mask: torch.Tensor
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    sample: MaskSample | None = None

    def adv(self) -> torch.Tensor:
        """The advantages broadcast against ``logp`` (``[n, 1]`` for token-level terms)."""
        return self.advantages.unsqueeze(-1) if self.logp.dim() == 2 else self.advantages


@dataclass
class PolicyLossOutput:
    """``loss``: per element (the terms' shape); ``clipped``: where the clipped branch is active
    (or None); ``kl``: the per-element KL estimate (or None)."""

    loss: torch.Tensor
    clipped: torch.Tensor | None = None
    kl: torch.Tensor | None = None


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0
    (d1 Eq. 3's KL term), with ref - logp clamped in log space (rl.estimators.MAX_LOG_RATIO)."""
    d = clamp_log_ratio(ref_logp - logp)
    # expm1 keeps the small-|d| terms accurate; rounding can still leave -1 ulp where k3 is ~0
    return (torch.expm1(d) - d).clamp(min=0)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps: float,
                      eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO/GRPO clipped objective per element (d1 Eq. 3): -min(rho A, clip(rho, 1-eps, 1+eps_high) A),
    rho = exp(logp - old_logp) with the log-ratio clamped to +-MAX_LOG_RATIO (rl.estimators);
    ``eps_high`` (DAPO's clip-higher, TRL's ``epsilon_high``) defaults to ``eps``.

    Returns ``(loss, clipped)``: ``clipped`` marks where the clipped branch is the active one."""
    ratio = torch.exp(clamp_log_ratio(logp - old_logp))
    unclipped = ratio * adv
    clipped_obj = torch.clamp(ratio, 1 - eps, 1 + (eps if eps_high is None else eps_high)) * adv
    return -torch.minimum(unclipped, clipped_obj), (clipped_obj < unclipped)


@dataclass
class Objective:
    """Base of the registered objectives. Class attributes a subclass sets:

    ``name``; ``estimator`` / ``estimator_options``: the likelihood it uses unless the config
    names another; ``estimators``: the estimators it accepts (None: any); ``loss_type``: its
    aggregation (rl/aggregation.py) unless the config names one; ``advantage``: its advantage
    estimator (rl/advantages.py) unless the config names one; ``uses_old``: compares with the
    rollout policy (a ratio), so old terms are computed when ``num_iterations > 1``;
    ``supports_kl``: accepts ``beta > 0``."""

    name: ClassVar[str] = ""
    estimator: ClassVar[str] = "mean_field"
    estimator_options: ClassVar[dict] = {}
    estimators: ClassVar[tuple[str, ...] | None] = None
    loss_type: ClassVar[str] = "dapo"
    advantage: ClassVar[str] = "group"
    uses_old: ClassVar[bool] = True
    supports_kl: ClassVar[bool] = True

    def default_loss_type(self, level: str) -> str:
        """The aggregation used unless the config names one, for terms of ``level`` ("token"/"sequence")."""
        return self.loss_type

    def check_estimator(self, estimator: Estimator) -> None:
        """Raise ``ValueError`` when ``estimator`` (built from the config) cannot serve this objective
        (checked when the config is built; e.g. a trajectory estimator with other segments)."""

    def prepare(self, advantages: torch.Tensor, rewards: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        """Per-completion tensors ``[N]`` the loss needs, computed once per step on the rank's whole
        batch (e.g. wd1's group softmax weights); sliced per micro-batch into ``PolicyLossInputs.rows``."""
        return {}

    def terms(self, estimator: Estimator, sample: MaskSample, logps: torch.Tensor,
              completion_mask: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Likelihood terms from the per-pass token log-probs ``logps [K, n, L]``: by default the
        estimator's estimate, per token when the estimator is token-level, else per sequence."""
        out = estimator.combine(sample, logps)
        return out.per_token if estimator.level == "token" else out.seq

    def loss(self, inp: PolicyLossInputs) -> PolicyLossOutput:
        raise NotImplementedError


def objective_options(cls: type[Objective]) -> list[str]:
    return [f.name for f in fields(cls)]


def get_objective(name: str, **options) -> Objective:
    """Build the objective registered as ``name`` with its ``options`` (its authors' option names)."""
    cls = OBJECTIVES.lookup(name)
    known = objective_options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"objective {name!r}: unknown option(s) {unknown}; it takes {known or 'none'}")
    return cls(**options)

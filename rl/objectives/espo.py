"""ESPO: ELBO-based Sequence-level Policy Optimization (Ou, Han, Xu, Xu, Xie, Ermon, Wu, Li 2025,
"Principled RL for Diffusion LLMs Emerges from a Sequence-Level Perspective", arXiv:2512.03759;
code: github.com/ML-GSAI/ESPO, espo/espo_trainer.py).

The whole completion is one action. Its log-likelihood is replaced by the masked-diffusion ELBO
(the :class:`EspoElbo` estimator below), the importance ratio is taken on the sequence ELBO and
normalised per token (paper: "per-token normalization of importance ratios"),

    rho_i = exp( (ELBO_theta(y_i | x) - ELBO_old(y_i | x)) / L ),

clipped PPO-style, plus a KL penalty estimated on the sequence ELBOs with Schulman's k2
(paper: "robust KL-divergence estimation"; the k2 form avoids k3's exp of a sequence-level
log-ratio that can be hundreds of nats):

    loss_i = -min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps_high) A_i) + beta * k2(ELBO_theta - ELBO_ref) / L,
    k2(d) = d^2 / 2,

averaged over the completions of the step (``loss_type="grpo"`` for a per-sequence loss). L is
the completion width (the authors' ``logits_to_keep`` = ``max_completion_length``), the same for
every row; ``normalize="length"`` uses the row's valid token count instead (GSPO's 1/|y_i|).
The paper's equation numbers are not cited here because the text was not available when this
was written; the formulas are the paper's (project page) and the authors' ``compute_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rl.estimators import ESTIMATORS, Estimator, MaskSample, _completion_valid, _full_width
from rl.masking import exact_count_mask, uniform
from rl.objectives.base import (OBJECTIVES, Objective, PolicyLossInputs, PolicyLossOutput, clipped_surrogate,
                                k3_kl)

KL_ESTIMATORS = ("k1", "k2", "k3")
NORMALIZERS = ("max_len", "length", "none")


def espo_sample(first: torch.Tensor, scope: torch.Tensor, prompt_len: int, reduce_var: bool = True) -> MaskSample:
    """The ESPO ELBO's passes and weights from the first-pass masks ``first [n, B, L]`` (bool:
    completion positions masked in draw k) over the scored positions ``scope [B, L]``.

    With ``N_b = |scope_b|`` positions and ``x = |first_kb|`` of them masked (x in {0..N_b}),
    the masked tokens get the weight ``(N_b + 1) / x`` (the authors' ``1 / p_mask``,
    ``p_mask = x / (N_b + 1)``). With ``reduce_var`` each draw is followed by its complement
    pass, ``scope & ~first`` masked with weight ``(N_b + 1) / (N_b - x)`` (the authors'
    ``1 / (N/(N+1) - p_mask)``), so the pair's mean is the authors' ``loss /= 2``. Passes are
    ordered draw 0, its complement, draw 1, ... (K = 2n), or the n draws alone (K = n)."""
    scope = scope.bool()
    first = first.bool() & scope
    n, b, l = first.shape
    width = scope.sum(-1).to(torch.float32)  # N_b  [B]
    x = first.sum(-1).to(torch.float32)  # [n, B]
    w_first = first.float() * ((width + 1) / x.clamp(min=1)).unsqueeze(-1)
    if reduce_var:
        comp = scope & ~first
        w_comp = comp.float() * ((width + 1) / (width - x).clamp(min=1)).unsqueeze(-1)
        masked = torch.stack([first, comp], dim=1).reshape(2 * n, b, l)
        weights = torch.stack([w_first, w_comp], dim=1).reshape(2 * n, b, l)
    else:
        masked, weights = first, w_first
    no_prompt = torch.zeros(masked.shape[0], b, prompt_len, dtype=torch.bool, device=first.device)
    return MaskSample(_full_width(no_prompt, masked), weights)


@ESTIMATORS.register
@dataclass
class EspoElbo(Estimator):
    """ESPO's ELBO estimate (the authors' ``forward_process`` + ``_get_elbo`` + ``_get_elbo_mc``):
    the masked-diffusion ELBO in the discrete-count form

        ELBO(y | x) = E_{x ~ U{0..N}} E_{m: |m| = x} [ (N+1)/x sum_{l in m} log p_theta(y_l | x, y_{~m}) ]
                    = sum_{l=1}^{N} (1/l) E_{|m| = l} [ sum_{i in m} log p_theta(y_i | x, y_{~m}) ]

    (N scored positions; x = 0 contributes 0 with weight P(x=0) = 1/(N+1); the second line is
    LLaDA's L/l form, so the estimate is unbiased for the same ELBO as ``mc_elbo_ll``; unlike it
    the count is drawn from {0..N}, not {1..N}). Options (the authors' names where they have one):

    ``n_samples``: the authors' ``num_mc`` (independent draws averaged; default 1 as in their
    configs.py, the objective sets their recipes' 2). ``reduce_var`` (theirs, default True): add
    each draw's complementary pass (m^c masked, weight (N+1)/(N-x)) and average the pair, so every
    scored token is predicted once per pair; K = 2 n forward passes. Their config flag is never
    read by their trainer, which always runs with True. ``full_width`` (default True, theirs):
    mask and score every completion position, including the EOS padding after the first EOS
    (LLaDA's generated object is the whole L-token canvas), so N = L; False: only the valid tokens
    (the repo's convention elsewhere), N = the row's valid count, the tokens after EOS visible.
    ``stratified`` (default True, theirs): the counts of the rows of a draw share one uniform
    draw, row b at offset b/B of it, so they are spread evenly over {0..N} (each row's count is
    still exactly uniform); False draws each row's count independently.

    The prompt is never masked (the authors' ``prompt_index``). Differences from the authors'
    draw, which only change which masks are drawn, not the estimate given the masks: they
    stratify per micro-batch (their ``forward_process`` call), here over the rows of the draw;
    their count ``round(k + b (N+1)/B) mod (N+1)`` rounds half to even, which for an exact .5
    (e.g. B = 2 rows and N = 256: their math recipe) maps two k to one count and leaves other
    counts unreachable. With the complementary pass (always on in their trainer) the pair's value
    depends only on {x, N - x}, whose law stays uniform, so this costs nothing; without it that
    row's estimate would be biased. Here ``floor(((u + b/B) mod 1)(N+1))``, u ~ U[0, 1), is
    exactly uniform for every row."""

    reduce_var: bool = True
    full_width: bool = True
    stratified: bool = True
    name: ClassVar[str] = "espo"

    def passes_per_draw(self, num_steps: int) -> int:
        return self.n_samples * (2 if self.reduce_var else 1)

    def draw(self, attention_mask, completion_mask, prompt_len, generator, *, trace=None) -> MaskSample:
        _, valid = _completion_valid(attention_mask, completion_mask, prompt_len)
        scope = torch.ones_like(valid) if self.full_width else valid
        n, (b, l) = self.n_samples, scope.shape
        width = scope.sum(-1)  # [B]
        if self.stratified:
            offset = torch.arange(b, device=scope.device, dtype=torch.float32) / b
            q = torch.remainder(uniform((n, 1), generator, scope.device) + offset, 1.0)
        else:
            q = uniform((n, b), generator, scope.device)
        count = torch.minimum((q * (width + 1).float()).long(), width)  # U{0..N_b}
        first = exact_count_mask(scope.expand(n, b, l), count, generator)
        return espo_sample(first, scope, prompt_len, self.reduce_var)


def approx_kl(logp: torch.Tensor, ref_logp: torch.Tensor, kl_estimator: str = "k2") -> torch.Tensor:
    """The authors' ``compute_approx_kl`` (Schulman's estimators of KL(pi || ref) from one
    sample, d = logp - ref_logp, here sequence ELBOs):

    ``k1``: value d; the authors add ``(logp - sg(logp)) * sg(d)`` (0 in value), so its gradient is
    ``(1 + d) grad logp``: k1's plus k2's. ``k2``: d^2 / 2 (ESPO's choice: ``compute_loss``
    hard-codes it). ``k3``: exp(-d) + d - 1 (:func:`rl.objectives.base.k3_kl`: -d clamped to
    +-MAX_LOG_RATIO before the exp, which the authors do not do)."""
    if kl_estimator == "k1":
        d = logp - ref_logp
        return d + (logp - logp.detach()) * d.detach()
    if kl_estimator == "k2":
        return (logp - ref_logp) ** 2 / 2.0
    if kl_estimator == "k3":
        return k3_kl(logp, ref_logp)
    raise ValueError(f"kl_estimator={kl_estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")


@OBJECTIVES.register
@dataclass
class ESPO(Objective):
    """ESPO's loss per completion i (module docstring; the authors' ``compute_loss``):

        rho_i  = exp((ELBO_theta_i - ELBO_old_i) / Z_i)                     (coef_1)
        loss_i = -min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps_high) A_i) + beta * KL_i / Z_i,

    KL_i = ``approx_kl(ELBO_theta_i, ELBO_ref_i, kl_estimator)`` on the unnormalised ELBOs, and
    the mean over completions (``loss_type="grpo"``: their ``.sum() / batch_size`` per micro-batch
    divided by the gradient-accumulation steps). Options:

    ``kl_estimator``: "k1" | "k2" | "k3" (their ``compute_approx_kl`` argument; default "k2",
    what their ``compute_loss`` uses). ``normalize``: Z_i, "max_len" (default, theirs: the
    completion width ``logits_to_keep``), "length" (the row's valid completion tokens) or
    "none" (Z = 1: the raw sequence ratio, which the paper argues against).

    Likelihood terms are always the estimator's sequence estimate (a token-level estimator's
    per-token log-probs are summed). Old terms use the same masks as the current ones (the
    authors reuse each iteration's mask seeds for ``old_per_token_logps``)."""

    kl_estimator: str = "k2"
    normalize: str = "max_len"
    name: ClassVar[str] = "espo"
    estimator: ClassVar[str] = "espo"
    estimator_options: ClassVar[dict] = {"n_samples": 2, "reduce_var": True}
    loss_type: ClassVar[str] = "grpo"
    advantage: ClassVar[str] = "rloo"  # leave-one-out, hard-coded in the authors' trainer
    uses_old: ClassVar[bool] = True
    supports_kl: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")
        if self.normalize not in NORMALIZERS:
            raise ValueError(f"normalize={self.normalize!r}: expected one of {', '.join(NORMALIZERS)}")

    def default_loss_type(self, level: str) -> str:
        """The mean over completions (the terms are per sequence whatever the estimator)."""
        return "grpo"

    def terms(self, estimator: Estimator, sample: MaskSample, logps: torch.Tensor,
              completion_mask: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sequence estimate ``[n]`` (the ELBO for ``espo``)."""
        return estimator.combine(sample, logps).seq

    def normalizer(self, mask: torch.Tensor) -> torch.Tensor | float:
        """Z: the completion width L, each row's valid token count, or 1."""
        if self.normalize == "max_len":
            return float(mask.shape[-1])
        if self.normalize == "length":
            return mask.sum(-1).clamp(min=1)
        return 1.0

    def loss(self, inp: PolicyLossInputs) -> PolicyLossOutput:
        if inp.logp.dim() != 1:
            raise ValueError(f"espo: expected sequence-level terms [n], got shape {tuple(inp.logp.shape)}")
        z = self.normalizer(inp.mask)
        if isinstance(z, torch.Tensor):
            z = z.to(inp.logp.dtype)
        log_ratio = (inp.logp - inp.old_logp) / z
        per_seq, clipped = clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), inp.advantages, inp.epsilon,
                                             inp.epsilon_high)
        kl = None
        if inp.ref_logp is not None and inp.beta > 0:
            kl = approx_kl(inp.logp, inp.ref_logp, self.kl_estimator) / z
            per_seq = per_seq + inp.beta * kl
        return PolicyLossOutput(per_seq, clipped, kl)

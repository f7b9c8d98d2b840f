"""SPG: Sandwiched Policy Gradient (Wang et al. 2025, "SPG: Sandwiched Policy Gradient for Masked
Diffusion Language Models", arXiv:2510.09541; code: facebookresearch/SPG, ``spg/spg_trainer.py``).

The log-likelihood of a dLLM is intractable, so SPG "sandwiches" it (paper Sec. 3): a sequence
with a positive advantage is pushed up through the evidence *lower* bound, one with a negative
advantage is pushed down through an evidence *upper* bound, so that neither side of the policy
gradient exploits the slack of a one-sided bound:

    J_SPG(theta) = E[ (1/G) sum_i ( 1{A_i > 0} A_i L_ELBO(o_i) + 1{A_i <= 0} A_i L_neg(o_i) ) ],

    L_ELBO(o) = E_{t, z_t} [ w(t) sum_l 1{z_t^l = M} log pi_theta(o^l | z_t, q) ]        (MDM ELBO, w(t) = 1/t)
    L_EUBO(o) = (1/beta) sum_l log E_{t, z_t} [ w(t) 1{z_t^l = M} pi_theta(o^l | z_t, q)^beta ]   (beta >= 1)
    L_neg     = L_EUBO ("eubo"), omega L_EUBO + (1 - omega) L_ELBO ("mix", the paper's mixture),
                L_ELBO ("elbo": the one-sided ablation), 0 ("zero": negatives ignored),

with A_i = r_i - mean_group(r) (no std scaling) and no ratio, clipping or KL (the authors'
trainer reuses each rollout for ``num_iterations`` plain policy-gradient steps and raises on
``beta != 0``). The expectations over (t, z_t) use the paper's block-wise masks (Sec. 3,
"block-wise masking"; :class:`SPGMasks`) that mirror LLaDA's semi-autoregressive decoding.

Monte-Carlo forms (what the authors' ``_get_per_seq_logps`` computes, and what :class:`SPG`
computes from the same ``K = num_t`` masked passes; ``S_k`` = the valid completion tokens masked
in pass k, ``n`` = the number of valid completion tokens, ``t_k = |S_k| / n``):

    ELBO(o) = (1/K) sum_k (1/|S_k|) sum_{l in S_k} log p_k(o^l)                  (per-token normalised)
    EUBO(o) = (1/beta) (1/|U|) sum_{l in U} log( (1/K) sum_k 1{l in S_k} p_k(o^l)^beta / t_k ),
              U = {l : l in S_k for some k}                                        (per-token normalised)

Both are the paper's bounds divided by the token count (the ELBO's (1/t) sum over masked tokens
becomes a mean; the EUBO's sum over tokens becomes a mean), so sequences of different lengths are
on one scale; the loss ``-A_i * logp_i`` is then weighted by |o_i| over the batch
(``sum_i loss_i |o_i| / sum_i |o_i|``: our ``dapo`` aggregation of a sequence-level loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from rl.estimators import ESTIMATORS, Estimator, MaskSample, _completion_valid, _full_width
from rl.masking import bernoulli_mask, exact_count_mask, uniform
from rl.objectives.base import OBJECTIVES, Objective, PolicyLossInputs, PolicyLossOutput

FORWARD_TYPES = ("all", "random", "block_all", "block_random")
LOGP_ESTIMATIONS = ("elbo", "eubo", "mix", "zero")


def uniform_count(n: torch.Tensor, min_t: float, max_t: float, generator: torch.Generator | None) -> torch.Tensor:
    """How many of ``n`` tokens to mask: uniform on {max(floor(n min_t), 1), ..., min(floor(n max_t), n)}
    (the authors' ``torch.randint(start_mask_num, end_mask_num + 1)``, products in float32 as theirs).
    Where that range is empty (tiny ``n`` with a small ``max_t``; the authors assert) it is the lower end."""
    nf = n.float()
    lo = torch.floor(nf * min_t).long().clamp(min=1)
    hi = torch.maximum(torch.minimum(torch.floor(nf * max_t).long(), n.long()), lo)
    count = lo + torch.floor(uniform(tuple(n.shape), generator, n.device) * (hi - lo + 1).float()).long()
    return torch.minimum(count, hi)


@ESTIMATORS.register
@dataclass
class SPGMasks(Estimator):
    """SPG's masks (the authors' ``forward_process``, option names theirs), ``K = n_samples * num_t``
    passes per draw. Per pass, on the completion (``n`` valid tokens, up to the first EOS):

    - ``all``: every completion position masked (d1's one-step estimate; the authors require
      ``num_t == 1``, here any ``num_t`` gives that many prompt-mask draws).
    - ``random``: exactly c valid tokens masked, c uniform on {max(floor(n min_t), 1), ...,
      min(floor(n max_t), n)}, the subset uniform.
    - ``block_all`` / ``block_random`` (paper's block-wise masking): the completion width L is cut
      into blocks of ``block_length``; a block b is chosen among the blocks holding valid tokens;
      blocks before b stay clean, blocks after b are fully masked (as when LLaDA decodes block b),
      and block b is fully masked (``block_all``) or has c of its m valid tokens masked, c drawn as
      in ``random`` with m for n (``block_random``). The ``num_t`` passes of a draw take the first
      ``num_t`` entries of a uniform permutation of the L / block_length blocks, each modulo the
      row's number of valid blocks (the authors' scheme: distinct blocks while there are enough;
      earlier blocks are favoured when the valid-block count does not divide the block count).
      Beyond the authors' asserts: a completion width that is not a multiple of ``block_length``
      gets a shorter last block, and ``num_t`` > blocks takes further independent permutations.

    Completion positions after the first EOS are masked in every pass and never scored (the
    authors' convention: ``is_mask | ~completion_mask``). With ``use_mask_prompt`` every real
    prompt token is also masked with probability ``p_mask_prompt``; in the block forms the
    authors' draw (``~is_mask & (rand < p)``) reaches the clean earlier blocks too, and those
    masked completion tokens are scored (``mask_clean_blocks=False``: the prompt only). Prompt
    padding is never masked (the authors mask it too; under the attention mask that changes
    nothing).

    Scored tokens: the masked valid completion tokens (the authors score ``perturb_mask &
    completion_mask``: their ``block_mask``, which would drop the fully masked later blocks, is
    computed and never applied; ``score_later_blocks=False`` applies it). Weight of a scored token
    in pass k: ``n / |S_k| = 1 / t_k`` (so :meth:`combine` is the L/l-form MC-ELBO on these masks;
    the SPG objective reads only which tokens are scored)."""

    forward_type: str = "block_random"
    num_t: int = 2
    min_t: float = 0.0
    max_t: float = 1.0
    block_length: int = 32
    use_mask_prompt: bool = True
    p_mask_prompt: float = 0.15
    score_later_blocks: bool = True
    mask_clean_blocks: bool = True
    name: ClassVar[str] = "spg"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.forward_type not in FORWARD_TYPES:
            raise ValueError(f"spg: forward_type={self.forward_type!r}; choose one of {', '.join(FORWARD_TYPES)}")
        if self.num_t < 1:
            raise ValueError(f"spg: num_t must be >= 1, got {self.num_t}")
        if not 0.0 <= self.min_t <= self.max_t <= 1.0:
            raise ValueError(f"spg: need 0 <= min_t <= max_t <= 1, got min_t={self.min_t}, max_t={self.max_t}")
        if self.block_length < 1:
            raise ValueError(f"spg: block_length must be >= 1, got {self.block_length}")
        if not 0.0 <= self.p_mask_prompt <= 1.0:
            raise ValueError(f"spg: p_mask_prompt must be in [0, 1], got {self.p_mask_prompt}")

    def passes_per_draw(self, num_steps: int) -> int:
        return self.n_samples * self.num_t

    def draw(self, attention_mask, completion_mask, prompt_len, generator, *, trace=None) -> MaskSample:
        prompt, valid = _completion_valid(attention_mask, completion_mask, prompt_len)
        (b, l), dev = valid.shape, valid.device
        reps, nt = self.n_samples, self.num_t
        k = reps * nt
        n_valid = valid.sum(-1)  # [B]
        validk = valid.expand(k, b, l)
        clean = torch.zeros(k, b, l, dtype=torch.bool, device=dev)  # completion positions the light mask reaches
        if self.forward_type == "all":
            masked = torch.ones(k, b, l, dtype=torch.bool, device=dev)
            scored = validk.clone()
        elif self.forward_type == "random":
            count = uniform_count(n_valid.expand(k, b), self.min_t, self.max_t, generator)
            scored = exact_count_mask(validk, count, generator)
            masked = scored | ~validk
        else:
            bl = self.block_length
            nb = -(-l // bl)  # blocks (the authors require l % bl == 0; here the last one may be shorter)
            block = torch.arange(l, device=dev) // bl  # [L]
            valid_blocks = (n_valid - 1).clamp(min=0) // bl + 1  # [B] blocks holding valid tokens
            perms = -(-nt // nb)  # the authors require num_t <= nb: one permutation
            first = uniform((reps, b, perms, nb), generator, dev).argsort(-1).reshape(reps, b, perms * nb)[..., :nt]
            chosen = (first % valid_blocks[None, :, None]).permute(0, 2, 1).reshape(k, b, 1)
            later, here, earlier = block > chosen, block == chosen, block < chosen  # [K, B, L]
            if self.forward_type == "block_all":
                masked = ~earlier
            else:
                m = (n_valid - bl * chosen.squeeze(-1)).clamp(max=bl)  # valid tokens of the chosen block
                count = uniform_count(m, self.min_t, self.max_t, generator)
                masked = later | exact_count_mask(here & validk, count, generator) | ~validk
            scored = masked & validk
            if not self.score_later_blocks:
                scored = scored & ~later
            if self.mask_clean_blocks:
                clean = earlier
        prompt_masked = torch.zeros(k, b, prompt_len, dtype=torch.bool, device=dev)
        if self.use_mask_prompt and self.p_mask_prompt > 0:
            light = bernoulli_mask(_full_width(prompt.expand(k, b, prompt_len), clean), self.p_mask_prompt, generator)
            prompt_masked, light_c = light[..., :prompt_len], light[..., prompt_len:]
            masked, scored = masked | light_c, scored | (light_c & validk)
        count = scored.sum(-1, keepdim=True).clamp(min=1)
        weights = scored.float() * (n_valid.view(1, b, 1).float() / count.float())
        return MaskSample(_full_width(prompt_masked, masked), weights)


def spg_elbo(logps: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per-token-normalised MC ELBO ``[n]`` from ``logps [K, n, L]``: the mean log-prob over the
    scored tokens of each pass, averaged over the K passes (the authors' ``per_seq_logps.mean``)."""
    per_pass = torch.where(scored, logps, 0.0).sum(-1) / scored.sum(-1).clamp(min=1)
    return per_pass.mean(0)


def spg_eubo(logps: torch.Tensor, scored: torch.Tensor, completion_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token-normalised MC EUBO ``[n]``: (1/beta) mean over the tokens scored in any pass of
    log((1/K) sum_k 1{scored_k} p_k^beta / t_k), t_k = |S_k| / n (the authors' empirical mask ratio),
    in log space (log-mean-exp) so that p^beta cannot underflow to 0."""
    k = logps.shape[0]
    n_valid = completion_mask.sum(-1).to(logps.dtype).clamp(min=1)  # [n]
    inv_t = n_valid.log() - scored.sum(-1).to(logps.dtype).clamp(min=1).log()  # log(1 / t_k)  [K, n]
    hit = scored.any(0)  # [n, L]
    x = torch.where(scored, beta * logps + inv_t.unsqueeze(-1), -math.inf)
    x = torch.where(hit, x, 0.0)  # never-scored tokens: a finite dummy, dropped below (no NaN gradient)
    per_token = torch.where(hit, torch.logsumexp(x, 0) - math.log(k), 0.0)
    return per_token.sum(-1) / hit.sum(-1).clamp(min=1) / beta


@OBJECTIVES.register
@dataclass
class SPG(Objective):
    """SPG's loss (paper Sec. 3; module docstring for the equations), per completion i:

        loss_i = -A_i * logp_i,   logp_i = ELBO(o_i) if A_i > 0 else L_neg(o_i),

    L_neg by ``logp_estimation``: "eubo" (Renyi-type upper bound with ``eubo_beta``), "mix"
    (``mix_weight`` EUBO + (1 - ``mix_weight``) ELBO), "elbo" or "zero". The sign is the
    advantage's (the authors' ``reward_mask = advantages > 0`` on r - mean(r); any positive
    rescaling or RLOO keeps it). No ratio (``uses_old = False``), no KL (``supports_kl = False``),
    aggregated by token count (``dapo``). Defaults: the authors' published configs
    (``spg/slurm_scripts/spg_mix``: mix, beta 1.5, weight 0.5; masks: :class:`SPGMasks`)."""

    logp_estimation: str = "mix"
    eubo_beta: float = 1.5
    mix_weight: float = 0.5
    name: ClassVar[str] = "spg"
    estimator: ClassVar[str] = "spg"
    estimator_options: ClassVar[dict] = {}
    loss_type: ClassVar[str] = "dapo"
    uses_old: ClassVar[bool] = False
    supports_kl: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.logp_estimation not in LOGP_ESTIMATIONS:
            raise ValueError(f"spg: logp_estimation={self.logp_estimation!r}; choose one of "
                             f"{', '.join(LOGP_ESTIMATIONS)}")
        if not self.eubo_beta > 0:
            raise ValueError(f"spg: eubo_beta must be > 0 (the paper's bound needs >= 1), got {self.eubo_beta}")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"spg: mix_weight must be in [0, 1], got {self.mix_weight}")

    def default_loss_type(self, level: str) -> str:
        return "dapo"

    def prepare(self, advantages: torch.Tensor, rewards: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        """``positive [N]``: which completions take the ELBO (the authors' ``reward_mask``)."""
        return {"positive": advantages > 0}

    def terms(self, estimator: Estimator, sample: MaskSample, logps: torch.Tensor,
              completion_mask: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sequence likelihood terms ``[n]`` from the passes' token log-probs ``[K, n, L]``:
        the ELBO for positive-advantage rows, ``logp_estimation``'s term for the others."""
        if "positive" not in rows:
            raise KeyError("spg: terms() needs rows['positive'] from SPG.prepare()")
        scored = sample.weights != 0
        elbo = spg_elbo(logps, scored)
        est = self.logp_estimation
        if est == "elbo":
            neg = elbo
        elif est == "zero":
            neg = torch.zeros_like(elbo)
        else:
            eubo = spg_eubo(logps, scored, completion_mask, self.eubo_beta)
            neg = eubo if est == "eubo" else self.mix_weight * eubo + (1 - self.mix_weight) * elbo
        return torch.where(rows["positive"].to(elbo.device), elbo, neg)

    def loss(self, inp: PolicyLossInputs) -> PolicyLossOutput:
        return PolicyLossOutput(-inp.adv() * inp.logp)

"""Log-likelihood estimators for masked diffusion LMs.

The log-likelihood ``log pi(y | x)`` of a completion ``y`` (``L`` valid tokens) given a prompt
``x`` is intractable for a dLLM; each estimator replaces it by a Monte-Carlo estimate built from
``K`` forward passes on partially masked copies of the sequence.

Batch layout (what every function here takes):
    ``input_ids [B, T]``: left-padded prompt (width ``P = prompt_len``) then completion (width L);
    ``attention_mask [B, T]``: 0 on prompt padding; ``completion_mask [B, L]``: 1 up to and
    including the first EOS ("valid" completion tokens); ``mask_id``: the mask token.

Two phases, so that several models can be scored on the *same* masks:
    ``sample = est.draw(attention_mask, completion_mask, prompt_len, generator)``  -> ``MaskSample``
    ``logps = est.score(model, input_ids, attention_mask, prompt_len, sample, mask_id)``  -> ``[K, B, L]``
    ``out = est.combine(sample, logps)``  -> ``EstimateOutput``
with the estimate

    seq[b] = (1/K) sum_k sum_l weights[k, b, l] * logps[k, b, l],
    per_token[b, l] = (1/K) sum_k weights[k, b, l] * logps[k, b, l]   (so seq = per_token.sum(-1)),

where ``logps[k, b, l] = log p_theta(y_l | x_k)`` is the model's log-probability of the true
token at completion position ``l`` given the ``k``-th masked sequence ``x_k`` (computed only where
``weights != 0``; 0 elsewhere). For "mean_field" (weights 1 on valid tokens, K = 1) ``per_token``
is the token log-probs themselves, as token-level GRPO ratios need.

Antithetic sampling (VRPO, LLaDA 1.5, Zhu et al. 2025): score the policy and the reference with
the same ``MaskSample`` (``estimate_pair``) so that the mask noise cancels in ``B_pi - B_ref``.

MC-ELBO conventions: completion positions after the first EOS (``completion_mask == 0``) are
never masked nor scored, so the ELBO is that of the valid tokens given the prompt (and the
trailing tokens); prompt tokens are never masked.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from rl.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs
from rl.masking import apply_mask, bernoulli_mask, exact_count_mask, sample_t, uniform
from rl.registry import Registry
from rollout.adapter import PolicyAdapter, unwrap_model

ESTIMATORS = Registry("estimator")

# Bound on |log pi - log pi_old| (and |log ref - log pi|) before any exp() of it. Sequence-level
# estimates (mc_elbo, mc_elbo_ll, coupled) sum a whole completion's token log-probs with weights
# up to 1/t = 1/eps = 1000, so their log-ratios can reach hundreds of nats: exp() overflows to
# inf and the loss turns NaN. At the bound the ratio is e^10 ~ 2.2e4, far outside any clip range
# 1 +- eps and finite in float32 after multiplying by an advantage; beyond it the clamp passes no
# gradient, so an estimate that far off cannot move the weights.
MAX_LOG_RATIO = 10.0


def clamp_log_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """``log_ratio`` clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO] (see the constant's note)."""
    return log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


@dataclass
class MaskSample:
    """The masks of ``K`` forward passes over a batch of ``B`` sequences of width ``T = P + L``.

    ``masked [K, B, T]`` bool: positions replaced by ``mask_id`` in pass ``k``.
    ``weights [K, B, L]`` float32: weight of completion token ``l``'s log-prob in pass ``k``
    (0 = not scored). The estimate is ``(1/K) sum_k sum_l weights * logps`` (see module doc).
    """

    masked: torch.Tensor
    weights: torch.Tensor

    @property
    def num_passes(self) -> int:
        return self.masked.shape[0]


@dataclass
class EstimateOutput:
    """``seq [B]`` sequence log-likelihood estimate; ``per_token [B, L]`` its per-token terms
    (``seq = per_token.sum(-1)``); ``logps [K, B, L]`` the raw per-pass token log-probs."""

    seq: torch.Tensor
    per_token: torch.Tensor
    logps: torch.Tensor


def _completion_valid(attention_mask: torch.Tensor | None, completion_mask: torch.Tensor,
                      prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(real prompt tokens ``[B, P]``, valid completion tokens ``[B, L]``) as bool, after checking shapes.
    ``attention_mask`` may be the full ``[B, P+L]`` mask or the prompt's ``[B, P]`` mask."""
    b, l = completion_mask.shape
    if attention_mask is None:
        prompt = torch.ones(b, prompt_len, dtype=torch.bool, device=completion_mask.device)
    elif attention_mask.shape in ((b, prompt_len + l), (b, prompt_len)):
        prompt = attention_mask[:, :prompt_len].bool()
    else:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [B, P+L] = "
                         f"[{b}, {prompt_len + l}] or [B, P] = [{b}, {prompt_len}] (prompt_len={prompt_len})")
    return prompt, completion_mask.bool()


def _full_width(prompt_part: torch.Tensor, completion_part: torch.Tensor) -> torch.Tensor:
    """Concatenate ``[K, B, P]`` and ``[K, B, L]`` masks into ``[K, B, P+L]``."""
    return torch.cat([prompt_part, completion_part], dim=-1)


@dataclass
class Estimator:
    """Shared ``score``/``combine``/``estimate``; subclasses implement ``draw``.

    ``n_samples``: independent draws (passes, or pairs for "coupled"); ``max_batch``: most
    sequences per forward (None: all ``K * B`` in one forward); ``chunk_size``: positions per
    float32 log-softmax chunk.

    Class attributes: ``level`` is ``"token"`` when the per-token terms are themselves meaningful
    log-probabilities (a token-level ratio may be taken on them: mean-field, trajectory
    likelihoods) and ``"sequence"`` when only their sum is (ELBO estimates); ``needs_trace``: the
    draw reads the rollout's unmasking trace (``trace=`` the ``[B, L]`` unmask steps)."""

    n_samples: int = 1
    max_batch: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    name: ClassVar[str] = ""
    level: ClassVar[str] = "sequence"
    needs_trace: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"{self.name}: n_samples must be >= 1, got {self.n_samples}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"{self.name}: max_batch must be >= 1 or None, got {self.max_batch}")

    def draw(self, attention_mask: torch.Tensor | None, completion_mask: torch.Tensor, prompt_len: int,
             generator: torch.Generator | None, *, trace: torch.Tensor | None = None,
             num_steps: int | None = None) -> MaskSample:
        """The masks of ``K`` passes. ``trace`` / ``num_steps``: the rollout's ``unmask_step [B, L]`` and
        step count, passed to (and only to) estimators with ``needs_trace``."""
        raise NotImplementedError

    def passes_per_draw(self, num_steps: int) -> int:
        """Forward passes of one draw, at most (K of the ``MaskSample``); ``num_steps``: the rollout's
        denoising steps (trajectory estimators). The memory plan (recipes/plan.py) sizes activations by it."""
        return self.n_samples

    def score(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prompt_len: int,
              sample: MaskSample, mask_id: int) -> torch.Tensor:
        """Per-pass token log-probs ``[K, B, L]`` (float32; 0 where ``weights == 0``). The ``K * B``
        masked sequences go through ``model(ids, attention_mask=...).logits`` concatenated along
        the batch, ``max_batch`` rows per forward (``attention_mask``: the full ``[B, T]`` mask or
        None). Gradients flow to ``model`` unless the caller disables them."""
        k, b, t = sample.masked.shape
        if input_ids.shape != (b, t):
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}, the MaskSample is for [B, T] = [{b}, {t}]")
        if attention_mask is not None and attention_mask.shape != (b, t):
            raise ValueError(f"score: attention_mask has shape {tuple(attention_mask.shape)}, expected the full "
                             f"[B, T] = [{b}, {t}] mask")
        noisy = apply_mask(input_ids, sample.masked, mask_id).reshape(k * b, t)
        attn = None if attention_mask is None else attention_mask.expand(k, b, t).reshape(k * b, t)
        targets = input_ids.expand(k, b, t).reshape(k * b, t)
        no_prompt = torch.zeros(k, b, prompt_len, dtype=torch.bool, device=input_ids.device)
        scored = _full_width(no_prompt, sample.weights != 0).reshape(k * b, t)
        step = self.max_batch or k * b
        inner = unwrap_model(model)
        l = t - prompt_len
        if isinstance(inner, PolicyAdapter) and inner.fused_scoring:
            # log-probs straight from the trunk's hidden states at the scored positions: no logits tensor
            tgt = targets[:, prompt_len:].masked_fill(~scored[:, prompt_len:], -1)
            out = [model(noisy[s:s + step], attention_mask=None if attn is None else attn[s:s + step],
                         logits_to_keep=l, score_targets=tgt[s:s + step]).token_logps
                   for s in range(0, k * b, step)]
            return torch.cat(out).view(k, b, l)
        # A PolicyAdapter computes the LM head only on the completion (the last L positions).
        keep = {"logits_to_keep": l} if isinstance(inner, PolicyAdapter) else {}
        out = []
        for s in range(0, k * b, step):
            logits = model(noisy[s:s + step], attention_mask=None if attn is None else attn[s:s + step],
                           **keep).logits[:, -(t - prompt_len):]
            lp = token_logprobs(logits, targets[s:s + step, prompt_len:], scored[s:s + step, prompt_len:],
                                chunk_size=self.chunk_size)
            out.append(lp)
        return torch.cat(out).view(k, b, t - prompt_len)

    def combine(self, sample: MaskSample, logps: torch.Tensor) -> EstimateOutput:
        """``per_token = mean_k(weights * logps)``, ``seq = per_token.sum(-1)``."""
        per_token = (sample.weights * logps).mean(0)
        return EstimateOutput(seq=per_token.sum(-1), per_token=per_token, logps=logps)

    def estimate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prompt_len: int,
                 completion_mask: torch.Tensor, mask_id: int, *, sample: MaskSample | None = None,
                 generator: torch.Generator | None = None) -> EstimateOutput:
        """``draw`` (unless ``sample`` is given), ``score`` and ``combine`` in one call."""
        if sample is None:
            sample = self.draw(attention_mask, completion_mask, prompt_len, generator)
        return self.combine(sample, self.score(model, input_ids, attention_mask, prompt_len, sample, mask_id))


@ESTIMATORS.register
@dataclass
class MeanField(Estimator):
    """d1's one-step mean-field estimate (Zhao et al. 2025, diffu-GRPO):

        log pi(y | x) ~= sum_l log p_theta(y_l | x', [M]^L),

    the whole completion masked (every one of the L positions, as at the first denoising
    step) and each real prompt token masked independently with probability ``p_mask_prompt``
    (x' = the perturbed prompt; padding is never masked). Weight 1 on valid completion
    tokens. With ``n_samples = n``, n passes with independent prompt masks are averaged."""

    p_mask_prompt: float = 0.15
    name: ClassVar[str] = "mean_field"
    level: ClassVar[str] = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.p_mask_prompt <= 1.0:
            raise ValueError(f"mean_field: p_mask_prompt must be in [0, 1], got {self.p_mask_prompt}")

    def draw(self, attention_mask, completion_mask, prompt_len, generator, *, trace=None) -> MaskSample:
        prompt, valid = _completion_valid(attention_mask, completion_mask, prompt_len)
        k = self.n_samples
        prompt_masked = bernoulli_mask(prompt.expand(k, *prompt.shape), self.p_mask_prompt, generator)
        completion_masked = torch.ones(k, *valid.shape, dtype=torch.bool, device=valid.device)
        weights = valid.float().expand(k, *valid.shape).contiguous()
        return MaskSample(_full_width(prompt_masked, completion_masked), weights)


@ESTIMATORS.register
@dataclass
class MCElbo(Estimator):
    """Monte-Carlo ELBO with the 1/t weight (LLaDA, Nie et al. 2025, Eq. 3-4; MDLM/RADD):

        log pi(y | x) >= E_{t ~ U(eps, 1)} E_{m ~ Bern(t)^L} [ (1/t) sum_{l in m} log p_theta(y_l | x, y_{~m}) ],

    each valid completion token masked with probability t, weight 1/t on masked tokens.
    ``n_samples = n`` passes each with its *own* t and one mask: VRPO's optimal allocation
    (n_t = n timesteps, n_y = 1 mask per timestep; Zhu et al. 2025, Thm. 3)."""

    eps: float = 1e-3
    name: ClassVar[str] = "mc_elbo"

    def draw(self, attention_mask, completion_mask, prompt_len, generator, *, trace=None) -> MaskSample:
        prompt, valid = _completion_valid(attention_mask, completion_mask, prompt_len)
        k, (b, l) = self.n_samples, valid.shape
        t = sample_t((k, b, 1), generator, valid.device, low=self.eps)
        masked = bernoulli_mask(valid.expand(k, b, l), t, generator)
        no_prompt = torch.zeros(k, *prompt.shape, dtype=torch.bool, device=valid.device)
        return MaskSample(_full_width(no_prompt, masked), masked.float() / t)


@ESTIMATORS.register
@dataclass
class MCElboLL(Estimator):
    """Monte-Carlo ELBO in the L/l form (LLaDA, Nie et al. 2025, Eq. 6; lower variance):

        log pi(y | x) >= E_{l ~ U{1..L}} E_{m: |m| = l} [ (L/l) sum_{i in m} log p_theta(y_i | x, y_{~m}) ],

    L = the row's number of valid completion tokens, exactly l of them masked uniformly at
    random, weight L/l on masked tokens. Equals the 1/t form in expectation (eps -> 0): both
    give each mask of size l the total weight (l-1)!(L-l)!/L! = B(l, L-l+1)."""

    name: ClassVar[str] = "mc_elbo_ll"

    def draw(self, attention_mask, completion_mask, prompt_len, generator, *, trace=None) -> MaskSample:
        prompt, valid = _completion_valid(attention_mask, completion_mask, prompt_len)
        k, (b, l) = self.n_samples, valid.shape
        n_valid = valid.sum(-1).expand(k, b)  # L_i
        count = (uniform((k, b), generator, valid.device) * n_valid).long() + 1  # l ~ U{1..L_i}
        masked = exact_count_mask(valid.expand(k, b, l), count, generator)
        weights = masked.float() * (n_valid.float() / count.float()).unsqueeze(-1)
        no_prompt = torch.zeros(k, *prompt.shape, dtype=torch.bool, device=valid.device)
        return MaskSample(_full_width(no_prompt, masked), weights)


@ESTIMATORS.register
@dataclass
class Coupled(Estimator):
    """Coupled complementary masks (DiffuCoder, Gong et al. 2025, coupled-GRPO): each draw is
    a pair of passes, a mask m ~ Bern(t) over the valid completion tokens and its complement
    m^c = valid \\ m, so every valid token is scored exactly once per pair. Weights:

        A  = (1/t)     sum_{l in m}   log p_theta(y_l | x, y_{~m}),
        A' = (1/(1-t)) sum_{l in m^c} log p_theta(y_l | x, y_{~m^c}),   estimate (A + A') / 2,

    with t ~ U(t_min, 1 - t_min). The interval is symmetric, so (1 - t, m^c) has the same law
    as (t, m) and A, A' are each the unbiased 1/t-ELBO estimate over t in [t_min, 1 - t_min];
    the pair is unbiased too and has lower variance (negatively correlated halves).
    DiffuCoder uses t in [0.2, 0.8]; the default ``t_min = 1e-3`` targets the usual ELBO.
    ``n_samples = n`` pairs give K = 2n passes (pass 2i is m, pass 2i+1 its complement)."""

    t_min: float = 1e-3
    name: ClassVar[str] = "coupled"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.t_min < 0.5:
            raise ValueError(f"coupled: t_min must be in (0, 0.5), got {self.t_min}")

    def passes_per_draw(self, num_steps: int) -> int:
        return 2 * self.n_samples

    def draw(self, attention_mask, completion_mask, prompt_len, generator, *, trace=None) -> MaskSample:
        prompt, valid = _completion_valid(attention_mask, completion_mask, prompt_len)
        n, (b, l) = self.n_samples, valid.shape
        t = sample_t((n, b, 1), generator, valid.device, low=self.t_min, high=1.0 - self.t_min)
        m = bernoulli_mask(valid.expand(n, b, l), t, generator)
        mc = valid & ~m
        masked = torch.stack([m, mc], dim=1).reshape(2 * n, b, l)
        weights = torch.stack([m.float() / t, mc.float() / (1 - t)], dim=1).reshape(2 * n, b, l)
        no_prompt = torch.zeros(2 * n, *prompt.shape, dtype=torch.bool, device=valid.device)
        return MaskSample(_full_width(no_prompt, masked), weights)


def get_estimator(name: str, **options) -> Estimator:
    """Build the estimator registered as ``name`` with its ``options`` (e.g. ``n_samples``,
    ``max_batch``, ``p_mask_prompt``, ``eps``, ``t_min``)."""
    cls = ESTIMATORS.lookup(name)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"estimator {name!r}: unknown option(s) {unknown}; it takes {sorted(known)}")
    return cls(**options)


def estimate_pair(estimator: Estimator, policy, reference, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, prompt_len: int, completion_mask: torch.Tensor,
                  mask_id: int, *, generator: torch.Generator | None = None,
                  sample: MaskSample | None = None) -> tuple[EstimateOutput, EstimateOutput]:
    """Antithetic sampling (VRPO): the policy and the reference scored on one shared
    ``MaskSample``, so ``Var(B_pi - B_ref)`` loses the mask noise common to both. The
    reference is scored under ``torch.no_grad()``."""
    if sample is None:
        sample = estimator.draw(attention_mask, completion_mask, prompt_len, generator)
    pi = estimator.estimate(policy, input_ids, attention_mask, prompt_len, completion_mask, mask_id, sample=sample)
    with torch.no_grad():
        ref = estimator.estimate(reference, input_ids, attention_mask, prompt_len, completion_mask, mask_id,
                                 sample=sample)
    return pi, ref


# Estimators that belong to one objective (SPG's block masks, trajectory likelihoods) live next to
# it and register here when the objectives package is imported.
import rl.objectives  # noqa: E402,F401

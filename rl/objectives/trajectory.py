"""Trajectory likelihoods read from the rollout's unmasking trace, and the two objectives built on them.

A masked-diffusion rollout commits the completion's tokens over ``S`` denoising steps;
``Rollout.unmask_step [B, L]`` records the (0-based, global) step at which each token was committed.
The log-likelihood of the sampled *trajectory*'s token choices is

    log pi(tau | x) = sum_s sum_{l committed at step s} log p_theta(y_l | x, y_{committed before s}),

one forward pass per step. Both methods here merge consecutive steps into ``K`` segments and score
each token in the state just before its segment starts (pass k shows the prompt and every completion
token committed in segments < k, masks the rest, and scores exactly the tokens of segment k):

- d2's **StepMerge** (Wang et al. 2025, "d2: Improved Techniques for Training Reasoning Diffusion
  Language Models", Sec. 3, the d2-StepMerge estimator): the ``S`` steps split into ``N`` segments of
  equal numbers of steps (boundaries ``floor(j S / N)``, j = 1..N-1), the same for every row; the
  prompt's real tokens are also masked with probability ``p_mask_prompt`` (one draw shared by the N
  passes, as d1's mask seed).
- **TraceRL** (Wang et al. 2025, "Revolutionizing Reinforcement Learning Framework for Diffusion Large
  Language Models", Sec. 3.1, the trace-step policy objective with the shrinkage parameter s): per row,
  the steps at which *that row* committed something, in order, grouped ``shrink`` at a time (steps
  where the row committed nothing are skipped, so a group is ``shrink`` of the row's own trace steps);
  the prompt is never masked.

With one segment per step (d2: N = S; TraceRL: shrink = 1) the per-token terms sum to the exact
log-likelihood above (tests/test_objective_trajectory.py).

Weights: a token scored in pass k has weight ``K`` (the number of segments), every other entry 0,
so the estimator's ``combine`` (the mean over passes of ``weights * logps``) gives each token's own
log-prob at its segment: ``per_token[b, l] = log p_theta(y_l | state before l's segment)``.
Token-level (``level = "token"``): the per-token terms are log-probabilities, so a token-level
ratio may be taken on them.

The objectives (d2's and TraceRL's clipped ratios) are below the estimators. TraceRL's diffusion
value model (its token-level advantages) is not implemented: TraceRL here is its policy objective
with the trainer's group advantages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rl.estimators import ESTIMATORS, Estimator, MaskSample, _completion_valid, _full_width
from rl.masking import bernoulli_mask
from rl.objectives.base import OBJECTIVES, Objective, PolicyLossInputs, PolicyLossOutput, clipped_surrogate, k3_kl


# ---- segmentations of the trace ------------------------------------------------------------------

def stepmerge_segments(trace: torch.Tensor, num_steps: int | torch.Tensor, n_segments: int) -> torch.Tensor:
    """d2-StepMerge's segment of each token ``[B, L]`` (long, in ``0..N-1``): the ``num_steps`` global
    steps cut at ``floor(j * num_steps / N)``, j = 1..N-1, into N runs of (near-)equal length, and a
    token committed at step s belongs to the number of cut points <= s. ``num_steps`` may be a 0-dim
    tensor (no host sync). With N > num_steps some segments are empty."""
    if n_segments < 1:
        raise ValueError(f"d2_stepmerge: N must be >= 1, got {n_segments}")
    j = torch.arange(1, n_segments, device=trace.device)
    cuts = torch.div(j * num_steps, n_segments, rounding_mode="floor")  # [N-1], non-decreasing
    return (trace.unsqueeze(-1) >= cuts).sum(-1)


def trace_step_groups(trace: torch.Tensor, shrink: int) -> tuple[torch.Tensor, int]:
    """TraceRL's trace steps merged ``shrink`` at a time, per row: returns each token's group ``[B, L]``
    and the number of passes ``K`` (the most groups of any row).

    Row b's trace steps are the distinct values of ``trace[b]`` in increasing order (steps where row b
    committed nothing are not trace steps of b); the r-th of them (0-based) falls in group
    ``r // shrink``. One host sync (the largest step, to size the occupancy table) and one for K."""
    if shrink < 1:
        raise ValueError(f"tracerl: shrink must be >= 1, got {shrink}")
    b = trace.shape[0]
    steps = trace.clamp(min=0)
    width = int(steps.max()) + 1 if steps.numel() else 1
    present = torch.zeros(b, width, dtype=torch.bool, device=trace.device).scatter_(1, steps, True)
    rank = present.long().cumsum(1) - 1  # rank of each present step among the row's distinct steps
    group = torch.div(rank.gather(1, steps), shrink, rounding_mode="floor")
    num_groups = torch.div(present.sum(1) + shrink - 1, shrink, rounding_mode="floor")
    return group, int(num_groups.max()) if b else 0


def segment_sample(segment: torch.Tensor, num_passes: int, valid: torch.Tensor,
                   prompt_masked: torch.Tensor) -> MaskSample:
    """The ``MaskSample`` of a segmented trajectory: for each of the ``n`` prompt masks
    ``prompt_masked [n, B, P]`` and each segment k < ``num_passes``, a pass that masks the completion
    tokens of segments >= k and scores (weight ``num_passes``) the ``valid`` tokens of segment k.
    Passes are ordered draw-major (pass ``d * K + k``); K = n * num_passes passes in all."""
    n, k = prompt_masked.shape[0], num_passes
    ks = torch.arange(k, device=segment.device).view(k, 1, 1)
    completion_masked = segment.unsqueeze(0) >= ks  # [K, B, L]: this segment and later ones are unseen
    scored = (segment.unsqueeze(0) == ks) & valid
    masked = _full_width(prompt_masked.repeat_interleave(k, dim=0), completion_masked.repeat(n, 1, 1))
    weights = (scored.float() * float(k)).repeat(n, 1, 1)
    return MaskSample(masked, weights)


def _check_trace(name: str, trace: torch.Tensor | None, completion_mask: torch.Tensor) -> torch.Tensor:
    if trace is None:
        raise ValueError(f"{name}: draw needs trace= the rollout's unmask_step [B, L] (a trajectory estimator)")
    if trace.shape != completion_mask.shape:
        raise ValueError(f"{name}: trace has shape {tuple(trace.shape)}, "
                         f"completion_mask {tuple(completion_mask.shape)}")
    return trace.long()


# ---- estimators ----------------------------------------------------------------------------------

class _SegmentScoring(Estimator):
    """``score`` that forwards only the (pass, row) pairs scoring something: a row's late segments hold
    only tokens after its EOS (or nothing) once its completion is shorter than the others, and a
    TraceRL row has fewer trace steps than the longest; those passes would cost a forward each for
    nothing. Same output as ``Estimator.score`` (zeros where nothing is scored); one host sync."""

    def score(self, model, input_ids, attention_mask, prompt_len, sample, mask_id) -> torch.Tensor:
        k, b, t = sample.masked.shape
        if input_ids.shape != (b, t):
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}, the MaskSample is for [B, T] = [{b}, {t}]")
        live = (sample.weights != 0).any(-1)  # [K, B]
        kk, bb = live.nonzero(as_tuple=True)
        out = torch.zeros(k, b, t - prompt_len, dtype=torch.float32, device=input_ids.device)
        if kk.numel() == 0:
            return out
        packed = MaskSample(sample.masked[kk, bb][None], sample.weights[kk, bb][None])
        attn = None if attention_mask is None else attention_mask[bb]
        lp = super().score(model, input_ids[bb], attn, prompt_len, packed, mask_id)[0]
        return out.to(lp.dtype).index_put((kk, bb), lp)


@ESTIMATORS.register
@dataclass
class D2StepMerge(_SegmentScoring):
    """d2-StepMerge (d2, Sec. 3): the trajectory log-likelihood with the rollout's steps merged into
    ``N`` segments of equal numbers of steps,

        log pi(tau | x) ~= sum_{k<N} sum_{l in seg_k} log p_theta(y_l | x', y_{seg_<k}),

    x' the prompt with each real token masked with probability ``p_mask_prompt`` (one mask per draw,
    shared by its N passes). ``num_steps``: the rollout's step count S; None = what the caller passes
    to ``draw`` (``num_steps=``), else the largest recorded step + 1 over the batch (equal to S unless
    the last steps committed nothing). ``n_samples`` draws of the prompt mask give K = n_samples * N
    passes, averaged."""

    N: int = 8
    p_mask_prompt: float = 0.15
    num_steps: int | None = None
    name: ClassVar[str] = "d2_stepmerge"
    level: ClassVar[str] = "token"
    needs_trace: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.N < 1:
            raise ValueError(f"d2_stepmerge: N must be >= 1, got {self.N}")
        if not 0.0 <= self.p_mask_prompt <= 1.0:
            raise ValueError(f"d2_stepmerge: p_mask_prompt must be in [0, 1], got {self.p_mask_prompt}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"d2_stepmerge: num_steps must be >= 1 or None, got {self.num_steps}")

    def passes_per_draw(self, num_steps: int) -> int:
        return self.n_samples * min(self.N, max(num_steps, 1))

    def draw(self, attention_mask, completion_mask, prompt_len, generator, *, trace=None,
             num_steps: int | None = None) -> MaskSample:
        """``num_steps``: the rollout's step count (``Rollout.num_steps``) when the caller passes it;
        the option ``num_steps`` wins over it, the batch's largest step + 1 is the last resort."""
        trace = _check_trace(self.name, trace, completion_mask)
        prompt, valid = _completion_valid(attention_mask, completion_mask, prompt_len)
        steps = next((s for s in (self.num_steps, num_steps) if s is not None), None)
        if steps is None:
            steps = trace.max() + 1  # 0-dim tensor: no host sync
        segment = stepmerge_segments(trace, steps, self.N)
        prompt_masked = bernoulli_mask(prompt.expand(self.n_samples, *prompt.shape), self.p_mask_prompt, generator)
        return segment_sample(segment, self.N, valid, prompt_masked)


@ESTIMATORS.register
@dataclass
class TraceRLTrace(_SegmentScoring):
    """TraceRL's trace likelihood (Sec. 3.1): each row's own trace steps merged ``shrink`` at a time,

        log pi(tau | x) ~= sum_t sum_{l in tau(t)} log p_theta(y_l | x, tau(1..t-1)),

    tau(t) the tokens of the row's t-th group; the prompt is never masked; K = the most groups of any
    row (rows with fewer have empty passes). Deterministic given the trace (``n_samples`` must be 1)."""

    shrink: int = 8
    name: ClassVar[str] = "tracerl"
    level: ClassVar[str] = "token"
    needs_trace: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shrink < 1:
            raise ValueError(f"tracerl: shrink must be >= 1, got {self.shrink}")
        if self.n_samples != 1:
            raise ValueError(f"tracerl: the trace passes are deterministic; n_samples must be 1, got {self.n_samples}")

    def passes_per_draw(self, num_steps: int) -> int:
        return -(-max(num_steps, 1) // self.shrink)

    def draw(self, attention_mask, completion_mask, prompt_len, generator, *, trace=None,
             num_steps: int | None = None) -> MaskSample:
        """``num_steps`` is accepted and unused: the groups come from each row's own trace steps."""
        trace = _check_trace(self.name, trace, completion_mask)
        prompt, valid = _completion_valid(attention_mask, completion_mask, prompt_len)
        group, k = trace_step_groups(trace, self.shrink)
        no_prompt = torch.zeros(1, *prompt.shape, dtype=torch.bool, device=valid.device)
        return segment_sample(group, max(k, 1), valid, no_prompt)


# ---- objectives ----------------------------------------------------------------------------------

def _token_clip_kl(inp: PolicyLossInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """d1 Eq. 3's per-token terms: clipped surrogate, clipped flags, k3 KL to the reference (or None)."""
    per_el, clipped = clipped_surrogate(inp.logp, inp.old_logp, inp.adv(), inp.epsilon, inp.epsilon_high)
    kl = k3_kl(inp.logp, inp.ref_logp) if inp.ref_logp is not None and inp.beta > 0 else None
    return per_el, clipped, kl


@OBJECTIVES.register
@dataclass
class D2StepMergeObjective(Objective):
    """d2-StepMerge's policy loss (d2, Sec. 3, with d1 Eq. 3's clipped ratio), per completion token l:

        loss_l = -min(rho_l A, clip(rho_l, 1 - eps, 1 + eps_high) A) + beta * KL_k3(pi || ref)_l,
        rho_l = exp(log pi(y_l | s_k(l)) - log pi_old(y_l | s_k(l))),

    s_k(l) the trajectory state before token l's segment (the ``d2_stepmerge`` estimator), averaged
    over the batch's valid tokens (``dapo``: the authors' sum over segments of
    ``sum(loss * mask_k) * N / |o|``, divided by their N gradient-accumulation steps).

    Options (the authors' names): ``N`` segments (their gsm8k script: 8; countdown / math500: 16;
    sudoku: 2..64), ``p_mask_prompt`` (train.yaml: 0.15); epsilon (0.5), beta (0.04) and
    num_iterations (12) are the trainer's ``rl.epsilon`` / ``rl.beta`` / ``rl.num_iterations``."""

    N: int = 8
    p_mask_prompt: float = 0.15
    name: ClassVar[str] = "d2_stepmerge"
    estimator: ClassVar[str] = "d2_stepmerge"

    @property
    def estimator_options(self) -> dict:  # type: ignore[override]
        return {"N": self.N, "p_mask_prompt": self.p_mask_prompt}

    def __post_init__(self) -> None:
        if self.N < 1:
            raise ValueError(f"d2_stepmerge: N must be >= 1, got {self.N}")

    def default_loss_type(self, level: str) -> str:
        return "dapo" if level == "token" else "grpo"

    def check_estimator(self, estimator) -> None:
        mine = (self.N, self.p_mask_prompt)
        if isinstance(estimator, D2StepMerge) and (estimator.N, estimator.p_mask_prompt) != mine:
            raise ValueError(f"d2_stepmerge: the objective has N={self.N}, p_mask_prompt={self.p_mask_prompt} but the "
                             f"estimator N={estimator.N}, p_mask_prompt={estimator.p_mask_prompt}; set them in "
                             "rl.objective_options only")

    def terms(self, estimator, sample, logps, completion_mask, rows) -> torch.Tensor:
        self.check_estimator(estimator)
        return super().terms(estimator, sample, logps, completion_mask, rows)

    def loss(self, inp: PolicyLossInputs) -> PolicyLossOutput:
        per_el, clipped, kl = _token_clip_kl(inp)
        return PolicyLossOutput(per_el if kl is None else per_el + inp.beta * kl, clipped, kl)


def pass_weights(weights: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """From a trajectory ``MaskSample``'s ``weights [K, n, L]`` (each token scored in at most one pass):
    ``(step_w, pass_w)`` ``[n, L]`` of ``dtype`` with ``pass_w = 1 / P_i`` and ``step_w = 1 / (|S_ik| P_i)``
    on scored tokens (0 elsewhere), ``P_i`` the number of non-empty passes of row i and ``|S_ik|`` the
    number of tokens scored in token l's pass."""
    scored = weights != 0
    sizes = scored.sum(-1, keepdim=True)  # [K, n, 1]
    passes = (sizes > 0).sum(0).clamp(min=1).to(dtype)  # [n, 1]
    own_size = (scored * sizes).sum(0).clamp(min=1).to(dtype)  # [n, L]
    pass_w = scored.any(0).to(dtype) / passes
    return pass_w / own_size, pass_w


@OBJECTIVES.register
@dataclass
class TraceRL(Objective):
    """TraceRL's policy objective (Sec. 3.1; dLLM-RL train/rl_llada.py, method "TraceRL"): per
    completion i with trace steps tau_i(1..P_i) (``shrink`` merged steps each, the ``tracerl``
    estimator),

        loss_i = (1/P_i) sum_t [ -(1/|tau_i(t)|) sum_{o in tau_i(t)} min(rho_o A_i, clip(rho_o, 1-eps, 1+eps_high) A_i)
                                 + beta_old * sum_{o in tau_i(t)} KL(pi || pi_old)_o ],

    rho_o = pi(o | tau_i(1..t-1)) / pi_old(o | tau_i(1..t-1)), and the mean over completions
    (``seq_mean_token_sum``). The authors average over their rows, which are (completion, trace step)
    pairs: -(1/B) sum_rows [token mean of the step's surrogate] + beta * (1/B) sum_rows [token sum of
    the step's KL]; ours equals it whenever every completion has the same number of trace steps (their
    default: steps = gen_length), and weighs each completion equally otherwise.

    Options (authors' names / configs/rl_llada.yaml): ``shrink`` (8); ``beta_old`` = their
    ``training.beta`` (0.01), a KL to the *rollout* policy (their ``logp_old_tok``; zero with
    ``rl.num_iterations = 1``), with ``use_kl_estimator_k3`` (True; False = their k1 ``logp - old``);
    ``pass_mean`` (True): the per-step / per-completion normalisation above; False = the plain token
    sum per completion. ``rl.epsilon`` is their ``eps`` (0.2); ``rl.beta > 0`` adds a k3 KL to the
    reference model the same way (they have none: set rl.beta = 0). Their ``post_num`` (how many of
    the response's padding tokens are scored; 0 in rl_llada.yaml) is the completion mask here: the
    tokens up to and including the first EOS, i.e. their post_num = 1 when the EOS is the padding token
    (LLaDA: ``<|endoftext|>``, after ``<|eot_id|>``): one more token per completion than their default."""

    shrink: int = 8
    beta_old: float = 0.01
    use_kl_estimator_k3: bool = True
    pass_mean: bool = True
    name: ClassVar[str] = "tracerl"
    estimator: ClassVar[str] = "tracerl"
    # the block-causal forms (rl/block_diffusion.py) are what a block-diffusion policy gets
    estimators: ClassVar[tuple[str, ...]] = ("tracerl", "d2_stepmerge", "block_tracerl", "block_d2_stepmerge")
    loss_type: ClassVar[str] = "seq_mean_token_sum"

    @property
    def estimator_options(self) -> dict:  # type: ignore[override]
        return {"shrink": self.shrink}

    def __post_init__(self) -> None:
        if self.shrink < 1:
            raise ValueError(f"tracerl: shrink must be >= 1, got {self.shrink}")
        if self.beta_old < 0:
            raise ValueError(f"tracerl: beta_old must be >= 0, got {self.beta_old}")

    def default_loss_type(self, level: str) -> str:
        return "seq_mean_token_sum"

    def check_estimator(self, estimator) -> None:
        if isinstance(estimator, TraceRLTrace) and estimator.shrink != self.shrink:
            raise ValueError(f"tracerl: the objective has shrink={self.shrink} but the estimator shrink="
                             f"{estimator.shrink}; set it in rl.objective_options only")
        if getattr(estimator, "n_samples", 1) != 1:
            raise ValueError("tracerl: needs each token scored in one pass (estimator n_samples = 1)")

    def terms(self, estimator, sample, logps, completion_mask, rows) -> torch.Tensor:
        self.check_estimator(estimator)
        return super().terms(estimator, sample, logps, completion_mask, rows)

    def _weights(self, inp: PolicyLossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(inp.sample, MaskSample):
            raise ValueError("tracerl: pass_mean=True needs the micro-batch's trace passes (PolicyLossInputs.sample), "
                             "or set pass_mean=False")
        return pass_weights(inp.sample.weights, inp.logp.dtype)

    def loss(self, inp: PolicyLossInputs) -> PolicyLossOutput:
        """The per-token terms of loss_i above (summed over a completion's tokens they give loss_i).
        With ``pass_mean`` the logged metrics follow the same weights: ``clipped`` (float) sums to the
        mean over trace steps of each step's clipped fraction, ``kl`` to the mean over steps of the
        step's KL token sum (their ``kl_seq.sum() / B``); the KL is the reference one when rl.beta > 0."""
        per_el, clipped, kl_ref = _token_clip_kl(inp)
        kl_old = None
        if self.beta_old > 0:
            kl_old = k3_kl(inp.logp, inp.old_logp) if self.use_kl_estimator_k3 else inp.logp - inp.old_logp
        if self.pass_mean:
            step_w, pass_w = self._weights(inp)
            per_el, clipped = per_el * step_w, clipped * step_w
            kl_old = None if kl_old is None else kl_old * pass_w
            kl_ref = None if kl_ref is None else kl_ref * pass_w
        if kl_old is not None:
            per_el = per_el + self.beta_old * kl_old
        if kl_ref is not None:
            per_el = per_el + inp.beta * kl_ref
        return PolicyLossOutput(per_el, clipped, kl_ref if kl_ref is not None else kl_old)

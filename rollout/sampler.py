"""The denoising sampler: LLaDA's semi-autoregressive low-confidence remasking, plus fast modes.

Baseline (``rollout.generate`` with default options) = the reference ``generate`` of
ML-GSAI/LLaDA (Nie et al. 2025, Alg. 4-5): the completion starts fully masked; blocks of
``block_length`` are decoded left to right, each in ``steps / num_blocks`` steps; at every step
the model predicts all positions, a token is proposed per masked position (Gumbel-max in float64
at ``temperature > 0``), and the ``k`` most confident masked positions of the current block are
committed, ``k`` spreading the block's masks evenly over its steps (remainder first). CFG runs
the model on the prompt-masked copy too and uses ``un + (s + 1) * (cond - un)``.

One deliberate difference: the mask token itself is never *proposed* (its logit is excluded
from the argmax; confidences still use the full softmax, as the reference). The reference could
"commit" the mask token, leaving the position masked; a trained model never proposes it, so
both agree there, and an untrained model (whose tied embeddings make the mask token the argmax
at masked positions) still produces a complete sequence.

Fast modes (each optional, all combinable): confidence-threshold parallel decoding
(``threshold``, Fast-dLLM), block KV cache (``kv_cache="prefix" | "dual"``, see
:mod:`rollout.kv_cache`), early commit (``early_commit``, Prophet), ``fill_after_eos``, and a
learned unmasking-order hook (``order_policy``, see :class:`StepState`).

Block-diffusion models (``block_causal``: SDAR / TraDo) are decoded by
:func:`rollout.block_sampler.block_generate` instead: block by block with the exact KV cache of
finished blocks, as SDAR's ``block_diffusion_generate``; :func:`generate` dispatches on the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from rollout.adapter import kv_cache_support, unwrap_model
from rollout.block_sampler import block_generate, decodes_by_blocks, unsupported_options
from rollout.kv_cache import BlockKVCache, window_mask
from rollout.remasking import (REMASKING, confidence_scores, needed_stats, num_transfer_tokens, propose_and_score,
                                top_k_mask)
from rollout.types import Rollout, completion_mask_from_eos

KV_CACHE_MODES = ("prefix", "dual")


@dataclass
class StepState:
    """What an ``order_policy`` sees at one denoising step.

    Block-aligned tensors: column ``j`` is sequence position ``block_start + j``.

    - ``logits`` ``[B, blk, V]`` (after CFG), ``hidden_states`` ``[B, blk, H]`` (last layer, or
      None when the model does not return hidden states);
    - ``masked`` ``[B, blk]`` still-masked positions (the candidates), ``x0`` ``[B, blk]`` the
      proposed tokens, ``confidence`` ``[B, blk]`` the ``remasking`` scores;
    - ``num_transfer`` ``[B]`` how many positions the schedule commits in each row this step;
    - ``x`` ``[B, N]`` the current sequence; ``block_start``/``block_end`` the block's positions;
    - ``step`` (global, 0-based), ``step_in_block``, ``block_index``, ``num_blocks``,
      ``steps_per_block``, ``step_fraction`` = scheduled progress in [0, 1) over all steps;
    - ``generator`` the sampler's generator (a policy may keep its own instead).

    The policy returns either a float ``[B, blk]`` of scores (the sampler commits the
    ``num_transfer[b]`` highest-scoring masked positions of row ``b``), or a bool ``[B, blk]``
    *selection* that is committed as is (it must be a subset of ``masked``). A Plackett-Luce
    policy samples its own ordering (e.g. Gumbel-top-k of its scores) and returns the selection,
    so the sampler never needs to know how it chose. Masks left at a block's last step are
    committed then, whatever the policy returned.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor | None
    masked: torch.Tensor
    x0: torch.Tensor
    confidence: torch.Tensor
    num_transfer: torch.Tensor
    x: torch.Tensor
    block_start: int
    block_end: int
    prompt_length: int
    step: int
    step_in_block: int
    block_index: int
    num_blocks: int
    steps_per_block: int
    step_fraction: float
    generator: torch.Generator | None = None


OrderPolicy = Callable[[StepState], torch.Tensor]


@contextmanager
def _eval_mode(model):
    """Put ``model`` in eval mode for the duration; restore every submodule's flag after."""
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@dataclass
class Proposal:
    """What one denoising forward gives the loop for the scored positions ``[s0, scope_end)``:
    proposals ``x0`` ``[B, S]``, the requested ``stats`` (:func:`rollout.remasking.propose_and_score`),
    and, from the torch backend only, the (post-CFG) ``logits`` and the block's last hidden states
    (for order policies)."""

    x0: torch.Tensor
    stats: dict[str, torch.Tensor]
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class Denoiser(Protocol):
    """The one place a denoising forward happens: the torch model (:class:`TorchDenoiser`) or a
    vLLM engine (:mod:`rollout.vllm_backend`). ``passes``: model forwards per call (CFG: 2)."""

    passes: int

    def __call__(self, x: torch.Tensor, s0: int, e0: int, scope_end: int, block_first_step: bool) -> Proposal: ...


class TorchDenoiser:
    """One denoising forward of a torch model: CFG batching, optional block KV cache, slicing to
    the scored window, then proposals and statistics (:func:`propose_and_score`)."""

    def __init__(self, model, *, prompt_len: int, full_mask: torch.Tensor | None, mask_id: int,
                 cfg_scale: float, kv_cache: str | None, want_hidden: bool, dtype: torch.dtype,
                 temperature: float, generator: torch.Generator | None, stats: tuple[str, ...],
                 cache_lookahead: int = 0):
        self.model, self.P, self.mask_id = model, prompt_len, mask_id
        self.cfg_scale, self.kv_cache, self.want_hidden, self.dtype = cfg_scale, kv_cache, want_hidden, dtype
        self.temperature, self.generator, self.stats = temperature, generator, stats
        self.lookahead = cache_lookahead
        self.full_mask = full_mask if cfg_scale == 0 or full_mask is None else torch.cat([full_mask, full_mask])
        self.passes = 2 if cfg_scale > 0 else 1
        self.cache: BlockKVCache | None = None
        # a shifted model (Dream) predicts position i from position i - 1: windows start one earlier
        self.shift = int(bool(getattr(unwrap_model(model), "logits_shifted", False)))
        # positions count real tokens (left padding shifts nothing), the same in full and window passes
        self.positions = None if self.full_mask is None else (self.full_mask.long().cumsum(-1) - 1).clamp(min=0)

    def __call__(self, x: torch.Tensor, s0: int, e0: int, scope_end: int, block_first_step: bool) -> Proposal:
        """Proposals for positions ``[s0, scope_end)``, with their logits ``[B, scope_end - s0, V]``
        and last-layer hidden states ``[B, e0 - s0, H]`` (or None) for the block ``[s0, e0)``."""
        B, N = x.shape
        if self.cfg_scale > 0:
            un_x = x.clone()
            un_x[:, :self.P] = self.mask_id
            x = torch.cat([x, un_x])
        kw = {"output_hidden_states": True} if self.want_hidden else {}
        q0 = 0
        if self.kv_cache is None:
            out = self.model(x, attention_mask=self.full_mask, **kw)
        elif block_first_step:
            self.cache = BlockKVCache()
            pos = self.positions if self.positions is not None else torch.arange(N, device=x.device)[None]
            out = self.model(x, attention_mask=self.full_mask, position_ids=pos, past_key_values=self.cache, **kw)
        else:
            q0, q1 = s0 - self.shift, (N if self.kv_cache == "prefix" else min(N, e0 + self.lookahead))
            self.cache.set_window(q0)
            pos = (self.positions[:, q0:q1] if self.positions is not None
                   else torch.arange(q0, q1, device=x.device)[None])
            out = self.model(x[:, q0:q1], attention_mask=window_mask(self.full_mask, q0, q1, self.dtype),
                             position_ids=pos, past_key_values=self.cache, **kw)
        logits = out.logits[:, s0 - q0:scope_end - q0]
        if self.cfg_scale > 0:
            cond, un = logits[:B], logits[B:]
            logits = un + (self.cfg_scale + 1) * (cond - un)
        hidden = getattr(out, "hidden_states", None) if self.want_hidden else None
        if hidden is not None:
            hidden = hidden[-1][:B, s0 - q0:e0 - q0]
        x0, stats = propose_and_score(logits, mask_id=self.mask_id, temperature=self.temperature,
                                      generator=self.generator, stats=self.stats)
        return Proposal(x0=x0, stats=stats, logits=logits, hidden=hidden)


def check_args(prompt_ids, attention_mask, *, steps, gen_length, block_length, temperature, cfg_scale,
               remasking, threshold, early_commit, kv_cache, cache_lookahead=0):
    if prompt_ids.dim() != 2 or prompt_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"prompt_ids: expected a 2D integer tensor [B, P], got {tuple(prompt_ids.shape)} "
                         f"{prompt_ids.dtype}")
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a positive multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps <= 0 or steps % num_blocks:
        raise ValueError(f"steps={steps} must be a positive multiple of the number of blocks ({num_blocks} = "
                         f"gen_length / block_length)")
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature={temperature} and cfg_scale={cfg_scale} must be >= 0")
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r}: expected one of {REMASKING}")
    if threshold is not None and threshold < 0:
        raise ValueError(f"threshold={threshold} must be >= 0 (a confidence in [0, 1]; > 1 disables it)")
    if early_commit is not None and early_commit < 0:
        raise ValueError(f"early_commit={early_commit} must be >= 0 (a top-2 probability gap)")
    if kv_cache is not None and kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache={kv_cache!r}: expected None or one of {KV_CACHE_MODES}")
    if cache_lookahead < 0 or (cache_lookahead and kv_cache != "dual"):
        raise ValueError(f"cache_lookahead={cache_lookahead}: must be >= 0, and > 0 only with kv_cache='dual' "
                         f"(got kv_cache={kv_cache!r})")
    if attention_mask is not None:
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != prompt_ids "
                             f"{tuple(prompt_ids.shape)}")
        m = attention_mask.bool()
        bad = (m[:, :-1] & ~m[:, 1:]).any(1) | ~m.any(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"attention_mask row {row}: prompts must be left-padded (zeros then ones) and "
                             f"non-empty, got {m[row].int().tolist()}")


def _model_attr(model, name):
    inner = unwrap_model(model)
    value = getattr(inner, name, None)
    return value if value is not None else getattr(getattr(inner, "config", None), name, None)


def _param_dtype(model) -> torch.dtype:
    p = next(unwrap_model(model).parameters(), None) if isinstance(model, nn.Module) else None
    return p.dtype if p is not None else torch.float32


def generate(model, prompt_ids: torch.Tensor, *, steps: int, gen_length: int, block_length: int,
             temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
             mask_id: int, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, eos_id: int | None = None,
             threshold: float | None = None, early_commit: float | None = None, fill_after_eos: bool = False,
             kv_cache: str | None = None, cache_lookahead: int = 0, order_policy: OrderPolicy | None = None,
             record_scores: bool = False) -> Rollout:
    """Sample completions of left-padded ``prompt_ids`` ``[B, P]`` by iterative unmasking.

    Baseline options reproduce LLaDA's reference ``generate`` (token for token at
    ``temperature=0``; see the module docstring). Fast modes:

    - ``threshold``: also commit every masked position of the current block whose p(x0) >= tau
      (Fast-dLLM); the schedule's count is a floor and at least one is committed per step, so
      tau > 1 gives the baseline, and a block ends as soon as it has no masks.
    - ``kv_cache``: ``"prefix"`` or ``"dual"`` block cache (:mod:`rollout.kv_cache`);
      ``cache_lookahead``: with ``"dual"``, also recompute this many positions after the block.
    - ``early_commit``: if every remaining mask a forward scored has top-1 minus top-2
      probability >= gamma, commit them all with their proposals (Prophet-style early answer;
      scope: the rest of the completion, or the current block with the dual cache).
    - ``fill_after_eos``: once a row has committed EOS, every later mask becomes EOS at once.
    - ``order_policy``: see :class:`StepState`.

    ``unmask_step`` is the global step at which each completion token was committed;
    ``record_scores`` also keeps each step's candidate scores ``[B, S, L]`` (NaN elsewhere).
    Randomness comes only from ``generator``. Runs under ``no_grad`` in eval mode and restores
    the model's train/eval flags. A block-causal model (SDAR / TraDo) is decoded by
    :func:`rollout.block_sampler.block_generate` (no CFG, early commit, bidirectional caches or
    order policy: one ``ValueError`` naming the option).
    """
    check_args(prompt_ids, attention_mask, steps=steps, gen_length=gen_length, block_length=block_length,
               temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, threshold=threshold,
               early_commit=early_commit, kv_cache=kv_cache, cache_lookahead=cache_lookahead)
    if eos_id is None:
        eos_id = _model_attr(model, "eos_token_id")
    if fill_after_eos and eos_id is None:
        raise ValueError("fill_after_eos=True needs eos_id (the model/adapter does not define one)")
    if decodes_by_blocks(model):  # block diffusion (SDAR / TraDo): blocks with the exact cache of finished ones
        why = unsupported_options(cfg_scale=cfg_scale, early_commit=early_commit, kv_cache=kv_cache,
                                  cache_lookahead=cache_lookahead, order_policy=order_policy)
        if why:
            raise ValueError(f"{why} (model: {type(unwrap_model(model)).__name__})")
        with torch.no_grad(), _eval_mode(model):
            return block_generate(model, prompt_ids, steps=steps, gen_length=gen_length, block_length=block_length,
                                  mask_id=mask_id, temperature=temperature, remasking=remasking,
                                  attention_mask=attention_mask, generator=generator, eos_id=eos_id,
                                  threshold=threshold, fill_after_eos=fill_after_eos, record_scores=record_scores)
    if kv_cache is not None:
        ok, why = kv_cache_support(model)
        if not ok:
            raise ValueError(f"kv_cache={kv_cache!r} is not supported for this model: {why}")
    denoiser = TorchDenoiser(model, prompt_len=prompt_ids.shape[1],
                             full_mask=full_attention_mask(attention_mask, gen_length), mask_id=mask_id,
                             cfg_scale=cfg_scale, kv_cache=kv_cache, want_hidden=order_policy is not None,
                             dtype=_param_dtype(model), temperature=temperature, generator=generator,
                             stats=needed_stats(remasking, threshold, early_commit), cache_lookahead=cache_lookahead)
    with torch.no_grad(), _eval_mode(model):
        out = denoise(denoiser, prompt_ids, attention_mask=attention_mask, steps=steps, gen_length=gen_length,
                      block_length=block_length, mask_id=mask_id, eos_id=eos_id, remasking=remasking,
                      generator=generator, threshold=threshold, early_commit=early_commit,
                      fill_after_eos=fill_after_eos, order_policy=order_policy, record_scores=record_scores)
    out.extras["kv_cache"] = kv_cache
    out.extras["cache_lookahead"] = cache_lookahead
    return out


def full_attention_mask(attention_mask: torch.Tensor | None, gen_length: int) -> torch.Tensor | None:
    """``[B, P + L]`` padding mask of prompt + completion (None: no padding)."""
    if attention_mask is None:
        return None
    ones = torch.ones(attention_mask.shape[0], gen_length, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([attention_mask, ones], 1)


def denoise(denoiser: Denoiser, prompt_ids: torch.Tensor, *, attention_mask: torch.Tensor | None, steps: int,
            gen_length: int, block_length: int, mask_id: int, eos_id: int | None, remasking: str,
            generator: torch.Generator | None, threshold: float | None = None, early_commit: float | None = None,
            fill_after_eos: bool = False, order_policy: OrderPolicy | None = None,
            record_scores: bool = False) -> Rollout:
    """The denoising loop of :func:`generate` over any :class:`Denoiser` (arguments checked by the
    caller): blocks left to right, the schedule's commits per step, the fast modes. Every model
    forward happens inside ``denoiser``; the loop itself only selects and commits."""
    device = prompt_ids.device
    B, P = prompt_ids.shape
    L, N = gen_length, prompt_ids.shape[1] + gen_length
    num_blocks = L // block_length
    spb = steps // num_blocks
    x = torch.full((B, N), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt_ids
    prompt_mask = (attention_mask if attention_mask is not None else torch.ones_like(prompt_ids)).long()
    unmask_step = torch.full((B, L), -1, dtype=torch.long, device=device)
    scores: list[torch.Tensor] = []
    adaptive = threshold is not None or early_commit is not None or fill_after_eos
    step = nfe = 0
    ones = torch.ones(B, dtype=torch.long, device=device)

    for blk in range(num_blocks):
        s0, e0 = P + blk * block_length, P + (blk + 1) * block_length
        masked_blk = x[:, s0:e0] == mask_id
        if adaptive and not bool(masked_blk.any()):  # filled by early commit / EOS fill
            continue
        sched = num_transfer_tokens(masked_blk.sum(1), spb)
        scope_end = e0 if early_commit is None or getattr(denoiser, "kv_cache", None) == "dual" else N
        for s in range(spb):
            prop = denoiser(x, s0, e0, scope_end, block_first_step=(s == 0))
            nfe += denoiser.passes
            xs = x[:, s0:scope_end]
            cand = xs == mask_id
            cand_b = cand[:, :block_length]
            x0 = prop.x0
            conf = confidence_scores(prop.stats, x0, remasking, generator)
            rank_scores, select = conf[:, :block_length], None
            if order_policy is not None:
                state = StepState(
                    logits=prop.logits[:, :block_length], hidden_states=prop.hidden, masked=cand_b,
                    x0=x0[:, :block_length], confidence=rank_scores, num_transfer=sched[:, s], x=x,
                    block_start=s0, block_end=e0, prompt_length=P, step=step, step_in_block=s,
                    block_index=blk, num_blocks=num_blocks, steps_per_block=spb,
                    step_fraction=(blk * spb + s) / steps, generator=generator)
                policy_scores, select = _policy_output(order_policy(state), cand_b)
                if policy_scores is not None:
                    rank_scores = policy_scores
            if select is None:
                k = sched[:, s] if threshold is None else torch.maximum(sched[:, s], ones)
                select = top_k_mask(rank_scores, cand_b, k)
                if threshold is not None:
                    select = select | (cand_b & (prop.stats["p_x0"][:, :block_length] >= threshold))
            if s == spb - 1:
                select = select | cand_b
            commit = torch.cat([select, torch.zeros_like(cand[:, block_length:])], 1)
            if early_commit is not None:
                settled = ((prop.stats["margin"] >= early_commit) | ~cand).all(1) & cand.any(1)
                commit = commit | (cand & settled[:, None])
            x[:, s0:scope_end] = torch.where(commit, x0, xs)
            c0, c1 = s0 - P, scope_end - P
            unmask_step[:, c0:c1] = unmask_step[:, c0:c1].masked_fill(commit, step)
            if fill_after_eos:
                comp = x[:, P:]
                is_eos = (comp == eos_id).long()
                fill = ((is_eos.cumsum(1) - is_eos) > 0) & (comp == mask_id)
                x[:, P:] = comp.masked_fill(fill, eos_id)
                unmask_step.masked_fill_(fill, step)
            if record_scores:
                row = torch.full((B, L), float("nan"), device=device)
                row[:, c0:c0 + block_length] = rank_scores.float().masked_fill(~cand_b, float("nan"))
                scores.append(row)
            step += 1
            if adaptive and not bool((x[:, s0:e0] == mask_id).any()):
                break

    completion = x[:, P:]
    cmask = completion_mask_from_eos(completion, eos_id) if eos_id is not None else torch.ones_like(completion)
    return Rollout(
        sequences=x, prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion,
        completion_mask=cmask, unmask_step=unmask_step, num_forward_passes=nfe, num_steps=step,
        step_scores=torch.stack(scores, 1) if record_scores else None,
        extras={"threshold": threshold, "early_commit": early_commit, "fill_after_eos": fill_after_eos,
                "block_length": block_length, "steps": steps},
    )


def _policy_output(out, cand_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split an order policy's return into (scores, None) or (None, selection)."""
    if not isinstance(out, torch.Tensor) or out.shape != cand_b.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"order_policy must return a [B, block_length] = {tuple(cand_b.shape)} tensor, got {got}")
    if out.dtype == torch.bool:
        if bool((out & ~cand_b).any()):
            row = int((out & ~cand_b).any(1).nonzero()[0, 0])
            raise ValueError(f"order_policy selection row {row} includes positions that are not masked")
        return None, out
    return out, None

"""Block-diffusion training for block-causal masked diffusion LMs (SDAR, TraDo): the SFT loss and the
TraceRL trace likelihood as pure functions of a model callable, and the block-causal forms of the
trainers' likelihood estimators (registered: ``block_mean_field``, ``block_tracerl``, ...; bottom).

A block-diffusion LM (BD3-LM, Arriola et al. 2025, "Block Diffusion", Sec. 3; SDAR, Cheng et al. 2025)
cuts the sequence into blocks of ``block_length`` positions; attention is full inside a block and
causal across blocks, and the logits at position i predict token i. A response is generated block
by block: block b is denoised (several unmasking steps) with every earlier block clean, then cached.
So the terms of both losses are

    log p_theta(x^b_i | x^{<b} clean, x^b_t noisy),        i a masked position of block b,

and one forward pass can compute them for all blocks at once on the concatenation ``[x_0, x_t]``
(BD3-LM's vectorised training): the clean sequence followed by a noisy copy of the response, with
an attention mask that lets the clean part attend block-causally to itself and the noisy copy of
block b attend to the clean blocks < b and to itself (:func:`block_attention_mask`). The noisy
copy's logits are the ones scored. Gen-Verse/dLLM-RL trains SDAR/TraDo this way
(``train/sft_sdar.py``, ``train/rl_sdar.py``: ``make_basic_block_attention``); docs/block_diffusion.md
describes their code and where we differ.

Conventions (the repository's): ``input_ids [B, T]`` = left-padded prompts of width ``P``
(``prompt_len``) then the completion ``[B, L]``, ``L = T - P``; ``attention_mask [B, T]`` (or
``[B, P]``) marks real prompt tokens (every completion column is a real position); per-token
results are completion-width ``[B, L]``.

Block alignment (``align``):
- ``"response"``: block boundaries at ``P + k * block_length`` (index space): the completion starts a
  block, the prompt is cut into blocks backwards from its end. dLLM-RL's training code.
- ``"absolute"``: boundaries at multiples of ``block_length`` in position space (positions count real
  tokens from 0, skipping left padding). SDAR's own sampler (``generate.py``) and dLLM-RL's rollout
  engine (``jetengine_ext``: ``Sequence`` prefills whole prompt blocks, then denoises the block that
  holds the prompt's tail and the first response tokens).
The two agree when every real prompt length is a multiple of ``block_length``.

The model callable: ``model(input_ids, attention_mask=<[B, 1, N, N] bool>, position_ids=<[B, N]>,
**model_kwargs)`` returning logits ``[B, N or K, V]`` (or an object with ``.logits``); a model given
``model_kwargs={"logits_to_keep": n}`` may return only the last ``n`` positions (the published SDAR
code does).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, ClassVar

import torch

from rl.estimators import ESTIMATORS, Estimator, MaskSample, MCElbo, MeanField, _completion_valid
from rl.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs
from rl.masking import apply_mask
from rl.objectives.base import clipped_surrogate, k3_kl
from rl.objectives.trajectory import D2StepMerge, TraceRLTrace, _check_trace, segment_sample, trace_step_groups
from rollout.adapter import PolicyAdapter, unwrap_model

ALIGNS = ("response", "absolute")


# ---- blocks, positions, masks -------------------------------------------------------------------------

def real_positions(attention_mask: torch.Tensor | None, batch: int, width: int, prompt_len: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """``[B, T]`` bool: real tokens (prompt tokens per ``attention_mask``, every completion column)."""
    if attention_mask is None:
        return torch.ones(batch, width, dtype=torch.bool, device=device)
    if attention_mask.shape not in ((batch, width), (batch, prompt_len)):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [B, T] = [{batch}, {width}] "
                         f"or [B, P] = [{batch}, {prompt_len}]")
    valid = torch.ones(batch, width, dtype=torch.bool, device=attention_mask.device)
    valid[:, :prompt_len] = attention_mask[:, :prompt_len].bool()
    return valid


def position_ids_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens from 0 (left padding skipped; padding gets 0), ``[B, T]`` long."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def block_ids(valid: torch.Tensor, prompt_len: int, block_length: int, align: str = "response") -> torch.Tensor:
    """Each position's block ``[B, T]`` (long; only differences matter, prompt blocks may be negative).

    ``"response"``: ``floor((j - P) / block_length)`` for column j; ``"absolute"``:
    ``floor(position / block_length)`` with positions from :func:`position_ids_from_valid`, and -1
    for left padding."""
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    if align == "response":
        cols = torch.arange(valid.shape[1], device=valid.device) - prompt_len
        return torch.div(cols, block_length, rounding_mode="floor").expand(valid.shape[0], -1).clone()
    if align == "absolute":  # left padding in block -1, before every real block
        blocks = torch.div(position_ids_from_valid(valid), block_length, rounding_mode="floor")
        return blocks.masked_fill(~valid.bool(), -1)
    raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")


def noisy_copy_start(blocks: torch.Tensor, prompt_len: int) -> int:
    """The first column of the noisy copy: the earliest start, over rows, of the block that holds the
    first completion token (``P`` under ``align="response"``). Every block holding a completion token
    then lies wholly inside the copy (earlier columns copied along are harmless: nothing reads them)."""
    if prompt_len >= blocks.shape[1]:
        raise ValueError(f"no completion columns: prompt_len={prompt_len}, width={blocks.shape[1]}")
    first = blocks[:, prompt_len:prompt_len + 1]
    cols = torch.arange(blocks.shape[1], device=blocks.device).expand_as(blocks)
    return int(torch.where(blocks == first, cols, blocks.shape[1]).min())


def block_attention_mask(blocks: torch.Tensor, valid: torch.Tensor, copy_start: int | None = None) -> torch.Tensor:
    """The block-diffusion attention mask ``[B, 1, N, N]`` (bool, True = may attend).

    ``copy_start=None``: the inference form over the ``T`` columns: query i attends key j iff j is
    real and ``block(j) <= block(i)``. Otherwise ``N = T + (T - copy_start)``: columns ``0..T-1`` are
    the clean sequence (that same mask), column ``T + m`` the noisy copy of column ``copy_start + m``.
    A noisy query of block b attends the real clean keys of blocks ``< b`` and the real noisy keys of
    block b; clean queries never see noisy keys (BD3-LM's M_BD / M_OBC / M_BC). A query with no
    key (a padding row) attends itself only, so the softmax stays finite (dLLM-RL's ``process_pad``)."""
    b, t = blocks.shape
    if valid.shape != (b, t):
        raise ValueError(f"valid has shape {tuple(valid.shape)}, blocks {tuple(blocks.shape)}")
    valid = valid.bool()
    qb, kb = blocks.unsqueeze(2), blocks.unsqueeze(1)
    clean = (kb <= qb) & valid.unsqueeze(1)  # [B, T, T]
    if copy_start is None:
        mask = clean
    else:
        if not 0 <= copy_start < t:
            raise ValueError(f"copy_start must be in [0, {t}), got {copy_start}")
        nb, nv = blocks[:, copy_start:], valid[:, copy_start:]
        m = t - copy_start
        noisy_clean = (kb < nb.unsqueeze(2)) & valid.unsqueeze(1)  # [B, M, T]
        noisy_noisy = (nb.unsqueeze(1) == nb.unsqueeze(2)) & nv.unsqueeze(1)  # [B, M, M]
        top = torch.cat([clean, torch.zeros(b, t, m, dtype=torch.bool, device=blocks.device)], dim=2)
        mask = torch.cat([top, torch.cat([noisy_clean, noisy_noisy], dim=2)], dim=1)
    lonely = ~mask.any(-1)  # [B, N]
    if bool(lonely.any()):
        mask = mask | (torch.diag_embed(lonely))
    return mask.unsqueeze(1)


@dataclass
class BlockDiffusionInput:
    """One forward's inputs: ``input_ids [B, N]`` (clean sequence then the noisy copy), the mask
    ``attention_mask [B, 1, N, N]``, ``position_ids [B, N]`` (the copy keeps its originals' positions)
    and ``copy_start`` (column ``T + m`` is the copy of column ``copy_start + m``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    copy_start: int


def block_diffusion_input(input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int, *, prompt_len: int,
                          block_length: int, attention_mask: torch.Tensor | None = None,
                          align: str = "response") -> BlockDiffusionInput:
    """``[x_0, x_t]`` for a noise ``masked`` (True = replaced by ``mask_id``), with its mask and positions.

    ``masked [B, L]``: completion noise, applied to the noisy copy only (prompt tokens never masked).
    ``masked [B, T]``: also prompt flags (d1's random prompt masking); a masked prompt token is a
    mask in the clean context and, where the copy holds it (``align="absolute"``), in the copy too;
    completion flags still apply to the copy only."""
    b, t = input_ids.shape
    n = t - prompt_len
    if masked.shape not in ((b, n), (b, t)):
        raise ValueError(f"masked has shape {tuple(masked.shape)}; expected the completion's [B, L] = [{b}, {n}] "
                         f"or the sequence's [B, T] = [{b}, {t}]")
    valid = real_positions(attention_mask, b, t, prompt_len, input_ids.device)
    blocks = block_ids(valid, prompt_len, block_length, align)
    c = noisy_copy_start(blocks, prompt_len)
    full = torch.zeros(b, t, dtype=torch.bool, device=input_ids.device)
    full[:, t - masked.shape[1]:] = masked.bool()
    full[:, :prompt_len] &= valid[:, :prompt_len]  # padding is never masked
    clean = input_ids
    if masked.shape[1] == t and bool(full[:, :prompt_len].any()):
        prompt_only = full.clone()
        prompt_only[:, prompt_len:] = False
        clean = apply_mask(input_ids, prompt_only, mask_id)
    noisy = apply_mask(input_ids[:, c:], full[:, c:], mask_id)
    pos = position_ids_from_valid(valid)
    return BlockDiffusionInput(torch.cat([clean, noisy], 1), block_attention_mask(blocks, valid, c),
                               torch.cat([pos, pos[:, c:]], 1), c)


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def block_masked_logprobs(model: Callable, input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int, *,
                          prompt_len: int, block_length: int, attention_mask: torch.Tensor | None = None,
                          align: str = "response", select: torch.Tensor | None = None,
                          model_kwargs: dict | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """``log p_theta(x^b_i | x^{<b}, x^b_t)`` at the completion positions ``select`` (default: the
    ``masked`` ones), 0 elsewhere: ``[B, L]`` float32 (float64 for float64 logits). One forward on
    :func:`block_diffusion_input` (``masked``: ``[B, L]``, or ``[B, T]`` with prompt flags); the noisy
    copy's last ``L`` positions are scored. A :class:`rollout.PolicyAdapter` (or an engine around one)
    with fused scoring computes the LM head on the scored positions only; otherwise the logits are
    scored in chunks (no ``[B, L, V]`` float32 log-softmax). ``model_kwargs`` go to the model (e.g.
    ``{"logits_to_keep": L}``)."""
    inp = block_diffusion_input(input_ids, masked, mask_id, prompt_len=prompt_len, block_length=block_length,
                                attention_mask=attention_mask, align=align)
    n = input_ids.shape[1] - prompt_len
    if select is None:
        select = masked.bool()[:, -n:]
    select = select.bool()
    targets = input_ids[:, prompt_len:]
    inner = unwrap_model(model)
    kw = dict(model_kwargs or {})
    if isinstance(inner, PolicyAdapter):
        if inner.logits_shifted:
            raise ValueError("block diffusion needs unshifted logits (position i predicts token i); "
                             f"{type(inner.model).__name__} is shifted")
        kw.setdefault("logits_to_keep", n)
        if inner.fused_scoring and kw["logits_to_keep"] == n:
            out = model(inp.input_ids, attention_mask=inp.attention_mask, position_ids=inp.position_ids,
                        score_targets=targets.masked_fill(~select, -1), **kw)
            return out.token_logps
    logits = _logits(model(inp.input_ids, attention_mask=inp.attention_mask, position_ids=inp.position_ids, **kw))
    if logits.shape[1] < n:
        raise ValueError(f"the model returned {logits.shape[1]} positions, fewer than the completion's {n}")
    return token_logprobs(logits[:, -n:], targets, select, chunk_size=chunk_size)


# ---- SFT -------------------------------------------------------------------------------------------------

def draw_block_sft_noise(shape: tuple[int, int], generator: torch.Generator | None, *, lower_p: float = 0.1,
                         upper_p: float = 0.9, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """dLLM-RL's SFT noise for block diffusion (``train/sft_sdar.py``, method ``semi-ar``): per
    completion token a masking probability ``p_i ~ U(lower_p, upper_p)`` and the token masked iff
    ``u_i <= p_i``, ``u_i ~ U(0, 1)``; i.e. each token masked independently with probability
    ``(lower_p + upper_p) / 2``, whatever its block. Returns ``(p [B, L], masked [B, L])``.

    Drawn row by row, ``p`` then ``u``, from ``generator`` (the authors' order): a generator seeded
    like their ``torch.manual_seed`` gives their masks."""
    if not 0.0 <= lower_p <= upper_p <= 1.0:
        raise ValueError(f"need 0 <= lower_p <= upper_p <= 1, got {lower_p}, {upper_p}")
    b, n = shape
    src = generator.device if generator is not None else device
    ps, us = [], []
    for _ in range(b):
        ps.append(torch.empty(n, device=src).uniform_(lower_p, upper_p, generator=generator))
        us.append(torch.rand(n, generator=generator, device=src))
    if b == 0:
        empty = torch.zeros(0, n, device=device)
        return empty, empty.bool()
    p, u = torch.stack(ps).to(device), torch.stack(us).to(device)
    return p, u <= p


def block_diffusion_sft_loss(model: Callable, input_ids: torch.Tensor, response_mask: torch.Tensor, *, mask_id: int,
                             prompt_len: int, block_length: int, attention_mask: torch.Tensor | None = None,
                             align: str = "response", lower_p: float = 0.1, upper_p: float = 0.9,
                             generator: torch.Generator | None = None,
                             noise: tuple[torch.Tensor, torch.Tensor] | None = None, weighting: str = "none",
                             normalize: str = "width", model_kwargs: dict | None = None) -> torch.Tensor:
    """Block-diffusion SFT loss, all blocks in one forward on ``[x_0, x_t]``:

        L = (1/B) sum_rows (1/Z) sum_{i in response, masked} w_i * -log p_theta(x^b_i | x^{<b}, x^b_t)

    dLLM-RL's ``sft_sdar.py`` / ``sft_trado.py`` (``forward_process``): ``w_i = 1`` (``weighting="none"``)
    and ``Z = L`` the completion width (``normalize="width"``), noise from :func:`draw_block_sft_noise`.
    ``weighting="inverse_p"``: ``w_i = 1 / p_i`` (the masked-diffusion ELBO weight 1/t with t = the
    token's masking probability: BD3-LM's L_BD, Sec. 3; LLaDA Eq. 5); ``normalize="tokens"``: ``Z`` = the
    row's number of response tokens (our ``diffusion_sft_loss``).

    ``response_mask [B, L]``: the completion tokens that are scored (their ``p_mask`` after
    ``post_num``). Noise covers every completion column (padding after the response is masked too,
    as theirs); only ``masked & response_mask`` is scored. ``noise = (p, masked)`` drawn beforehand,
    else drawn here from ``generator``. Prompt tokens are never masked nor scored."""
    b, t = input_ids.shape
    n = t - prompt_len
    resp = response_mask.bool()
    if resp.shape != (b, n):
        raise ValueError(f"response_mask has shape {tuple(resp.shape)}; expected [B, L] = [{b}, {n}]")
    if weighting not in ("none", "inverse_p"):
        raise ValueError(f"weighting must be 'none' or 'inverse_p', got {weighting!r}")
    if normalize not in ("width", "tokens"):
        raise ValueError(f"normalize must be 'width' or 'tokens', got {normalize!r}")
    p, masked = noise if noise is not None else draw_block_sft_noise(
        (b, n), generator, lower_p=lower_p, upper_p=upper_p, device=input_ids.device)
    scored = masked.bool() & resp
    logp = block_masked_logprobs(model, input_ids, masked, mask_id, prompt_len=prompt_len, block_length=block_length,
                                 attention_mask=attention_mask, align=align, select=scored, model_kwargs=model_kwargs)
    if weighting == "inverse_p":
        logp = torch.where(scored, logp / p.to(logp.dtype).clamp(min=1e-12), torch.zeros_like(logp))
    z = float(n) if normalize == "width" else resp.sum(1).clamp(min=1).to(logp.dtype)
    return (-logp.sum(1) / z).mean()


@dataclass
class PromptResponseBatch:
    """An SFT batch in the layout of this module: ``input_ids [B, P + L]`` (left-padded prompts, then
    responses right-padded with ``pad_id``), ``attention_mask [B, P]`` (real prompt tokens),
    ``response_mask [B, L]`` (trained response tokens) and ``prompt_len`` = P."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int


def split_prompt_response(input_ids: torch.Tensor, response_mask: torch.Tensor, attention_mask: torch.Tensor,
                          pad_id: int) -> PromptResponseBatch:
    """Re-lay a right-padded SFT batch (``rl.sft.collate_sft``: each row prompt then response, the
    response the positions from the first ``response_mask`` one to the row's last real token) as
    left-padded prompts and right-padded responses, so that every row's response starts at column
    P. A row with no response token keeps its whole sequence as prompt (an empty response)."""
    rows, width = input_ids.shape
    real = attention_mask.bool()
    lengths = real.sum(1).tolist()
    resp = response_mask.bool() & real
    starts = [int(r.nonzero()[0]) if bool(r.any()) else n for r, n in zip(resp, lengths)]
    p = max([s for s in starts] + [0])
    n = max([n - s for s, n in zip(starts, lengths)] + [1])
    ids = torch.full((rows, p + n), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    attn = torch.zeros(rows, p, dtype=attention_mask.dtype, device=input_ids.device)
    out_resp = torch.zeros(rows, n, dtype=torch.bool, device=input_ids.device)
    for i, (s, m) in enumerate(zip(starts, lengths)):
        ids[i, p - s:p] = input_ids[i, :s]
        attn[i, p - s:] = 1
        ids[i, p:p + m - s] = input_ids[i, s:m]
        out_resp[i, :m - s] = resp[i, s:m]
    return PromptResponseBatch(ids, attn, out_resp, p)


# ---- TraceRL ---------------------------------------------------------------------------------------------

def block_trace_groups(trace: torch.Tensor, blocks: torch.Tensor, shrink: int) -> tuple[torch.Tensor, int]:
    """TraceRL's merged trace steps for a block model: each completion token's group ``[B, L]`` and the
    number of passes ``K`` (the most groups of any (row, block)).

    Within each (row, block), the distinct recorded steps in increasing order, ``shrink`` at a time:
    a token whose step is the r-th distinct step of its block (0-based) is in group ``r // shrink``
    (dLLM-RL's ``collapse_k_unique`` per block, then ``one_round_vectorized``: round k scores, in
    every block, the tokens of the block's k-th group). Blocks are decoded one after another, so
    only a step's rank inside its block matters, not the global step count. This is
    :func:`rl.objectives.trajectory.trace_step_groups` (the per-row rule of the bidirectional
    ``tracerl``) run on one row per (row, block); a block's unused slots hold a step later than all
    (ranked last, so no real token's rank moves). ``trace`` (steps >= 0), ``blocks`` (non-decreasing
    along the row: the completion columns of :func:`block_ids`): ``[B, L]``."""
    if shrink < 1:
        raise ValueError(f"shrink must be >= 1, got {shrink}")
    if trace.shape != blocks.shape:
        raise ValueError(f"trace {tuple(trace.shape)} and blocks {tuple(blocks.shape)} disagree")
    if trace.numel() == 0:
        return torch.zeros_like(trace, dtype=torch.long), 0
    trace, blocks = trace.long(), blocks.long().contiguous()
    if int(trace.min()) < 0:
        raise ValueError("trace: every completion column needs a step >= 0")
    if bool((blocks[:, 1:] < blocks[:, :-1]).any()):
        raise ValueError("blocks must be non-decreasing along each row")
    b, n = trace.shape
    rel = blocks - blocks[:, :1]  # the completion's first block is 0
    slot = torch.arange(n, device=trace.device) - torch.searchsorted(blocks, blocks)  # column inside the block
    nb, width = int(rel.max()) + 1, int(slot.max()) + 1
    rows = torch.arange(b, device=trace.device).unsqueeze(1).expand(b, n)
    table = torch.full((b, nb, width), int(trace.max()) + 1, dtype=torch.long, device=trace.device)
    table[rows, rel, slot] = trace
    groups, _ = trace_step_groups(table.view(b * nb, width), shrink)
    group = groups.view(b, nb, width)[rows, rel, slot]
    return group, int(group.max()) + 1


def block_trace_logprobs(model: Callable, input_ids: torch.Tensor, trace: torch.Tensor, *, mask_id: int,
                         prompt_len: int, block_length: int, shrink: int = 1,
                         attention_mask: torch.Tensor | None = None, align: str = "response",
                         scored: torch.Tensor | None = None, model_kwargs: dict | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """TraceRL's trace likelihood for a block model (Wang et al. 2025, "Revolutionizing Reinforcement
    Learning Framework for Diffusion LLMs", Sec. 3.1, with the shrinkage parameter s = ``shrink``):

        log pi(tau | x) ~= sum_b sum_k sum_{l in tau_b(k)} log p_theta(y_l | x, y^{<b}, y^b_{tau_b(<k)}),

    tau_b(k) the tokens of block b's k-th merged step (:func:`block_trace_groups`). Pass k masks, in
    every block, the tokens of groups >= k and scores those of group k (all blocks in one forward on
    ``[x_0, x_t]``); a row's pass is run only when it scores something (as the authors drop empty
    rows). ``trace [B, L]``: each completion column's unmasking step (the rollout's record; every
    column, padding after the response included, needs one: dLLM-RL gives padding the row's last
    step + 1); ``scored [B, L]``: the tokens whose terms are wanted (default all; dLLM-RL's
    ``post_num = 0`` leaves the padding unscored, yet masked until its own pass).

    Returns ``(logp [B, L], group [B, L])``: each scored token's log-prob in its pass's state (0
    elsewhere) and its pass. With ``shrink = 1`` and a trace from the block sampler, ``logp`` summed
    over a row is the exact log-likelihood of the sampled trajectory's token choices."""
    b, t = input_ids.shape
    n = t - prompt_len
    if trace.shape != (b, n):
        raise ValueError(f"trace has shape {tuple(trace.shape)}; expected the completion's [B, L] = [{b}, {n}]")
    scored = torch.ones(b, n, dtype=torch.bool, device=input_ids.device) if scored is None else scored.bool()
    valid = real_positions(attention_mask, b, t, prompt_len, input_ids.device)
    blocks = block_ids(valid, prompt_len, block_length, align)[:, prompt_len:]
    group, k = block_trace_groups(trace.to(input_ids.device), blocks, shrink)
    out = None
    for step in range(k):
        score_k = (group == step) & scored
        rows = score_k.any(1).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        am = None if attention_mask is None else attention_mask[rows]
        lp = block_masked_logprobs(model, input_ids[rows], (group >= step)[rows], mask_id, prompt_len=prompt_len,
                                   block_length=block_length, attention_mask=am, align=align,
                                   select=score_k[rows], model_kwargs=model_kwargs)
        if out is None:
            out = torch.zeros(b, n, dtype=lp.dtype, device=lp.device)
        out = out.index_put((rows,), out[rows] + lp)
    if out is None:
        out = torch.zeros(b, n, dtype=torch.float32, device=input_ids.device)
    return out, group


def tracerl_block_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, group: torch.Tensor,
                       scored: torch.Tensor, *, epsilon: float = 0.2, beta: float = 0.01,
                       use_kl_estimator_k3: bool = True, normalize: str = "width") -> torch.Tensor:
    """dLLM-RL's TraceRL policy loss for SDAR/TraDo (``train/rl_sdar.py`` ``forward_process``) on the
    per-token terms of :func:`block_trace_logprobs`. Their training rows are the (completion i, pass k)
    pairs that score something (R of them); per row

        l_ik = -(1/Z) sum_{o in pass k} min(rho_o A_i, clip(rho_o, 1 - eps, 1 + eps) A_i)
               + beta (1/Z) sum_{o in pass k} KL_o,      rho_o = exp(logp_o - old_logp_o),

    KL_o the k3 estimate against the old (rollout) policy (``use_kl_estimator_k3``; else
    ``logp - old_logp``), and the loss is ``(1/R) sum l_ik``. ``normalize="width"``: ``Z = L`` the
    completion width (theirs); ``"pass_tokens"``: ``Z`` = the pass's number of scored tokens (the
    per-step token mean of the paper's objective and of their LLaDA code). Log-ratios are clamped to
    +-10 (theirs too, except the linear term of their k3). ``advantages``: ``[B]`` (their per-
    completion ``reward``) or ``[B, L]`` per token (their value-model variant)."""
    if normalize not in ("width", "pass_tokens"):
        raise ValueError(f"normalize must be 'width' or 'pass_tokens', got {normalize!r}")
    scored = scored.bool()
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    per_tok, _ = clipped_surrogate(logp, old_logp.to(logp.dtype), adv, epsilon)
    if beta > 0:
        kl = k3_kl(logp, old_logp.to(logp.dtype)) if use_kl_estimator_k3 else logp - old_logp.to(logp.dtype)
        per_tok = per_tok + beta * kl
    k = int(group.max()) + 1 if group.numel() else 0
    onehot = (group.unsqueeze(0) == torch.arange(k, device=group.device).view(k, 1, 1)) & scored  # [K, B, L]
    sizes = onehot.sum(-1)  # [K, B]
    rows = int((sizes > 0).sum())
    if rows == 0:
        return (per_tok * 0).sum()
    if normalize == "width":
        z = torch.full_like(per_tok, float(logp.shape[1]))
    else:
        z = (onehot * sizes.unsqueeze(-1)).sum(0).clamp(min=1).to(per_tok.dtype)
    return (torch.where(scored, per_tok / z, torch.zeros_like(per_tok))).sum() / rows


# ---- estimators: the trainers' path ------------------------------------------------------------------
#
# The registered estimators below are the block-causal forms of the bidirectional ones: the same
# draw (which tokens are masked in which pass, with which weight), scored with
# :func:`block_masked_logprobs` (every block's noisy copy next to the clean sequence, so a token of
# block b is predicted from the clean blocks < b and block b's noisy state). Each names the
# estimator it replaces (``block_of``); :func:`block_estimator` swaps a trainer's estimator for its
# block form when the policy is block-causal.

@dataclass
class BlockScoring(Estimator):
    """Mixin: ``score`` on the block-diffusion input. ``model_block_length``: the model's block length
    (None: the policy adapter's ``model_block_length``, read at scoring; a draw that needs it, the
    block trace, needs it set: the trainers set it from the policy); ``align``: where blocks start
    (module docstring; ``"absolute"`` = the block-causal model's own attention and SDAR's sampler)."""

    model_block_length: int | None = None
    align: str = "absolute"
    block_of: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.align not in ALIGNS:
            raise ValueError(f"{self.name}: align must be one of {ALIGNS}, got {self.align!r}")
        if self.model_block_length is not None and self.model_block_length < 1:
            raise ValueError(f"{self.name}: model_block_length must be >= 1 or None, got {self.model_block_length}")

    def block_length_for(self, model=None) -> int:
        """``model_block_length``, else the block length ``model`` (an adapter or engine) declares."""
        if self.model_block_length is not None:
            return self.model_block_length
        inner = unwrap_model(model) if model is not None else None
        n = getattr(inner, "model_block_length", None)
        if n is None:
            raise ValueError(f"{self.name}: no block length (set estimator_options.model_block_length, or score a "
                             "block-causal PolicyAdapter)")
        return int(n)

    def score(self, model, input_ids, attention_mask, prompt_len, sample, mask_id) -> torch.Tensor:
        """Per-pass token log-probs ``[K, B, L]`` (0 where ``weights == 0``): the (pass, row) pairs that
        score something, ``max_batch`` of them per forward on ``[x_0, x_t]`` (twice the completion's
        width)."""
        k, b, t = sample.masked.shape
        if input_ids.shape != (b, t):
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}, the MaskSample is for [B, T] = [{b}, {t}]")
        block_length = self.block_length_for(model)
        live = (sample.weights != 0).any(-1)  # [K, B]
        kk, bb = live.nonzero(as_tuple=True)
        out = torch.zeros(k, b, t - prompt_len, dtype=torch.float32, device=input_ids.device)
        if kk.numel() == 0:
            return out
        masked, select, ids = sample.masked[kk, bb], sample.weights[kk, bb] != 0, input_ids[bb]
        attn = None if attention_mask is None else attention_mask[bb]
        step = self.max_batch or kk.numel()
        lp = torch.cat([block_masked_logprobs(model, ids[s:s + step], masked[s:s + step], mask_id,
                                              prompt_len=prompt_len, block_length=block_length,
                                              attention_mask=None if attn is None else attn[s:s + step],
                                              align=self.align, select=select[s:s + step], chunk_size=self.chunk_size)
                        for s in range(0, kk.numel(), step)])
        return out.to(lp.dtype).index_put((kk, bb), lp)


@ESTIMATORS.register
@dataclass
class BlockMeanField(BlockScoring, MeanField):
    """diffu-GRPO's one-step estimate on a block-diffusion model: every block of the completion fully
    masked and predicted from the clean blocks before it (BD3-LM's conditional; d1's mean-field
    estimate restricted to one block at a time),

        log pi(y | x) ~= sum_b sum_{l in b} log p_theta(y_l | x', y^{<b}, [M]^{|b|}),

    x' the prompt with each real token masked with probability ``p_mask_prompt`` (in the clean
    context). Each term is what the sampler's first step of block b sees; weight 1 on valid tokens."""

    name: ClassVar[str] = "block_mean_field"
    block_of: ClassVar[str] = "mean_field"


@ESTIMATORS.register
@dataclass
class BlockMCElbo(BlockScoring, MCElbo):
    """The block-diffusion ELBO (BD3-LM, Arriola et al. 2025, Sec. 3: L_BD) by Monte Carlo: t ~ U(eps, 1) per
    pass, each valid completion token masked with probability t, weight 1/t, every block predicted
    from the clean blocks before it (one t shared by the blocks of a row, as mc_elbo shares it)."""

    name: ClassVar[str] = "block_mc_elbo"
    block_of: ClassVar[str] = "mc_elbo"


@ESTIMATORS.register
@dataclass
class BlockD2StepMerge(BlockScoring, D2StepMerge):
    """d2-StepMerge's segments (the rollout's global steps cut into N runs) on a block-diffusion model:
    a token of block b and segment k is predicted from the clean blocks < b and block b's tokens of
    segments < k. Blocks are decoded one after another, so this is the state before segment k
    except where a segment spans a block boundary (there the earlier block is already clean here)."""

    name: ClassVar[str] = "block_d2_stepmerge"
    block_of: ClassVar[str] = "d2_stepmerge"


@ESTIMATORS.register
@dataclass
class BlockTraceRLTrace(BlockScoring, TraceRLTrace):
    """TraceRL's trace likelihood on a block-diffusion model (:func:`block_trace_logprobs` through the
    trainer's ``MaskSample``): in each block, its own trace steps merged ``shrink`` at a time
    (:func:`block_trace_groups`); pass k masks, in every block, the tokens of the block's groups >= k
    and scores group k; the prompt is never masked. Completion columns without a recorded step
    (``unmask_step < 0``) get the row's last step + 1 (dLLM-RL's padding of the step map)."""

    name: ClassVar[str] = "block_tracerl"
    block_of: ClassVar[str] = "tracerl"

    def passes_per_draw(self, num_steps: int) -> int:
        """A block's tokens are committed in at most ``min(block length, num_steps)`` distinct steps,
        merged ``shrink`` at a time (every block's group k shares pass k)."""
        if self.model_block_length is None:
            return super().passes_per_draw(num_steps)
        return -(-min(self.model_block_length, max(num_steps, 1)) // self.shrink)

    def draw(self, attention_mask, completion_mask, prompt_len, generator, *, trace=None,
             num_steps: int | None = None) -> MaskSample:
        trace = _check_trace(self.name, trace, completion_mask)
        prompt, valid = _completion_valid(attention_mask, completion_mask, prompt_len)
        if self.model_block_length is None:
            raise ValueError(f"{self.name}: the trace groups need the block length: set model_block_length "
                             "(the trainers set it from the policy)")
        b, n = valid.shape
        real = real_positions(prompt, b, prompt_len + n, prompt_len, valid.device)
        blocks = block_ids(real, prompt_len, self.model_block_length, self.align)[:, prompt_len:]
        if n and bool((trace < 0).any()):
            trace = torch.where(trace < 0, trace.max(1, keepdim=True).values.clamp(min=0) + 1, trace)
        group, k = block_trace_groups(trace, blocks, self.shrink)
        no_prompt = torch.zeros(1, *prompt.shape, dtype=torch.bool, device=valid.device)
        return segment_sample(group, max(k, 1), valid, no_prompt)


def block_estimator(estimator: Estimator, block_length: int | None) -> Estimator:
    """The block-causal form of ``estimator`` for a model with blocks of ``block_length``: a block
    estimator keeps its options (its ``model_block_length`` filled in when unset); any other becomes
    the registered estimator whose ``block_of`` names it, with the same options. Raises
    ``ValueError`` naming the block forms when ``estimator`` has none."""
    if isinstance(estimator, BlockScoring):
        if estimator.model_block_length is None and block_length is not None:
            return replace(estimator, model_block_length=int(block_length))
        return estimator
    forms = {c.block_of: c for c in ESTIMATORS.values() if isinstance(c, type) and issubclass(c, BlockScoring)}
    cls = forms.get(estimator.name)
    if cls is None:
        known = ", ".join(f"{b} -> {c.name}" for b, c in sorted(forms.items()))
        raise ValueError(f"estimator {estimator.name!r} has no block-causal form, and the policy is a block-diffusion "
                         f"model; estimators with one: {known}")
    values = {f.name: getattr(estimator, f.name) for f in fields(estimator) if f.init}
    return cls(**values, model_block_length=None if block_length is None else int(block_length))


def block_form(estimator: Estimator, block_length: int | None) -> Estimator:
    """:func:`block_estimator` for a trainer: an estimator without a block-causal form is a
    :class:`rl.config.ConfigError` naming the config key (one line at the CLI)."""
    from rl.config import ConfigError

    try:
        return block_estimator(estimator, block_length)
    except ValueError as e:
        raise ConfigError(f"estimator={estimator.name!r}: {e}") from None

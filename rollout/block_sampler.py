"""Block-diffusion decoding (SDAR / TraDo): blocks left to right, an exact KV cache of finished blocks.

A block-causal model (:class:`rollout.models.SDARForMaskedLM`; Arriola et al. 2025, SDAR's
``block_diffusion_generate``) attends fully inside a block of ``block_length`` positions and causally
across blocks. Blocks are aligned on *positions* (``0, block_length, ...`` counting real tokens), so
the prompt's last partial block is completed by the first completion tokens. Decoding:

- the prompt's whole blocks are encoded once (by the first step's forward, with the first block)
  and their keys/values cached;
- each later block starts fully masked (prompt tokens of a partial block kept) and is denoised in
  ``steps / (gen_length / block_length)`` steps; a step runs the model on the block alone, attending
  to the cache, and commits, among the block's masked positions, the ``k`` most confident
  proposals, ``k`` from SDAR's schedule (``block_length`` spread evenly over the steps, remainder
  first; ``low_confidence_static``), and with ``threshold`` also every one whose confidence
  exceeds it (``low_confidence_dynamic``: strictly greater, as SDAR); the block ends once it has no
  masks;
- a finished block never changes again, so its keys/values are exact: they are computed once with
  its final tokens and cached. SDAR runs one extra forward per block for that; here it is the
  first step of the next block, whose input is [finished block, new block] (block-causal attention
  makes the finished block's keys the same as in a forward of its own), storing only the finished
  block.

Batches with left padding: every row is laid out so that its blocks start at the same columns
(padding by whole blocks before the prompt's whole blocks), so one forward serves all rows and each
row gets exactly the tokens it gets alone (padding is hidden; a finished row's steps commit
nothing). Blocks past a row's last one (``ceil((prompt + gen_length) / block_length)`` blocks, as
SDAR) are not decoded for that row.

Deliberate differences from SDAR's ``generate.py``: proposals and confidences are those of the
bidirectional sampler (:func:`rollout.remasking.propose_and_score`: the mask token is never proposed;
Gumbel-max in float64 at ``temperature > 0``, confidences from the untempered softmax, no top-k /
top-p); when the schedule's ``k`` exceeds the block's masks (a partial first block with
``steps < block_length``) the remaining masks are committed and nothing else (SDAR's per-row
``topk`` then also rewrites committed tokens, prompt tokens included, with proposals). Greedy
(argmax) decoding equals SDAR's with its multinomial draw replaced by the argmax, token for token
(tests/test_rollout_block.py).
"""

from __future__ import annotations

import warnings

import torch

from rollout.adapter import unwrap_model
from rollout.kv_cache import FinishedBlocksCache
from rollout.remasking import confidence_scores, needed_stats, propose_and_score, top_k_mask
from rollout.types import Rollout, completion_mask_from_eos


def decodes_by_blocks(model) -> bool:
    """Whether ``model`` (adapter, engine or HF model) is a block-diffusion model (``block_causal``),
    decoded by :func:`block_generate`."""
    return bool(getattr(unwrap_model(model), "block_causal", False))


def _model_block_length(model) -> int | None:
    """``config.block_length`` of the (wrapped) model, or None."""
    inner = unwrap_model(model)
    value = getattr(inner, "model_block_length", None)  # a PolicyAdapter
    if value is None:
        value = getattr(getattr(inner, "config", None), "block_length", None)
    return int(value) if isinstance(value, int) else None


def block_schedule(block_length: int, steps: int) -> list[int]:
    """SDAR's tokens per step: ``block_length`` spread evenly over ``steps``, remainder first."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def steps_to_commit(masks: int, schedule: list[int]) -> int:
    """Steps the static schedule needs to commit ``masks`` positions (0 for none)."""
    done = 0
    for i, k in enumerate(schedule):
        if done >= masks:
            return i
        done += k
    return len(schedule)


def unsupported_options(*, cfg_scale: float = 0.0, early_commit: float | None = None, kv_cache: str | None = None,
                        cache_lookahead: int = 0, order_policy=None) -> str | None:
    """One line naming the first sampler option block-diffusion decoding does not take (None: all fine)."""
    if cfg_scale:
        return f"cfg_scale={cfg_scale}: classifier-free guidance is not implemented for block-diffusion decoding"
    if early_commit is not None:
        return f"early_commit={early_commit}: not implemented for block-diffusion decoding (blocks commit as SDAR)"
    if kv_cache is not None or cache_lookahead:
        return (f"kv_cache={kv_cache!r}: block-diffusion models always decode with the exact cache of finished "
                f"blocks; the bidirectional prefix/dual caches do not apply (set kv_cache=null)")
    if order_policy is not None:
        return "order_policy: learned unmasking orders are implemented for bidirectional models only"
    return None


def block_causal_mask(q0: int, q1: int, block_length: int, real: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, 1, q1 - q0, q1]`` (True = may attend): query column ``q`` sees key column ``k`` iff
    ``k // block_length <= q // block_length`` and ``k`` is real (``real [B, >= q1]``); every query
    sees itself (a padding query then has one key, so no row is empty)."""
    dev = real.device
    q = torch.arange(q0, q1, device=dev)
    k = torch.arange(q1, device=dev)
    allowed = (k[None] // block_length <= q[:, None] // block_length)[None] & real[:, None, :q1]
    return (allowed | (k[None] == q[:, None])[None])[:, None]


@torch.no_grad()
def block_generate(model, prompt_ids: torch.Tensor, *, steps: int, gen_length: int, block_length: int,
                   mask_id: int, temperature: float = 0.0, remasking: str = "low_confidence",
                   attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   eos_id: int | None = None, threshold: float | None = None, fill_after_eos: bool = False,
                   record_scores: bool = False, exact_cache: bool = True) -> Rollout:
    """Completions of left-padded ``prompt_ids [B, P]`` from a block-causal model (module docstring).

    Arguments as :func:`rollout.generate` (checked by it): ``steps`` over the whole completion, so
    ``steps / (gen_length / block_length)`` per block (SDAR's ``denoising_steps``); ``threshold``
    switches from SDAR's static to its dynamic commits; ``fill_after_eos``: once a row has
    committed EOS every later mask becomes EOS at once (and decoding stops when all rows have one).
    ``exact_cache=False`` recomputes the whole prefix at every step (same tokens; for tests and
    benchmarks). ``unmask_step``: the global step that committed each completion token."""
    trained = _model_block_length(model)
    if trained is not None and trained != block_length:
        warnings.warn(f"block_length={block_length}: decoding in blocks of {block_length} but the model's "
                      f"config.block_length is {trained} (SDAR's sampler allows it; the model attends in blocks of "
                      f"{trained} when scored without an explicit mask)", stacklevel=2)
    device = prompt_ids.device
    B, P = prompt_ids.shape
    L, bl = gen_length, block_length
    spb = steps // (L // bl)
    schedule = block_schedule(bl, spb)
    prompt_mask = (attention_mask if attention_mask is not None else torch.ones_like(prompt_ids)).long()
    lens = prompt_mask.sum(1).tolist()  # one host read, before the loop: the layout
    whole = [n // bl for n in lens]
    rest = [n % bl for n in lens]
    n_prefix = max(whole)  # prompt blocks of the longest-prefix row: the decoded blocks start after them
    n_blocks = L // bl + int(any(rest))
    C, P0 = bl * (n_prefix + n_blocks), bl * n_prefix
    offset = torch.tensor([bl * (n_prefix - w) for w in whole], device=device)
    comp_start = torch.tensor([P0 + r for r in rest], device=device)
    cols = torch.arange(C, device=device)[None]
    real = cols >= offset[:, None]
    positions = (cols - offset[:, None]).clamp(min=0)
    # canvas: prompt tokens at their columns, masks elsewhere; only a row's own blocks are decoded
    row_end = P0 + bl * torch.tensor([-(-(r + L) // bl) for r in rest], device=device)
    src = (cols - offset[:, None] + (P - torch.tensor(lens, device=device))[:, None]).clamp(0, P - 1)
    in_prompt = real & (cols < comp_start[:, None])
    x = torch.where(in_prompt, prompt_ids.gather(1, src), torch.full_like(src, mask_id))
    decodable = (cols >= comp_start[:, None]) & (cols < row_end[:, None])
    in_completion = cols >= comp_start[:, None]
    unmask = torch.full((B, C), -1, dtype=torch.long, device=device)
    stats = needed_stats(remasking, threshold, None)
    ks = [torch.full((B,), k, dtype=torch.long, device=device) for k in schedule]
    adaptive = threshold is not None or fill_after_eos
    cache = FinishedBlocksCache(C) if exact_cache else None
    cached = 0  # columns whose keys/values are final and stored
    scores: list[tuple[int, torch.Tensor]] = []
    step = nfe = 0
    is_mask = (x == mask_id) & decodable

    for blk in range(n_blocks):
        s0, e0 = P0 + blk * bl, P0 + (blk + 1) * bl
        if adaptive and not bool(is_mask[:, s0:e0].any()):
            if fill_after_eos and not bool(is_mask[:, s0:].any()):
                break
            continue
        # static commits: the block is full after this many steps in every row (no host read)
        n_steps = spb if adaptive else max(steps_to_commit(bl if blk else bl - r, schedule) for r in rest)
        for s in range(n_steps):
            q0 = (cached if s == 0 else s0) if exact_cache else 0
            if cache is not None:
                cache.set_window(q0)
            out = model(x[:, q0:e0], attention_mask=block_causal_mask(q0, e0, bl, real),
                        position_ids=positions[:, q0:e0], past_key_values=cache, logits_to_keep=bl)
            nfe += 1
            if s == 0:
                cached = s0
            logits = out.logits[:, -bl:]
            cand = is_mask[:, s0:e0].clone()
            x0, st = propose_and_score(logits, mask_id=mask_id, temperature=temperature, generator=generator,
                                       stats=stats)
            conf = confidence_scores(st, x0, remasking, generator)
            select = top_k_mask(conf, cand, ks[s])
            if threshold is not None:
                select = select | (cand & (st["p_x0"] > threshold))
            if s == spb - 1:
                select = select | cand
            x[:, s0:e0] = torch.where(select, x0, x[:, s0:e0])
            unmask[:, s0:e0].masked_fill_(select, step)
            is_mask[:, s0:e0] &= ~select
            if fill_after_eos:
                is_eos = ((x == eos_id) & in_completion).long()
                fill = ((is_eos.cumsum(1) - is_eos) > 0) & is_mask
                x.masked_fill_(fill, eos_id)
                unmask.masked_fill_(fill, step)
                is_mask &= ~fill
            if record_scores:
                scores.append((s0, conf.float().masked_fill(~cand, float("nan"))))
            step += 1
            if adaptive and not bool(is_mask[:, s0:e0].any()):
                break

    idx = comp_start[:, None] + torch.arange(L, device=device)[None]
    completion = x.gather(1, idx)
    unmask_step = unmask.gather(1, idx)
    cmask = completion_mask_from_eos(completion, eos_id) if eos_id is not None else torch.ones_like(completion)
    step_scores = None
    if record_scores:
        rows = []
        for s0, sc in scores:  # layout columns -> completion columns
            row = torch.full((B, C), float("nan"), device=device)
            row[:, s0:s0 + bl] = sc
            rows.append(row.gather(1, idx))
        step_scores = torch.stack(rows, 1) if rows else torch.full((B, 0, L), float("nan"), device=device)
    return Rollout(
        sequences=torch.cat([prompt_ids, completion], 1), prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        completion_ids=completion, completion_mask=cmask, unmask_step=unmask_step, num_forward_passes=nfe,
        num_steps=step, step_scores=step_scores,
        extras={"threshold": threshold, "early_commit": None, "fill_after_eos": fill_after_eos,
                "block_length": bl, "steps": steps, "kv_cache": None, "cache_lookahead": 0, "block_causal": True,
                "exact_cache": exact_cache},
    )

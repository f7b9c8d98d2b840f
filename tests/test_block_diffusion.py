"""Block-diffusion SFT loss and TraceRL trace likelihood for block-causal models (rl/block_diffusion.py).

Reference equality: the numbers Gen-Verse/dLLM-RL's train/rl_sdar.py and train/sft_sdar.py give on the
inputs of scripts/check_block_diffusion_reference.py, recorded in
tests/fixtures/block_diffusion/reference.json (the checkout is not needed here). Properties: the
mask's structure, prompt positions never masked nor scored, the one-forward ``[x_0, x_t]`` form equal
to separate per-block forwards (block b noised, earlier blocks clean, later ones absent), the trace
likelihood with shrink 1 equal to the step-by-step trajectory likelihood, gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rl.block_diffusion import (block_attention_mask, block_diffusion_input, block_diffusion_sft_loss, block_ids,
                                block_masked_logprobs, block_trace_groups, block_trace_logprobs, draw_block_sft_noise,
                                noisy_copy_start, real_positions, tracerl_block_loss)
from scripts import check_block_diffusion_reference as ref

FIXTURE = Path(__file__).parent / "fixtures" / "block_diffusion" / "reference.json"


@pytest.fixture(scope="module")
def rec():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def models():
    return ref.build_models()


@pytest.fixture(scope="module")
def inp(rec):
    out = ref.build_inputs()
    assert out["ids"].tolist() == rec["sequences"] and out["step_maps"] == rec["step_maps"]
    assert out["attention_mask"].tolist() == rec["attention_mask"]
    assert ref.padded_trace(out["step_maps"]).tolist() == rec["trace"]
    return out


def _close(value: float, expected: float, rel: float = 1e-9, abs_: float = 1e-12) -> None:
    assert value == pytest.approx(expected, rel=rel, abs=abs_)


def _check_grads(grads: dict, recorded: dict) -> None:
    for name, value in recorded["grad_sums"].items():
        _close(float(grads[name].sum()), value, rel=1e-8, abs_=1e-11)
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
    _close(norm, recorded["grad_norm"])


# ---- equal to the authors' recorded numbers --------------------------------------------------------------
def test_tracerl_matches_the_authors_recorded_numbers(rec, models, inp):
    a = rec["tracerl"]
    P, shrink = rec["prompt_len"], a["shrink"]
    assert (rec["epsilon"], rec["beta"], rec["block_length"]) == (ref.EPS, ref.BETA, ref.BLOCK)
    pairs = ref.our_passes(inp, shrink)
    assert [list(p) for p in pairs] == a["passes"]  # their rows: (completion, round), empty ones dropped
    ours = ref.our_rl(models, inp, shrink)
    for r, (b, s) in enumerate(pairs):  # the same [x0, xt] rows and scored sets
        x = block_diffusion_input(inp["ids"][b:b + 1], ours["group"][b:b + 1] >= s, ref.MASK_ID, prompt_len=P,
                                  block_length=ref.BLOCK, attention_mask=inp["attention_mask"][b:b + 1])
        assert x.input_ids[0].tolist() == a["noisy_inputs"][r]
        scored = ((ours["group"][b] == s) & inp["response"][b]).int().tolist()
        assert [0] * P + scored == a["p_mask"][r]
    old = torch.stack([ours["old"][b] * ((ours["group"][b] == s) & inp["response"][b]) for b, s in pairs])
    torch.testing.assert_close(old.float().double(), torch.tensor(a["old_float32"], dtype=torch.float64),
                               rtol=0, atol=1e-6)  # they store float32
    per_pass = torch.stack([ours["per_pass"][p] for p in pairs])
    torch.testing.assert_close(per_pass, torch.tensor(a["per_pass_loss"], dtype=torch.float64), rtol=1e-9, atol=1e-12)
    _close(float(ours["loss"]), a["loss"])
    _check_grads(ours["grads"], a)


def test_sft_matches_the_authors_recorded_numbers(rec, models, inp):
    a = rec["sft"]
    ours = ref.our_sft(models["policy"], inp)
    assert ours["masked"].int().tolist() == a["masked_tail"]  # their global-RNG draw == our generator's
    P = rec["prompt_len"]
    assert [[0] * P + r for r in (ours["masked"] & inp["response"]).int().tolist()] == a["p_mask"]
    _close(float(ours["loss"]), a["loss"])
    _check_grads(ours["grads"], a)


# ---- the attention mask ----------------------------------------------------------------------------------
def test_mask_noisy_block_sees_earlier_clean_blocks_and_itself():
    P, L, bs = 3, 7, 3
    valid = torch.tensor([[False, True, True] + [True] * L])
    blocks = block_ids(valid, P, bs)  # response-aligned: prompt blocks counted back from P
    assert blocks[0].tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1, 2]
    c = noisy_copy_start(blocks, P)
    assert c == P
    m = block_attention_mask(blocks, valid, c)[0, 0]
    T = P + L
    assert m.shape == (T + L, T + L)
    for q in range(T + L):
        for k in range(T + L):
            qn, kn = q >= T, k >= T
            qb = blocks[0, q - T + c] if qn else blocks[0, q]
            kb = blocks[0, k - T + c] if kn else blocks[0, k]
            kreal = bool(valid[0, k - T + c] if kn else valid[0, k])
            if not qn:
                want = (not kn) and kreal and kb <= qb
            else:
                want = kreal and ((not kn and kb < qb) or (kn and kb == qb))
            if not any(bool(m[q, j]) for j in range(T + L)) or q == 0:
                assert q == 0 and bool(m[q, 1]) and bool(m[q, 2])  # padding row: the real keys of its block
            assert bool(m[q, k]) == want, (q, k)
    # the plain (inference) form is the clean part's mask
    assert torch.equal(block_attention_mask(blocks, valid)[0, 0][1:], m[1:T, :T])


def test_absolute_alignment_copies_whole_blocks_and_never_masks_the_prompt():
    P, L, bs = 5, 6, 4
    attn = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # real prompt lengths 5 and 3
    valid = real_positions(attn, 2, P + L, P)
    blocks = block_ids(valid, P, bs, align="absolute")
    assert blocks[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert blocks[1].tolist() == [-1, -1, 0, 0, 0, 0, 1, 1, 1, 1, 2]  # left padding: block -1
    c = noisy_copy_start(blocks, P)
    assert c == 2  # row 1's first response block starts at its first real token (column 2)
    ids = torch.arange(10, 10 + P + L).expand(2, -1)
    masked = torch.ones(2, L, dtype=torch.bool)
    x = block_diffusion_input(ids, masked, 1, prompt_len=P, block_length=bs, attention_mask=attn, align="absolute")
    assert x.copy_start == c
    assert torch.equal(x.input_ids[:, P + L:P + L + P - c], ids[:, c:P])  # prompt columns copied, not masked
    assert (x.input_ids[:, P + L + P - c:] == 1).all()
    assert torch.equal(x.position_ids[:, P + L:], x.position_ids[:, c:P + L])
    # row 0's noisy copy of its response block 1 sees the prompt tail (column 4) through its noisy copy
    m = x.attention_mask[0, 0]
    q = P + L + (P - c)  # noisy copy of column P (block 1)
    assert bool(m[q, P + L + (4 - c)]) and not bool(m[q, 4]) and bool(m[q, 3])


# ---- the one-forward form equals separate per-block forwards ---------------------------------------------
def _direct_block_logprobs(model, ids, attn, masked, P, bs, align):
    """For each row and each block b holding completion tokens, one forward on the real tokens up to
    the end of block b (earlier blocks clean, block b noised, later blocks absent) with the plain
    block-causal mask; the log-probs of block b's masked completion tokens."""
    out = torch.zeros(masked.shape, dtype=torch.float64)
    for i in range(ids.shape[0]):
        real = attn[i].bool().tolist() + [True] * (ids.shape[1] - P)
        cols = [j for j, r in enumerate(real) if r]
        n_prompt = sum(real[:P])
        pos = torch.arange(len(cols))
        blk = pos // bs if align == "absolute" else torch.div(pos - n_prompt, bs, rounding_mode="floor")
        x = ids[i, cols].clone()
        is_masked = torch.zeros(len(cols), dtype=torch.bool)
        is_masked[n_prompt:] = masked[i]
        for b in sorted(set(blk[n_prompt:].tolist())):
            end = int((blk <= b).sum())
            seq = x[:end].clone()
            here = is_masked[:end] & (blk[:end] == b)
            seq[here] = ref.MASK_ID
            mask = (blk[:end].unsqueeze(0) <= blk[:end].unsqueeze(1)).view(1, 1, end, end)
            logp = torch.log_softmax(model(seq[None], attention_mask=mask, position_ids=pos[None, :end]).logits[0], -1)
            for j in here.nonzero().squeeze(-1).tolist():
                out[i, j - n_prompt] = logp[j, x[j]]
    return out


@pytest.mark.parametrize("align", ["response", "absolute"])
def test_concatenated_form_equals_separate_per_block_forwards(models, inp, align):
    P, bs, model = ref.P, ref.BLOCK, models["policy"]
    masked = draw_block_sft_noise(inp["response"].shape, torch.Generator().manual_seed(5), lower_p=0.3, upper_p=0.9)[1]
    with torch.no_grad():
        ours = block_masked_logprobs(model, inp["ids"], masked, ref.MASK_ID, prompt_len=P, block_length=bs,
                                     attention_mask=inp["attention_mask"], align=align)
        direct = _direct_block_logprobs(model, inp["ids"], inp["attention_mask"], masked, P, bs, align)
    assert masked.any()
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-12)
    # the model's own logits_to_keep gives the same numbers
    with torch.no_grad():
        kept = block_masked_logprobs(model, inp["ids"], masked, ref.MASK_ID, prompt_len=P, block_length=bs,
                                     attention_mask=inp["attention_mask"], align=align,
                                     model_kwargs={"logits_to_keep": masked.shape[1]})
    torch.testing.assert_close(kept, ours, rtol=0, atol=0)


@pytest.mark.parametrize("align", ["response", "absolute"])
def test_shrink_one_gives_the_step_by_step_trajectory_likelihood(models, inp, align):
    """Block by block, step by step: each token's log-prob in the state just before its step (earlier
    blocks clean, the block's earlier steps revealed, later blocks absent) = the trace terms."""
    P, bs, model = ref.P, ref.BLOCK, models["old"]
    trace = ref.padded_trace(inp["step_maps"])
    with torch.no_grad():
        logp, group = block_trace_logprobs(model, inp["ids"], trace, mask_id=ref.MASK_ID, prompt_len=P, block_length=bs,
                                           shrink=1, attention_mask=inp["attention_mask"], align=align)
        want = torch.zeros_like(logp)
        for step in range(int(trace.max()) + 1):  # global steps, one per state
            now = trace == step
            if now.any():
                d = _direct_block_logprobs(model, inp["ids"], inp["attention_mask"], trace >= step, P, bs, align)
                want = torch.where(now, d, want)
    # with shrink 1, pass k of a block masks exactly its tokens of steps >= the k-th step: whatever the
    # alignment, a token's state is its block with the earlier steps revealed
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-12)


# ---- the prompt is ignored, gradients flow ---------------------------------------------------------------
def test_sft_loss_ignores_prompt_positions_and_gradient_flows(models, inp):
    model, P, L = models["policy"], ref.P, ref.L
    seen = {}

    def spy(input_ids, **kw):
        out = model(input_ids, **kw)
        out.logits.retain_grad()
        seen["ids"], seen["logits"] = input_ids, out.logits
        return out

    noise = draw_block_sft_noise(inp["response"].shape, torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    loss = block_diffusion_sft_loss(spy, inp["ids"], inp["response"], mask_id=ref.MASK_ID, prompt_len=P,
                                    block_length=ref.BLOCK, attention_mask=inp["attention_mask"], noise=noise)
    loss.backward()
    g = seen["logits"].grad.abs().sum(-1)  # [B, P + 2L]
    assert (seen["ids"][:, :P + L] != ref.MASK_ID).all()  # the clean copy is clean
    assert (g[:, :P + L] == 0).all()  # only the noisy copy's logits are scored
    scored = noise[1] & inp["response"]
    assert torch.equal(g[:, P + L:] > 0, scored)  # exactly the masked response tokens; padding unscored
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    # the prompt's real tokens change the loss only through the clean context: masking nothing in the
    # response gives no loss at all
    none = (noise[0], torch.zeros_like(noise[1]))
    zero = block_diffusion_sft_loss(model, inp["ids"], inp["response"], mask_id=ref.MASK_ID, prompt_len=P,
                                    block_length=ref.BLOCK, attention_mask=inp["attention_mask"], noise=none)
    assert float(zero.detach()) == 0.0


def test_sft_loss_options(models, inp):
    model, P, L = models["policy"], ref.P, ref.L
    p, masked = draw_block_sft_noise(inp["response"].shape, torch.Generator().manual_seed(1))
    kw = dict(mask_id=ref.MASK_ID, prompt_len=P, block_length=ref.BLOCK, attention_mask=inp["attention_mask"],
              noise=(p, masked))
    with torch.no_grad():
        scored = masked & inp["response"]
        logp = block_masked_logprobs(model, inp["ids"], masked, ref.MASK_ID, prompt_len=P, block_length=ref.BLOCK,
                                     attention_mask=inp["attention_mask"], select=scored)
        base = block_diffusion_sft_loss(model, inp["ids"], inp["response"], **kw)
        inv = block_diffusion_sft_loss(model, inp["ids"], inp["response"], weighting="inverse_p", **kw)
        tok = block_diffusion_sft_loss(model, inp["ids"], inp["response"], normalize="tokens", **kw)
    _close(float(base), float((-logp.sum(1) / L).mean()))
    _close(float(inv), float((-(logp / p.double()).sum(1) / L).mean()))
    _close(float(tok), float((-logp.sum(1) / inp["response"].sum(1)).mean()))
    with pytest.raises(ValueError):
        block_diffusion_sft_loss(model, inp["ids"], inp["response"], weighting="1/t", **kw)


def test_noise_masks_each_token_with_the_mean_probability():
    p, masked = draw_block_sft_noise((64, 500), torch.Generator().manual_seed(0), lower_p=0.1, upper_p=0.9)
    assert float(p.min()) >= 0.1 and float(p.max()) <= 0.9
    assert abs(float(masked.float().mean()) - 0.5) < 0.01


# ---- trace groups and the TraceRL loss -------------------------------------------------------------------
def test_trace_groups_are_per_block_ranks_merged_shrink_at_a_time():
    trace = torch.tensor([[3, 1, 1, 7, 9, 8, 8, 20, 5]])  # blocks of 4 (response-aligned), global step numbers
    blocks = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2]])
    g1, k1 = block_trace_groups(trace, blocks, 1)
    assert g1.tolist() == [[1, 0, 0, 2, 1, 0, 0, 2, 0]] and k1 == 3
    g2, k2 = block_trace_groups(trace, blocks, 2)
    assert g2.tolist() == [[0, 0, 0, 1, 0, 0, 0, 1, 0]] and k2 == 2
    # a partial first block (absolute alignment) and a second row
    trace = torch.tensor([[4, 2, 2, 9, 6], [0, 0, 1, 2, 3]])
    blocks = torch.tensor([[1, 1, 2, 2, 2], [0, 1, 1, 1, 1]])
    g, k = block_trace_groups(trace, blocks, 1)
    assert g.tolist() == [[1, 0, 0, 2, 1], [0, 0, 1, 2, 3]] and k == 4


def test_tracerl_loss_per_pass_normalisations(models, inp):
    logp = -torch.rand(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    old = logp + 0.05 * torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    group = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 1, 0]])
    scored = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    ratio = torch.exp(logp - old)
    surr = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    kl = torch.exp(old - logp) - (old - logp) - 1
    tok = surr + 0.01 * kl
    passes = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    sel = [(group[b] == k) & scored[b] for b, k in passes]
    want_w = sum(float(tok[b][s].sum()) / 5 for (b, _), s in zip(passes, sel)) / 5
    want_t = sum(float(tok[b][s].mean()) for (b, _), s in zip(passes, sel)) / 5
    _close(float(tracerl_block_loss(logp, old, adv, group, scored, epsilon=0.2, beta=0.01)), want_w)
    _close(float(tracerl_block_loss(logp, old, adv, group, scored, epsilon=0.2, beta=0.01, normalize="pass_tokens")),
           want_t)
    per_token_adv = adv[:, None].expand(2, 5)  # their value-model variant: advantages per token
    _close(float(tracerl_block_loss(logp, old, per_token_adv, group, scored, epsilon=0.2, beta=0.01)), want_w)


def test_tracerl_gradient_flows(models, inp):
    model = models["policy"]
    trace = ref.padded_trace(inp["step_maps"])
    model.zero_grad(set_to_none=True)
    logp, group = block_trace_logprobs(model, inp["ids"], trace, mask_id=ref.MASK_ID, prompt_len=ref.P,
                                       block_length=ref.BLOCK, shrink=2, attention_mask=inp["attention_mask"],
                                       scored=inp["response"])
    assert (logp[~inp["response"]] == 0).all() and (logp[inp["response"]] < 0).all()
    loss = tracerl_block_loss(logp, logp.detach() - 0.01, torch.tensor(ref.ADVANTAGES, dtype=torch.float64), group,
                              inp["response"])
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0

"""The baseline sampler against an independent loop of LLaDA's reference algorithm, plus the
Rollout record's invariants and determinism."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rollout import PolicyAdapter, generate

MASK, EOS, PAD = 1, 2, 0


@pytest.fixture(scope="module")
def sharp_model(tiny_tokenizer):
    """Random weights with a larger init scale: peaked, varied predictions (a stricter exactness check
    than the near-uniform default init)."""
    from rollout.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer, seed=1, initializer_range=0.3).eval()


def reference_generate(model, prompt, *, steps, gen_length, block_length, cfg_scale=0.0, attention_mask=None,
                       mask_id=MASK):
    """LLaDA's reference ``generate`` at temperature 0 with low-confidence remasking, written plainly
    from its description (full-sequence forward, per-row torch.topk, -inf outside the block).
    Returns the sequences and, per completion position, the global step that committed it.

    The one shared deviation (see rollout/sampler.py): the mask token is never proposed."""
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype)], dim=1)
    prompt_index = x != mask_id
    committed_at = torch.full((B, gen_length), -1, dtype=torch.long)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        start, end = P + nb * block_length, P + (nb + 1) * block_length
        counts = (x[:, start:end] == mask_id).sum(dim=1).tolist()
        schedule = []
        for c in counts:
            base, rem = divmod(c, steps_per_block)
            schedule.append([base + (1 if i < rem else 0) for i in range(steps_per_block)])
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                both = model(torch.cat([x, un_x]), attention_mask=am).logits
                cond, un = torch.chunk(both, 2, dim=0)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(x, attention_mask=attention_mask).logits
            no_mask = logits.clone()
            no_mask[..., mask_id] = float("-inf")
            x0 = no_mask.argmax(dim=-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf")))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                _, idx = torch.topk(confidence[j], k=schedule[j][i])
                transfer[j, idx] = True
            x[transfer] = x0[transfer]
            committed_at[transfer[:, P:]] = nb * steps_per_block + i
    return x, committed_at


def random_prompts(lengths, seed=0, vocab=(8, 100)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(*vocab, (n,), generator=g) for n in lengths]


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("steps,gen_length,block_length", [(8, 8, 8), (6, 16, 8), (12, 24, 8), (16, 16, 4), (4, 10, 10)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_matches_reference_loop(sharp_model, steps, gen_length, block_length, batch, cfg_scale):
    prompt = torch.stack(random_prompts([6] * batch, seed=batch))
    ref, ref_steps = reference_generate(sharp_model, prompt, steps=steps, gen_length=gen_length,
                                        block_length=block_length, cfg_scale=cfg_scale)
    out = generate(sharp_model, prompt, steps=steps, gen_length=gen_length, block_length=block_length,
                   cfg_scale=cfg_scale, mask_id=MASK)
    assert torch.equal(out.sequences, ref)
    assert torch.equal(out.unmask_step, ref_steps)
    assert (out.completion_ids != MASK).all()
    assert out.num_forward_passes == steps * (2 if cfg_scale else 1)


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
@pytest.mark.parametrize("which", ["tiny_model", "sharp_model"])
def test_left_padding_rows_equal_unpadded_runs(request, which, cfg_scale):
    tiny_model = request.getfixturevalue(which)
    rows = random_prompts([5, 9, 3], seed=3)
    ids, mask = left_pad(rows)
    kw = dict(steps=8, gen_length=16, block_length=8, cfg_scale=cfg_scale, mask_id=MASK)
    out = generate(tiny_model, ids, attention_mask=mask, **kw)
    ref, ref_steps = reference_generate(tiny_model, ids, attention_mask=mask, steps=8, gen_length=16,
                                        block_length=8, cfg_scale=cfg_scale)
    assert torch.equal(out.sequences, ref) and torch.equal(out.unmask_step, ref_steps)
    assert torch.equal(out.prompt_mask, mask)
    for i, r in enumerate(rows):
        single = generate(tiny_model, r[None], **kw)
        assert torch.equal(out.completion_ids[i], single.completion_ids[0]), f"row {i}"
        assert torch.equal(out.unmask_step[i], single.unmask_step[0]), f"row {i}"


class ShiftedModel(nn.Module):
    """Dream-style: its logits at position i predict token i+1 (the tiny model's logits moved left)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.config = SimpleNamespace(model_type="shifted-test", eos_token_id=EOS, pad_token_id=PAD)

    def forward(self, input_ids, attention_mask=None, **kw):
        logits = self.base(input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=torch.cat([logits[:, 1:], torch.randn_like(logits[:, :1])], dim=1))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_shifted_logits_realigned_by_adapter(sharp_model, cfg_scale):
    tiny_model = sharp_model
    shifted = PolicyAdapter(ShiftedModel(tiny_model), mask_token_id=MASK, logits_shifted=True)
    plain = PolicyAdapter(tiny_model, mask_token_id=MASK)
    ids, mask = left_pad(random_prompts([4, 7], seed=5))
    # the adapter's logits equal the unshifted model's everywhere but position 0
    with torch.no_grad():
        a = shifted(ids, attention_mask=mask).logits
        b = tiny_model(ids, attention_mask=mask).logits
    assert torch.equal(a[:, 1:], b[:, 1:])
    kw = dict(steps=12, gen_length=24, block_length=8, cfg_scale=cfg_scale, mask_id=MASK, attention_mask=mask)
    assert torch.equal(generate(shifted, ids, **kw).sequences, generate(plain, ids, **kw).sequences)


def test_determinism_under_generator(tiny_model):
    prompt = torch.stack(random_prompts([5, 5], seed=7))
    kw = dict(steps=8, gen_length=16, block_length=8, temperature=1.0, remasking="random", mask_id=MASK)
    rng_before = torch.get_rng_state()
    a = generate(tiny_model, prompt, generator=torch.Generator().manual_seed(11), **kw)
    b = generate(tiny_model, prompt, generator=torch.Generator().manual_seed(11), **kw)
    c = generate(tiny_model, prompt, generator=torch.Generator().manual_seed(12), **kw)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG must not be used"
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.unmask_step, b.unmask_step)
    assert not torch.equal(a.sequences, c.sequences)
    # temperature > 0 does sample: not the greedy answer
    greedy = generate(tiny_model, prompt, steps=8, gen_length=16, block_length=8, mask_id=MASK)
    assert not torch.equal(a.sequences, greedy.sequences)


class EosFrom(nn.Module):
    """The tiny model with EOS made very likely from sequence position ``start`` on."""

    def __init__(self, base, start):
        super().__init__()
        self.base, self.start = base, start

    def forward(self, input_ids, attention_mask=None, **kw):
        logits = self.base(input_ids, attention_mask=attention_mask, **kw).logits.clone()
        logits[:, self.start:, EOS] += 30.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "entropy", "margin"])
def test_rollout_fields_consistent(tiny_model, tiny_tokenizer, remasking):
    P, L, blk, steps = 6, 24, 8, 12
    prompt = torch.stack(random_prompts([P] * 3, seed=2))
    model = EosFrom(tiny_model, P + 10)
    out = generate(model, prompt, steps=steps, gen_length=L, block_length=blk, mask_id=MASK, eos_id=EOS,
                   remasking=remasking, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.sequences[:, :P], prompt) and torch.equal(out.prompt_ids, prompt)
    assert torch.equal(out.completion_ids, out.sequences[:, P:])
    assert (out.completion_ids != MASK).all()
    assert out.num_steps == steps and out.num_forward_passes == steps
    # completion_mask: ones up to and including the first EOS, zeros after
    for b, row in enumerate(out.completion_ids.tolist()):
        first = row.index(EOS) if EOS in row else L - 1
        assert out.completion_mask[b].tolist() == [1] * (first + 1) + [0] * (L - first - 1)
    assert out.completion_mask.sum() < 3 * L  # the EOS bias did cut the completions
    texts = out.decode(tiny_tokenizer)
    for b, text in enumerate(texts):
        kept = [t for t, m in zip(out.completion_ids[b].tolist(), out.completion_mask[b].tolist()) if m]
        assert text == tiny_tokenizer.decode(kept, skip_special_tokens=True)
    # unmask_step: every token committed exactly once, in its block's steps, by the schedule
    spb = steps // (L // blk)
    assert ((out.unmask_step >= 0) & (out.unmask_step < steps)).all()
    for k in range(L // blk):
        assert ((out.unmask_step[:, k * blk:(k + 1) * blk] // spb) == k).all()
    counts = torch.stack([torch.bincount(r, minlength=steps) for r in out.unmask_step])
    base, rem = divmod(blk, spb)
    expected = torch.tensor([base + (1 if s % spb < rem else 0) for s in range(steps)])
    assert torch.equal(counts, expected.expand_as(counts))


@pytest.mark.parametrize("remasking", ["entropy", "margin"])
def test_entropy_and_margin_order(tiny_model, remasking):
    prompt = torch.stack(random_prompts([6], seed=4))
    out = generate(tiny_model, prompt, steps=8, gen_length=8, block_length=8, mask_id=MASK, remasking=remasking)
    x = torch.cat([prompt, torch.full((1, 8), MASK)], 1)
    with torch.no_grad():
        p = tiny_model(x).logits[0, 6:].softmax(-1)
    if remasking == "entropy":
        score = (p * p.log()).sum(-1)
    else:
        top2 = p.topk(2, -1).values
        score = top2[:, 0] - top2[:, 1]
    assert out.unmask_step[0, int(score.argmax())] == 0  # the most confident position goes first


def test_restores_train_mode_and_checks_args(tiny_model):
    prompt = torch.stack(random_prompts([4], seed=1))
    tiny_model.train()
    generate(tiny_model, prompt, steps=4, gen_length=8, block_length=4, mask_id=MASK)
    assert all(m.training for m in tiny_model.modules())
    tiny_model.eval()
    generate(tiny_model, prompt, steps=4, gen_length=8, block_length=4, mask_id=MASK)
    assert not any(m.training for m in tiny_model.modules())
    with pytest.raises(ValueError, match="block_length"):
        generate(tiny_model, prompt, steps=4, gen_length=10, block_length=4, mask_id=MASK)
    with pytest.raises(ValueError, match="steps=3"):
        generate(tiny_model, prompt, steps=3, gen_length=8, block_length=4, mask_id=MASK)
    with pytest.raises(ValueError, match="remasking"):
        generate(tiny_model, prompt, steps=4, gen_length=8, block_length=4, mask_id=MASK, remasking="lowest")
    bad = torch.tensor([[1, 0, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask row 0"):
        generate(tiny_model, prompt, steps=4, gen_length=8, block_length=4, mask_id=MASK, attention_mask=bad)

"""The sampler on the real architectures: token-exact with LLaDA's reference loop on the published
LLaDA code, agreeing with Dream's own ``diffusion_generate`` where the two schedules coincide, and
the fast modes (threshold decoding, prefix/dual KV cache) with their documented exactness."""

import importlib

import pytest
import torch

from helpers.published import published_model
from rollout import PolicyAdapter, generate
from test_rollout_sampler import left_pad, random_prompts, reference_generate


@pytest.fixture(scope="module")
def llada(published_folder):
    folder = published_folder("llada", init_std=0.3)
    return PolicyAdapter.from_pretrained(str(folder)).eval(), published_model("llada", folder)


@pytest.fixture(scope="module")
def dream(published_folder):
    folder = published_folder("dream", init_std=0.3, kv_heads=1, mute_mask=True)
    return PolicyAdapter.from_pretrained(str(folder)).eval(), published_model("dream", folder)


@pytest.mark.parametrize("steps,gen_length,block_length", [(16, 16, 8), (6, 16, 8), (12, 24, 8)])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_llada_token_exact_with_reference_loop_on_published_code(llada, steps, gen_length, block_length, cfg_scale):
    """Our sampler on our LLaDA, batched with left padding, against LLaDA's reference loop driving the
    published model on each row alone (the published code ignores padding masks)."""
    pol, ref_model = llada
    rows = random_prompts([5, 9, 3], seed=steps)
    ids, mask = left_pad(rows)
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale)
    out = generate(pol, ids, attention_mask=mask, mask_id=pol.mask_token_id, **kw)
    for i, r in enumerate(rows):
        ref, ref_steps = reference_generate(ref_model, r[None], mask_id=pol.mask_token_id, **kw)
        assert torch.equal(out.completion_ids[i], ref[0, len(r):]), f"row {i}"
        assert torch.equal(out.unmask_step[i], ref_steps[0]), f"row {i}"


def dream_schedule(gen_length: int, steps: int, eps: float) -> list[int]:
    """Tokens Dream's ``diffusion_generate`` (alg maskgit_plus) commits per step: ``int(M (1 - s/t))``
    over ``linspace(1, eps, steps + 1)`` in float32, everything left at the last step."""
    ts = torch.linspace(1, eps, steps + 1)
    left, out = torch.tensor(float(gen_length)), []
    for i in range(steps):
        n = int(left * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else int(left)
        out.append(n)
        left = left - n
    return out


def test_dream_schedules_coincide_only_at_one_or_two_steps():
    """Where the comparison below is possible: Dream's floored linear schedule equals the even
    per-block schedule (one block) only for 1 and 2 steps; elsewhere it commits fewer tokens early."""
    for length in (8, 16, 32, 64):
        for steps in range(1, length + 1):
            even = [length // steps + (1 if i < length % steps else 0) for i in range(steps)]
            assert (dream_schedule(length, steps, eps=0.0) == even) == (steps <= 2), (length, steps)
    assert dream_schedule(16, 4, eps=1e-3) == [3, 4, 4, 5]


@pytest.mark.parametrize("steps", [1, 2])
def test_dream_agrees_with_published_diffusion_generate(dream, steps):
    pol, ref_model = dream
    gen_mod = importlib.import_module("published_dream.generation_utils")
    ids, mask = left_pad(random_prompts([5, 8, 3], seed=steps))
    L, mask_id = 16, pol.mask_token_id
    config = gen_mod.DreamGenerationConfig(
        mask_token_id=mask_id, pad_token_id=0, eos_token_id=2, max_new_tokens=L, steps=steps, temperature=0.0,
        alg="maskgit_plus", eps=0.0, return_dict_in_generate=True)
    proposed_mask = []

    def check(i, x, logits):  # the fixture's muted mask token is never Dream's proposal
        proposed_mask.append(bool((logits[x == mask_id].argmax(-1) == mask_id).any()))
        return logits

    with torch.no_grad():
        theirs = ref_model.diffusion_generate(ids, attention_mask=mask, generation_config=config,
                                              generation_logits_hook_func=check).sequences
    ours = generate(pol, ids, attention_mask=mask, steps=steps, gen_length=L, block_length=L, mask_id=mask_id)
    assert proposed_mask == [False] * steps
    assert torch.equal(ours.sequences[:, ids.shape[1]:], theirs[:, ids.shape[1]:])


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_kv_cache_exact_where_documented(published_folder, family, mode):
    """Exact on a 1-layer model (frozen keys depend only on frozen tokens) and with one step per
    block (only block-start forwards); left padding throughout."""
    ids, mask = left_pad(random_prompts([5, 8, 3], seed=9))
    one_layer = PolicyAdapter.from_pretrained(str(published_folder(family, layers=1, init_std=0.3))).eval()
    kw = dict(steps=16, gen_length=32, block_length=8, mask_id=one_layer.mask_token_id, attention_mask=mask)
    ref = generate(one_layer, ids, **kw)
    out = generate(one_layer, ids, kv_cache=mode, **kw)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.unmask_step, ref.unmask_step)
    deep = PolicyAdapter.from_pretrained(str(published_folder(family, init_std=0.3))).eval()
    kw.update(steps=4)  # 32 / 8 = 4 blocks, one step each
    assert torch.equal(generate(deep, ids, kv_cache=mode, **kw).sequences, generate(deep, ids, **kw).sequences)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_kv_cache_window_logits_equal_full_forward_at_block_start_state(published_folder, family):
    """One cached window forward right after a block-start forward sees exactly the recorded keys,
    so its logits equal the full forward's (shifted models: the window starts one position early)."""
    from rollout.kv_cache import BlockKVCache, window_mask

    pol = PolicyAdapter.from_pretrained(str(published_folder(family, init_std=0.3))).eval()
    ids, mask = left_pad(random_prompts([5, 8], seed=3))
    x = torch.cat([ids, torch.full((2, 16), pol.mask_token_id)], 1)
    full_mask = torch.cat([mask, torch.ones(2, 16, dtype=mask.dtype)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    P = ids.shape[1]
    cache = BlockKVCache()
    with torch.no_grad():
        full = pol(x, attention_mask=full_mask, position_ids=pos, past_key_values=cache).logits
        q0 = P - int(pol.logits_shifted)
        cache.set_window(q0)
        win = pol(x[:, q0:P + 8], attention_mask=window_mask(full_mask, q0, P + 8, torch.float32),
                  position_ids=pos[:, q0:P + 8], past_key_values=cache).logits
    torch.testing.assert_close(win[:, -8:], full[:, P:P + 8], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_threshold_and_cache_modes_run_and_cut_passes(published_folder, family):
    pol = PolicyAdapter.from_pretrained(str(published_folder(family, init_std=0.3))).eval()
    ids, mask = left_pad(random_prompts([5, 8, 3], seed=11))
    kw = dict(steps=32, gen_length=32, block_length=8, mask_id=pol.mask_token_id, attention_mask=mask)
    base = generate(pol, ids, **kw)
    assert torch.equal(generate(pol, ids, threshold=1.5, **kw).sequences, base.sequences)  # tau > 1: baseline
    for options in ({"threshold": 0.3}, {"threshold": 0.3, "kv_cache": "dual"}, {"kv_cache": "prefix"}):
        out = generate(pol, ids, **options, **kw)
        assert (out.completion_ids != pol.mask_token_id).all() and (out.unmask_step >= 0).all()
        if "threshold" in options:
            assert out.num_forward_passes < base.num_forward_passes

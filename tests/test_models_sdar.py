"""Our SDAR / TraDo implementation (block-causal Qwen3 blocks) against the published modeling code
(../shared/models/sdar): logits under the block-causal mask, left padding, the exact KV cache of
finished blocks, the published folder layout both ways, LoRA (gradient checkpointing and fused scoring: the
family-parametrized tests in tests/test_models.py)."""

import json

import pytest
import torch
from transformers.cache_utils import DynamicCache

from helpers.published import LegacyDynamicCache, published_model
from rollout import PolicyAdapter
from rollout.adapter import resolve_model_ids
from rollout.models import SDARConfig, SDARForMaskedLM, is_block_causal
from rollout.models.sdar import DEFAULT_BLOCK_LENGTH
from test_rollout_sampler import left_pad, random_prompts


def logits_close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def block_mask(positions: torch.Tensor, block_length: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """The published convention's 4D mask (bool, True = may attend), as SDAR's sampler builds it:
    ``block(key) <= block(query)`` over ``positions [B, N]``, padding keys hidden."""
    blocks = positions // block_length
    allowed = blocks[:, None, :] <= blocks[:, :, None]
    if real is not None:
        allowed = allowed & real.bool()[:, None, :]
    return allowed[:, None]


@pytest.fixture(scope="module")
def folder(published_folder):
    return published_folder("sdar", init_std=0.3)


@pytest.mark.parametrize("options", [{}, {"tie": True}, {"kv_heads": 1, "layers": 3}, {"heads": 4, "head_dim": 32}])
@pytest.mark.parametrize("block_length", [1, 4, 5])
def test_logits_equal_published_code(published_folder, options, block_length):
    """Full sequence (11 positions: not a multiple of the block) under the block-causal mask, and
    every layer's hidden state; ``heads * head_dim != hidden`` included."""
    folder = published_folder("sdar", init_std=0.3, **options)
    ref = published_model("sdar", folder)
    ours = SDARForMaskedLM.from_pretrained(str(folder)).eval()
    assert ours.config.block_length == DEFAULT_BLOCK_LENGTH  # the fixture's config.json has none, as SDAR's
    ours.config.block_length = block_length
    x = torch.stack(random_prompts([11, 11, 11], seed=1))
    mask = block_mask(torch.arange(11)[None].expand(3, -1), block_length)
    with torch.no_grad():
        logits_close(ours(x).logits, ref(x, attention_mask=mask).logits)
        h_ours = ours(x, output_hidden_states=True).hidden_states
        h_ref = ref(x, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(h_ours) == len(h_ref) == ours.config.num_hidden_layers + 1
    for a, b in zip(h_ours, h_ref):
        logits_close(a, b)


def test_block_length_read_from_config(published_folder):
    for key, value in (("block_length", 8), ("block_size", 2)):
        config = SDARConfig(**{key: value})
        assert config.block_length == value
    ours = SDARForMaskedLM.from_pretrained(str(published_folder("sdar", block_length=5)))
    assert ours.config.block_length == 5
    assert is_block_causal(str(published_folder("sdar"))) and not is_block_causal(str(published_folder("llada")))


def test_attention_really_is_block_causal(folder):
    """A token changes the logits of its own block and of later blocks, never of earlier ones."""
    ours = SDARForMaskedLM.from_pretrained(str(folder)).eval()
    x = torch.stack(random_prompts([12], seed=3))
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1 - 8) % 90 + 8  # another ordinary token at position 5 (block 1 of 4-blocks)
    with torch.no_grad():
        a, b = ours(x).logits, ours(y).logits
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=0)
    assert (a[:, 4:] - b[:, 4:]).abs().amax(-1).gt(1e-4).all()


def test_eager_attention_equals_sdpa(folder):
    ids, mask = left_pad(random_prompts([5, 11, 7], seed=4))
    sdpa = PolicyAdapter.from_pretrained(str(folder)).eval()
    eager = PolicyAdapter.from_pretrained(str(folder), attn_implementation="eager").eval()
    assert eager.model.config._attn_implementation == "eager"
    with torch.no_grad():
        logits_close(eager(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits)


def test_left_padding_equals_published_with_its_sampler_inputs(folder):
    """The adapter's 2D mask (positions skipping padding) against the published code given the 4D
    block-causal mask over the same positions; and a padded row of ours equals it unpadded."""
    ref = published_model("sdar", folder)
    pol = PolicyAdapter.from_pretrained(str(folder)).eval()
    rows = random_prompts([4, 11, 6], seed=2)
    ids, mask = left_pad(rows)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = pol(ids, attention_mask=mask).logits
        theirs = ref(ids, attention_mask=block_mask(positions, 4, mask), position_ids=positions).logits
        real = mask.bool()
        logits_close(ours[real], theirs[real])
        for i, r in enumerate(rows):
            logits_close(ours[i, -len(r):], pol(r[None]).logits[0])


@pytest.mark.parametrize("prefill_blocks", [1, 2])
def test_kv_cache_of_finished_blocks_is_exact(folder, prefill_blocks):
    """Prefill whole blocks with ``store_kv=True``; the next block's logits with ``store_kv=False``
    equal the no-cache logits and leave the cache as it was; storing it extends the cache. Ours and
    the published code, same protocol (a ``DynamicCache``)."""
    ref = published_model("sdar", folder)
    ours = SDARForMaskedLM.from_pretrained(str(folder)).eval()
    bl, n = 4, 4 * prefill_blocks
    x = torch.stack(random_prompts([n + 8, n + 8], seed=5))
    with torch.no_grad():
        full = ours(x).logits
        for model, published in ((ours, False), (ref, True)):
            cache = LegacyDynamicCache() if published else DynamicCache()
            pos = torch.arange(n + 8)[None]
            kw = (lambda lo, hi: dict(attention_mask=block_mask(pos[:, :hi], bl)[:, :, lo:hi],
                                      position_ids=pos[:, lo:hi])) if published else (lambda lo, hi: {})
            model(x[:, :n], past_key_values=cache, store_kv=True, use_cache=True, **kw(0, n))
            assert cache.get_seq_length() == n
            step = model(x[:, n:n + bl], past_key_values=cache, store_kv=False, use_cache=True, **kw(n, n + bl)).logits
            assert cache.get_seq_length() == n
            logits_close(step, full[:, n:n + bl])
            model(x[:, n:n + bl], past_key_values=cache, store_kv=True, use_cache=True, **kw(n, n + bl))
            nxt = model(x[:, n + bl:], past_key_values=cache, store_kv=False, use_cache=True, **kw(n + bl, n + 8)).logits
            logits_close(nxt, full[:, n + bl:])


def test_kv_cache_with_left_padding(folder):
    """A padded prefix in the cache: a 2D mask as wide as cache + input hides its padding, and the
    block's logits equal the no-cache ones of the same padded batch."""
    pol = PolicyAdapter.from_pretrained(str(folder)).eval()
    ids, mask = left_pad(random_prompts([4, 8], seed=6))  # 8 columns = 2 blocks of 4 for the longer row
    blk = torch.stack(random_prompts([4, 4], seed=7))
    x = torch.cat([ids, blk], 1)
    full_mask = torch.cat([mask, torch.ones_like(blk)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        # blocks by position: row 0's prompt is its block 0, its masks block 1 (like row 1's third block)
        full = pol(x, attention_mask=full_mask, position_ids=pos).logits
        cache = DynamicCache()
        pol(ids, attention_mask=mask, position_ids=pos[:, :8], past_key_values=cache, store_kv=True)
        step = pol(blk, attention_mask=full_mask, position_ids=pos[:, 8:], past_key_values=cache, store_kv=False).logits
    logits_close(step, full[:, 8:])


@pytest.mark.parametrize("tie", [False, True])
def test_export_is_published_layout_and_round_trips(published_folder, tmp_path, tie):
    folder = published_folder("sdar", tie=tie, block_length=4)
    pol = PolicyAdapter.from_pretrained(str(folder)).eval()
    assert pol.block_causal and pol.model_block_length == 4 and not pol.logits_shifted
    out = tmp_path / "export"
    pol.save_pretrained(out)
    config, source = (json.loads((f / "config.json").read_text()) for f in (out, folder))
    for key in ("model_type", "auto_map", "architectures", "hidden_size", "head_dim", "rope_theta", "block_length",
                "tie_word_embeddings", "fuse_cross_entropy"):
        assert config[key] == source[key], key
    for py in folder.glob("*.py"):
        assert (out / py.name).read_text() == py.read_text()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(folder / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())
    x = torch.stack(random_prompts([10, 10], seed=4))
    mask = block_mask(torch.arange(10)[None].expand(2, -1), 4)
    with torch.no_grad():
        expected = pol.model(x).logits
        logits_close(published_model("sdar", out)(x, attention_mask=mask).logits, expected)
        logits_close(PolicyAdapter.from_pretrained(str(out)).model(x).logits, expected)


def test_adapter_ids_and_capabilities(folder):
    pol = PolicyAdapter.from_pretrained(str(folder))
    assert (pol.mask_token_id, pol.eos_token_id, pol.pad_token_id) == (1, 2, 0)  # from the folder's config
    assert pol.fused_scoring and not pol.supports_kv_cache  # the bidirectional window cache does not apply
    # the released configs carry no mask id: the known family's <|MASK|>
    assert resolve_model_ids(SDARConfig(), None) == (151669, False)


def test_lora_wraps_and_trains(folder, tmp_path):
    from peft import LoraConfig, get_peft_model

    pol = PolicyAdapter.from_pretrained(str(folder))
    pol.model = get_peft_model(pol.model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    assert pol.block_causal and pol.fused_scoring  # looked up through the peft wrapper
    ids, mask = left_pad(random_prompts([7, 12], seed=6))
    targets = torch.randint(8, 100, (2, 4))
    pol.train()
    pol(ids, attention_mask=mask, logits_to_keep=4, score_targets=targets).token_logps.sum().backward()
    lora = [p for n, p in pol.model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert all(p.grad is None for n, p in pol.model.named_parameters() if "lora" not in n)
    merged = pol.model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "sdar"


def test_bf16_autocast_on_cpu(folder):
    model = SDARForMaskedLM.from_pretrained(str(folder)).train()
    x = torch.stack(random_prompts([9, 9], seed=8))
    with torch.no_grad():
        fp32 = model(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, attention_mask=torch.ones_like(x)).logits
        loss = out.float().logsumexp(-1).mean()
    loss.backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fp32, rtol=0.05, atol=0.2)

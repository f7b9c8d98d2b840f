"""The built-in tiny model and tokenizer: both architectures, round trips, padding, fused scoring."""

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from rollout import PolicyAdapter, build_tiny_policy
from rollout.tiny import build_tiny_model, build_tiny_tokenizer


def test_tokenizer_specials_chat_template_and_round_trip(tmp_path):
    tok = build_tiny_tokenizer()
    assert (tok.pad_token_id, tok.mask_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    text = "12 0\n3+x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text  # one id per character, newline included
    chat = tok.apply_chat_template([{"role": "user", "content": "ab"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<|bos|><|user|>ab<|assistant|>"
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids and again.mask_token_id == 1


@pytest.mark.parametrize("arch", ["eurobert", "bert"])
def test_model_round_trips_and_is_bidirectional(tmp_path, arch):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0, arch=arch).eval()
    x = torch.randint(4, len(tok), (2, 12))
    model.save_pretrained(tmp_path)
    again = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(model(x).logits, again(x).logits, atol=1e-6)
    # bidirectional: changing the last token changes the logits at the first position
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1 - 4) % (len(tok) - 4) + 4
    assert not torch.allclose(model(x).logits[:, 0], model(y).logits[:, 0])
    # same seed, same weights; the global RNG is not consumed
    state = torch.random.get_rng_state()
    assert torch.equal(build_tiny_model(tok, seed=0, arch=arch).get_input_embeddings().weight,
                       model.get_input_embeddings().weight)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("arch", ["eurobert", "bert"])
def test_left_padding_does_not_move_positions(arch):
    """Through the adapter a left-padded row gives its unpadded logits (absolute positions too)."""
    policy = build_tiny_policy(seed=0, arch=arch).eval()
    x = torch.randint(4, 100, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = (padded != 0).long()
    a = policy(padded, attention_mask=mask).logits[:, 3:]
    b = policy(x, attention_mask=torch.ones_like(x)).logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("arch", ["eurobert", "bert"])
def test_fused_scoring_matches_log_softmax(arch):
    policy = build_tiny_policy(seed=0, arch=arch)
    assert policy.fused_scoring
    x = torch.randint(4, 100, (3, 10))
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    targets = torch.randint(4, 100, (3, 4))
    targets[1, 2] = -1  # not scored
    fused = policy(x, attention_mask=mask, logits_to_keep=4, score_targets=targets).token_logps
    full = torch.log_softmax(policy(x, attention_mask=mask).logits[:, -4:].float(), -1)
    ref = full.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(targets < 0, 0.0)
    assert torch.allclose(fused, ref, atol=1e-5)
    w = policy.model.get_input_embeddings().weight
    g1, = torch.autograd.grad(fused.sum(), w)
    g2, = torch.autograd.grad(ref.sum(), w)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_unknown_arch_is_one_clear_error():
    with pytest.raises(ValueError, match="arch='gpt'"):
        build_tiny_model(arch="gpt")


def test_both_variants_have_the_block_cache():
    """BERT's encoder writes to a given transformers Cache (transformers >= 5; exactness in test_rollout_fast)."""
    assert build_tiny_policy(arch="bert").supports_kv_cache
    assert build_tiny_policy(arch="eurobert").supports_kv_cache
    assert isinstance(build_tiny_policy(arch="bert"), PolicyAdapter)

"""The policy adapter: ids and shift resolution, loading from a local path, nn.Module behaviour."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rollout import KNOWN_MODELS, PolicyAdapter, build_tiny_policy, generate, kv_cache_support
from rollout.adapter import resolve_model_ids


def test_tiny_policy_attributes_and_forward():
    pol = build_tiny_policy(seed=0)
    assert isinstance(pol, nn.Module) and any(True for _ in pol.parameters())
    assert (pol.mask_token_id, pol.eos_token_id, pol.pad_token_id) == (1, 2, 0)
    assert pol.logits_shifted is False and pol.supports_kv_cache is True
    assert pol.dtype == torch.float32 and pol.device.type == "cpu"
    x = torch.randint(8, 100, (2, 7))
    with torch.no_grad():
        out = pol(x, attention_mask=torch.ones_like(x), output_hidden_states=True)
        raw = pol.model(x, attention_mask=torch.ones_like(x)).logits
    assert torch.equal(out.logits, raw)
    assert out.hidden_states[-1].shape == (2, 7, pol.config.hidden_size)
    assert pol(x).hidden_states is None


def test_known_families_and_missing_mask_error():
    assert resolve_model_ids(SimpleNamespace(model_type="llada")) == (126336, False)
    assert resolve_model_ids(SimpleNamespace(model_type="Dream")) == (151666, True)
    assert resolve_model_ids(SimpleNamespace(model_type="bert"), SimpleNamespace(mask_token_id=103)) == (103, False)
    assert resolve_model_ids(SimpleNamespace(model_type="x"), mask_token_id=5, logits_shifted=True) == (5, True)
    # a config's own mask id wins over the family default (tiny fixtures of the real families)
    assert resolve_model_ids(SimpleNamespace(model_type="llada", mask_token_id=1)) == (1, False)
    assert set(KNOWN_MODELS) == {"llada", "dream", "sdar"}
    assert resolve_model_ids(SimpleNamespace(model_type="sdar")) == (151669, False)
    with pytest.raises(ValueError, match="my-model: cannot tell its mask token id"):
        resolve_model_ids(SimpleNamespace(model_type="gpt2"), SimpleNamespace(mask_token_id=None), name="my-model")


def test_from_pretrained_local_copy(tmp_path):
    pol = build_tiny_policy(seed=3)
    pol.save_pretrained(tmp_path / "tiny")
    loaded = PolicyAdapter.from_pretrained(str(tmp_path / "tiny"), dtype="float32", device="cpu")
    assert (loaded.mask_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded.logits_shifted is False and loaded.supports_kv_cache
    assert loaded.tokenizer.decode(loaded.tokenizer("a+b=3").input_ids) == "a+b=3"
    x = torch.randint(8, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, pol.eval()(x).logits)
    shifted = PolicyAdapter.from_pretrained(str(tmp_path / "tiny"), logits_shifted=True)
    assert shifted.logits_shifted and shifted.supports_kv_cache  # the sampler's window starts one earlier
    assert kv_cache_support(build_tiny_policy(arch="bert")) == (True, "")
    trunk = PolicyAdapter(build_tiny_policy().model.model, mask_token_id=1)  # no LM head: not a verified class
    ok, why = kv_cache_support(trunk)
    assert not ok and "EuroBertModel is not verified for the block cache" in why


def test_from_pretrained_without_mask_token_fails_clearly(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=105, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=32)
    LlamaModel(config).save_pretrained(tmp_path / "nomask")
    from rollout.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.mask_token = None
    tok.save_pretrained(tmp_path / "nomask")
    with pytest.raises(ValueError, match="nomask: cannot tell its mask token id"):
        PolicyAdapter.from_pretrained(str(tmp_path / "nomask"))
    loaded = PolicyAdapter.from_pretrained(str(tmp_path / "nomask"), mask_token_id=1)  # AutoModel fallback
    assert loaded.mask_token_id == 1 and isinstance(loaded.model, LlamaModel)
    assert not loaded.supports_kv_cache


class FakeEngine(nn.Module):
    """Stands in for a DeepSpeed engine: wraps the adapter as ``.module`` and forwards calls."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kw):
        return self.module(*args, **kw)


def test_generate_through_engine_wrapper_with_cache():
    pol = build_tiny_policy(seed=0, num_hidden_layers=1, initializer_range=0.3)
    engine = FakeEngine(pol)
    assert kv_cache_support(engine) == (True, "")
    x = torch.randint(8, 100, (2, 5))
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=pol.mask_token_id)
    a = generate(engine, x, kv_cache="dual", **kw)
    b = generate(pol.model, x, **kw)  # the raw HF model works too
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.unmask_step, b.unmask_step) and (a.completion_ids != pol.mask_token_id).all()

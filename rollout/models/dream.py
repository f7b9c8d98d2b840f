"""Dream (Ye et al. 2025) as transformers' Qwen2 blocks with bidirectional attention.

Dream-v0 is initialised from Qwen2.5: its published code is a Qwen2 decoder (q/k/v biases, RMSNorm,
SwiGLU, RoPE) with the causal mask removed, and its logits keep the AR convention: position ``i``
predicts token ``i + 1`` (the policy adapter realigns them). The published tensor names are
Qwen2's, so loading needs no renaming. Sliding-window attention is not used: the published SDPA
path ignores it too (it only warns), so ``use_sliding_window`` is accepted and has no effect.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from rollout.models.base import BidirectionalLM, PublishedQwenConfig, UnsupportedModelError

# The published DreamConfig's defaults (configuration_dream.py), used when a config.json omits a key.
_DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False,
    sliding_window=4096, max_window_layers=28, attention_dropout=0.0, mask_token_id=151666, pad_token_id=151643,
)


class DreamConfig(PublishedQwenConfig):
    """The published Dream config keys as saved in ``config.json``; :meth:`layer_config` is the
    equivalent :class:`~transformers.Qwen2Config`."""

    model_type = "Dream"
    published_defaults: ClassVar[dict] = _DEFAULTS
    published_auto_map: ClassVar[dict] = {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}

    def layer_config(self) -> Qwen2Config:
        """The :class:`~transformers.Qwen2Config` of these blocks."""
        rope = self.rope()
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedModelError(f"Dream config hidden_size={self.hidden_size} is not a multiple of "
                                        f"num_attention_heads={self.num_attention_heads}")
        return Qwen2Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope, attention_dropout=float(self.attention_dropout or 0.0),
            initializer_range=self.initializer_range, tie_word_embeddings=self.tie_word_embeddings,
            use_sliding_window=False, layer_types=["full_attention"] * self.num_hidden_layers, use_cache=False,
        )


class DreamForMaskedLM(BidirectionalLM):
    """Dream's architecture on Qwen2 decoder layers (shifted logits); loads and saves the published layout."""

    config_class = DreamConfig
    layer_cls, norm_cls, rotary_cls = Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding
    published_architecture = "DreamModel"
    published_names = ()  # Dream's tensor names are Qwen2's

"""LLaDA (Nie et al. 2025) as transformers' Llama blocks with bidirectional attention.

The published code (GSAI-ML/LLaDA-8B-Instruct, OLMo-style, ``block_type: llama``) computes per
block ``x + attn_out(SDPA(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))`` with ``n = attn_norm(x)``
(RMSNorm), then ``x + ff_out(act(ff_proj(m)) * up_proj(m))`` with ``m = ff_norm(x)``; the final
``ln_f`` and ``ff_out`` (or the tied ``wte``) give logits at every position for that position's
token (unshifted). That is a Llama decoder layer with ``is_causal = False``; this module maps the
published config keys and tensor names onto it. Configurations the Llama block cannot express
(ALiBi, non-RMS norms, QK norms, ...) are refused with one line naming the key.

One behavioural difference, on purpose: the published code ignores the attention mask (every
position attends to left padding); ours masks padding, so a padded row gives the logits of the
same row unpadded.
"""

from __future__ import annotations

import logging

from transformers import LlamaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from rollout.models.base import BidirectionalLM, UnsupportedModelError

log = logging.getLogger(__name__)

# The published ModelConfig's defaults (configuration_llada.py), used when a config.json omits a key.
_DEFAULTS = dict(
    d_model=768, n_heads=12, n_kv_heads=None, n_layers=12, mlp_ratio=4, mlp_hidden_size=None,
    activation_type="swiglu", block_type="sequential", block_group_size=1, alibi=False, rope=False,
    rope_theta=10000.0, attention_dropout=0.1, residual_dropout=0.1, embedding_dropout=0.1,
    multi_query_attention=None, attention_layer_norm=False, layer_norm_type="default",
    layer_norm_with_affine=True, bias_for_layer_norm=None, rms_norm_eps=1e-5, include_qkv_bias=False,
    include_bias=False, scale_logits=False, input_emb_norm=False, max_sequence_length=1024,
    vocab_size=50257, embedding_size=50304, weight_tying=True, init_std=0.02,
)
# key -> (allowed values, why); anything else changes the logits in a way the Llama block cannot.
_SUPPORTED = {
    "block_type": (("llama",), "only LLaDA's Llama block (q/k/v/up projections) is implemented"),
    "rope": ((True,), "positions must come from RoPE"),
    "alibi": ((False,), "ALiBi is not implemented"),
    "layer_norm_type": (("rms",), "only RMSNorm is implemented"),
    "layer_norm_with_affine": ((True,), "RMSNorm without a weight is not implemented"),
    "bias_for_layer_norm": ((None, False), "RMSNorm with a bias is not implemented"),
    "attention_layer_norm": ((False,), "QK layer norms are not implemented"),
    "scale_logits": ((False,), "logit scaling is not implemented"),
    "input_emb_norm": ((False,), "input embedding scaling is not implemented"),
    "block_group_size": ((1,), "block groups change tensor names; use block_group_size 1"),
    "activation_type": (("silu", "gelu", "relu"), "the Llama block gates act(ff_proj) * up_proj"),
}


class LLaDAConfig(PretrainedConfig):
    """The published LLaDA config keys (``d_model``, ``n_heads``, ...) as saved in ``config.json``;
    :meth:`layer_config` is the equivalent :class:`~transformers.LlamaConfig`."""

    model_type = "llada"

    def __init__(self, use_cache: bool = False, **kwargs):
        values = {**_DEFAULTS, **kwargs}
        values.setdefault("auto_map", {"AutoConfig": "configuration_llada.LLaDAConfig",
                                       "AutoModel": "modeling_llada.LLaDAModelLM",
                                       "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"})
        super().__init__(use_cache=use_cache, **values)

    # names the rest of transformers (peft, DeepSpeed helpers) looks up
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.weight_tying)

    @property
    def initializer_range(self) -> float:
        return self.init_std

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding and of the LM head (``embedding_size``, padded past ``vocab_size``)."""
        return self.embedding_size or self.vocab_size

    def kv_heads(self) -> int:
        if self.multi_query_attention:
            return 1
        return self.n_kv_heads or self.n_heads

    def check_supported(self) -> None:
        """One :class:`UnsupportedModelError` naming the first key our implementation cannot reproduce."""
        for key, (allowed, why) in _SUPPORTED.items():
            value = getattr(self, key, None)
            if value not in allowed:
                raise UnsupportedModelError(f"LLaDA config {key}={value!r} is not supported ({why}); "
                                            f"supported: {list(allowed)}")
        if self.include_qkv_bias and not self.include_bias:
            raise UnsupportedModelError("LLaDA config include_qkv_bias=True with include_bias=False is not supported "
                                        "(the Llama block biases q/k/v and the output projection together)")
        if self.d_model % self.n_heads:
            raise UnsupportedModelError(f"LLaDA config d_model={self.d_model} is not a multiple of "
                                        f"n_heads={self.n_heads}")
        dropped = {k: getattr(self, k) for k in ("residual_dropout", "embedding_dropout") if getattr(self, k)}
        if dropped:
            log.warning("LLaDA config %s: residual/embedding dropout is not implemented; training runs without it",
                        dropped)

    def layer_config(self) -> LlamaConfig:
        """The :class:`~transformers.LlamaConfig` of these blocks."""
        self.check_supported()
        return LlamaConfig(
            vocab_size=self.embedding_rows, hidden_size=self.d_model,
            intermediate_size=self.mlp_hidden_size or self.mlp_ratio * self.d_model,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads, num_key_value_heads=self.kv_heads(),
            head_dim=self.d_model // self.n_heads, hidden_act=self.activation_type,
            max_position_embeddings=self.max_sequence_length, rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
            attention_bias=bool(self.include_bias), mlp_bias=bool(self.include_bias),
            attention_dropout=float(self.attention_dropout or 0.0), initializer_range=self.init_std,
            tie_word_embeddings=self.tie_word_embeddings, use_cache=False,
        )


class LLaDAForMaskedLM(BidirectionalLM):
    """LLaDA's architecture on Llama decoder layers; loads and saves the published layout."""

    config_class = LLaDAConfig
    layer_cls, norm_cls, rotary_cls = LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
    published_architecture = "LLaDAModelLM"
    published_names = (
        ("model.transformer.wte.", "model.embed_tokens."),
        ("model.transformer.ln_f.", "model.norm."),
        ("model.transformer.ff_out.", "lm_head."),
        ("model.transformer.blocks.{i}.q_proj.", "model.layers.{i}.self_attn.q_proj."),
        ("model.transformer.blocks.{i}.k_proj.", "model.layers.{i}.self_attn.k_proj."),
        ("model.transformer.blocks.{i}.v_proj.", "model.layers.{i}.self_attn.v_proj."),
        ("model.transformer.blocks.{i}.attn_out.", "model.layers.{i}.self_attn.o_proj."),
        ("model.transformer.blocks.{i}.ff_proj.", "model.layers.{i}.mlp.gate_proj."),
        ("model.transformer.blocks.{i}.up_proj.", "model.layers.{i}.mlp.up_proj."),
        ("model.transformer.blocks.{i}.ff_out.", "model.layers.{i}.mlp.down_proj."),
        ("model.transformer.blocks.{i}.attn_norm.", "model.layers.{i}.input_layernorm."),
        ("model.transformer.blocks.{i}.ff_norm.", "model.layers.{i}.post_attention_layernorm."),
    )

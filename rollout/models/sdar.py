"""SDAR / TraDo (block diffusion) as transformers' Qwen3 blocks with block-causal attention.

SDAR (JetAstra/SDAR) and TraDo (Gen-Verse/dLLM-RL) are block-diffusion LMs (Arriola et al. 2025):
Qwen3 decoder blocks (q/k RMSNorm on the head dim, RoPE, SwiGLU) whose attention is *block-causal*:
full inside a block of ``block_length`` positions, causal across blocks, i.e. position ``i``
attends to ``j`` iff ``j // block_length <= i // block_length``. Logits at position ``i`` predict
token ``i`` (unshifted). Finished blocks never change, so their keys/values are cached exactly.

The published ``SDARForCausalLM`` builds no mask itself: it uses the mask its caller gives
(SDAR's sampler passes the block-causal one; a 2D mask only hides padding, and no mask means
bidirectional attention). Ours builds the block-causal mask from the positions when given none or
a 2D padding mask (so a left-padded row equals the same row unpadded), and passes a prepared 4D
mask through in the published convention: bool or 0/1 float, True / > 0 = may attend.

KV cache, as the published ``store_kv`` protocol: with ``past_key_values`` (a transformers
``Cache``), ``store_kv=True`` appends the input's keys/values (prefill, a finished block),
``store_kv=False`` attends to the cached ones plus the input's without storing them (the current
block's denoising steps; :class:`rollout.kv_cache.ReadOnlyCache`). Without ``store_kv`` the cache's
own ``update`` decides (a ``DynamicCache`` appends, the transformers convention). Cached keys are
treated as finished earlier blocks: every query may attend to them (a 2D mask as wide as cache +
input marks cached padding).

The tensor names are Qwen3's, so nothing is renamed. The block length is not in the released
SDAR / TraDo ``config.json`` (SDAR's sampler takes it as an argument; the chat and TraDo models
are trained with blocks of 4); a config's ``block_length`` or ``block_size`` key sets it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from rollout.kv_cache import ReadOnlyCache
from rollout.models.base import BidirectionalLM, BidirectionalTrunk, PublishedQwenConfig, UnsupportedModelError

# Block length of the released SDAR-*-Chat and TraDo models (SDAR's generate.py default).
DEFAULT_BLOCK_LENGTH = 4

# The published SDARConfig's defaults (configuration_sdar.py), used when a config.json omits a key;
# fuse_cross_entropy is read by the published forward but has no default there.
_DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, head_dim=128, hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
    use_sliding_window=False, sliding_window=4096, max_window_layers=28, attention_dropout=0.0,
    fuse_cross_entropy=False,
)


class SDARConfig(PublishedQwenConfig):
    """The published SDAR config keys as saved in ``config.json``, plus ``block_length`` (from a
    ``block_length`` or ``block_size`` key, else :data:`DEFAULT_BLOCK_LENGTH`); :meth:`layer_config`
    is the equivalent :class:`~transformers.Qwen3Config`."""

    model_type = "sdar"
    published_defaults: ClassVar[dict] = _DEFAULTS
    published_auto_map: ClassVar[dict] = {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                          "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"}

    def complete(self, values: dict) -> dict:
        if values.get("block_length") is None:
            values["block_length"] = values.get("block_size") or DEFAULT_BLOCK_LENGTH
        return values

    def layer_config(self) -> Qwen3Config:
        """The :class:`~transformers.Qwen3Config` of these blocks (one line naming a key it cannot express)."""
        if not isinstance(self.block_length, int) or self.block_length < 1:
            raise UnsupportedModelError(f"SDAR config block_length={self.block_length!r}: must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(f"SDAR config num_key_value_heads={self.num_key_value_heads} does not divide "
                                        f"num_attention_heads={self.num_attention_heads}")
        rope = self.rope()
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        return Qwen3Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=head_dim, hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope, attention_bias=bool(self.attention_bias),
            attention_dropout=float(self.attention_dropout or 0.0), initializer_range=self.initializer_range,
            tie_word_embeddings=self.tie_word_embeddings, use_sliding_window=False, sliding_window=None,
            layer_types=["full_attention"] * self.num_hidden_layers, use_cache=False,
        )


def block_causal_allowed(query_blocks: torch.Tensor, key_blocks: torch.Tensor,
                         key_real: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[B, 1, Q, K]``: query ``q`` may attend key ``k`` iff ``key_blocks[k] <= query_blocks[q]``
    and ``k`` is a real token (``key_real [B, K]``; None: all real). ``*_blocks`` are ``[B or 1, .]``
    block indices (``position // block_length``); a cached finished block can be given block -1."""
    allowed = key_blocks[:, None, :] <= query_blocks[:, :, None]
    if key_real is not None:
        allowed = allowed & key_real.bool()[:, None, :]
    return allowed[:, None]


def attention_format(allowed: torch.Tensor, implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """A bool "may attend" mask in the form the attention implementation takes: bool for SDPA,
    additive float (0 / dtype min) for eager and the others."""
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class BlockCausalTrunk(BidirectionalTrunk):
    """:class:`BidirectionalTrunk` with the block-causal mask and SDAR's ``store_kv`` cache protocol."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                store_kv: bool | None = None, **kwargs):
        """As :meth:`BidirectionalTrunk.forward`; ``store_kv`` as in the module docstring."""
        cache = ReadOnlyCache(past_key_values) if past_key_values is not None and store_kv is False else past_key_values
        out = super().forward(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, inputs_embeds=inputs_embeds,
                              output_hidden_states=output_hidden_states)
        out.past_key_values = past_key_values
        return out

    def default_positions(self, x: torch.Tensor, past_key_values=None) -> torch.Tensor:
        """``past .. past + N - 1`` after ``past`` cached positions (the published default)."""
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        return torch.arange(past, past + x.shape[1], device=x.device)[None]

    def attention_mask_for(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                           past_key_values=None) -> torch.Tensor:
        """Block-causal over ``position_ids // block_length``, cached keys visible, padding hidden,
        every query attending at least itself (so no row is empty); a 4D mask in the published
        convention converted to the attention implementation's form."""
        impl = getattr(self.config, "_attn_implementation", None)
        if attention_mask is not None and attention_mask.dim() == 4:
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask > 0
            return attention_format(allowed, impl, x.dtype)
        B, N = x.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        q_blocks = torch.div(position_ids, self.config.block_length, rounding_mode="floor")
        k_blocks = torch.cat([q_blocks.new_full((q_blocks.shape[0], past), -1), q_blocks], dim=1)
        real = None
        if attention_mask is not None:
            real = attention_mask.bool()
            if real.shape[1] == N and past:
                real = torch.cat([real.new_ones(B, past), real], dim=1)
            if real.shape[1] != past + N:
                raise ValueError(f"attention_mask: width {attention_mask.shape[1]} is neither the input's ({N}) nor "
                                 f"cache + input ({past} + {N})")
        allowed = block_causal_allowed(q_blocks, k_blocks, real)
        diagonal = torch.zeros(N, past + N, dtype=torch.bool, device=x.device)
        diagonal[:, past:] = torch.eye(N, dtype=torch.bool, device=x.device)
        return attention_format(allowed | diagonal, impl, x.dtype)


class SDARForMaskedLM(BidirectionalLM):
    """SDAR / TraDo on Qwen3 decoder layers with block-causal attention (unshifted logits); loads
    and saves the published layout. ``block_causal``: decoded block by block with the exact KV
    cache of finished blocks (:mod:`rollout.block_sampler`)."""

    config_class = SDARConfig
    layer_cls, norm_cls, rotary_cls = Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding
    trunk_cls = BlockCausalTrunk
    published_architecture = "SDARForCausalLM"
    published_names = ()  # SDAR's tensor names are Qwen3's
    block_causal = True
    # flash / flex attention cannot take the block-causal mask: SDPA or eager only
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    @property
    def block_length(self) -> int:
        return int(self.config.block_length)

"""Block KV caching for the denoising sampler (Fast-dLLM, Wu et al. 2025, "prefix" and "dual" cache).

With bidirectional attention every key/value depends on every token, so nothing is exactly
reusable once a token changes. The block cache reuses keys/values that change *slowly*:

- at each block start one full forward runs (its logits are the block's first step, exactly the
  baseline's) and records every layer's keys/values for the whole sequence;
- later steps of the block run only the query window and overwrite that window's slice of the
  recorded keys/values; the other positions keep the block-start values:
  ``prefix``: window = current block + everything after it (prompt and earlier blocks frozen);
  ``dual``:   window = current block only (prefix *and* masked suffix frozen);
  ``dual`` with ``cache_lookahead=L``: window = current block + the next ``L`` positions (the
  near suffix, whose masked positions condition the block most, stays fresh; L >= the rest of
  the completion is the prefix cache).

The order of keys does not matter to bidirectional attention, and positions (RoPE, or BERT's
absolute embeddings) are applied before keys are cached, so the window is run with its true
``position_ids``. Exactness: the result equals the uncached sampler when frozen keys/values
cannot change within a block, e.g. a 1-layer model (layer-0 keys depend only on each token, and
frozen tokens do not change), or one step per block; for deeper models both caches are
approximations (see docs/models.md).

Supported: HF models whose attention calls ``past_key_values.update(k, v, layer_idx)`` on a
transformers ``Cache`` passed through ``forward(..., past_key_values=, position_ids=)`` and
whose mask builder passes a prepared 4D mask through: the built-in tiny model in both
architectures (EuroBERT; BERT with transformers >= 5) and our LLaDA and Dream
(:mod:`rollout.models`). For a shifted model (Dream: position i predicts token i + 1) the query
window starts one position before the block, so every block position gets its logits.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _WindowLayer(DynamicLayer):
    """One layer's keys/values for the whole sequence.

    Empty: ``update`` records the full-sequence keys/values (block-start forward).
    Filled: ``update`` writes the window's fresh keys/values into ``[start, start+len)`` and
    returns the whole buffer (no concatenation, so no copy of the frozen part)."""

    def __init__(self):
        super().__init__()
        self.start = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.keys, self.values = key_states, value_states
            self.is_initialized = True
            return self.keys, self.values
        end = self.start + key_states.shape[-2]
        self.keys[..., self.start:end, :] = key_states
        self.values[..., self.start:end, :] = value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.start


class BlockKVCache(Cache):
    """A transformers ``Cache`` holding full-sequence keys/values with a rewritable window."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=_WindowLayer)

    def set_window(self, start: int) -> None:
        """Subsequent forwards query positions ``start, start+1, ...``."""
        for layer in self.layers:
            layer.start = start


def window_mask(full_mask: torch.Tensor | None, q_start: int, q_end: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive 4D mask ``[B, 1, q, N]`` letting the window ``[q_start, q_end)`` attend to all real
    keys (``full_mask`` is the 2D ``[B, N]`` padding mask; None means no padding).

    Additive float works for both the eager and the SDPA attention paths."""
    if full_mask is None:
        return None
    keep = full_mask[:, None, None, :].bool().expand(-1, 1, q_end - q_start, -1)
    return torch.zeros(keep.shape, dtype=dtype, device=full_mask.device).masked_fill(~keep, torch.finfo(dtype).min)


class ReadOnlyCache(Cache):
    """A view of ``cache`` whose ``update`` attends to the stored keys/values plus the new ones
    without storing them: SDAR's ``store_kv=False`` (block diffusion, Arriola et al. 2025; the
    published ``SDARAttention``), where the finished blocks' keys are cached exactly and the
    current block's denoising steps only read them. Shares ``cache``'s layers (nothing copied)."""

    def __init__(self, cache: Cache):
        super().__init__(layers=cache.layers)
        self.cache = cache

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx < len(self.layers):
            layer = self.layers[layer_idx]
            if layer.is_initialized and layer.keys is not None and layer.keys.numel():
                return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))
        return key_states, value_states


class _ColumnsLayer(DynamicLayer):
    """One layer's keys/values in a buffer of ``capacity`` columns: ``update`` writes the input's
    keys/values at ``[start, start + n)`` and returns columns ``[0, start + n)`` (no concatenation)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.start = capacity, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            shape = (*key_states.shape[:-2], self.capacity, key_states.shape[-1])
            self.keys = key_states.new_zeros(shape)
            self.values = value_states.new_zeros((*shape[:-1], value_states.shape[-1]))
            self.is_initialized = True
        end = self.start + key_states.shape[-2]
        self.keys[..., self.start:end, :] = key_states
        self.values[..., self.start:end, :] = value_states
        return self.keys[..., :end, :], self.values[..., :end, :]

    def get_seq_length(self) -> int:
        return self.start


class FinishedBlocksCache(Cache):
    """The exact cache of block diffusion (SDAR, Arriola et al. 2025; :mod:`rollout.block_sampler`):
    columns ``[0, start)`` hold the keys/values of finished blocks; a forward on columns
    ``[start, end)`` attends to them plus its own and writes its own at ``[start, end)``. A
    block's denoising steps rewrite the same window; the next block's first step starts at the
    finished block (recomputed once with its final tokens), which is how it gets stored."""

    def __init__(self, capacity: int):
        super().__init__(layers=[])
        self.capacity, self.start = capacity, 0

    def set_window(self, start: int) -> None:
        """Subsequent forwards cover columns ``start, start + 1, ...`` (everything before is final)."""
        self.start = start
        for layer in self.layers:
            layer.start = start

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:  # one buffer per layer, created on first use
            self.layers.append(_ColumnsLayer(self.capacity))
            self.layers[-1].start = self.start
        return self.layers[layer_idx].update(key_states, value_states)

"""The policy's weights as a rollout engine reads them: the whole model gathered for a rollout
phase (torch backend), or streamed tensor by tensor (an engine with its own copy, e.g. vLLM).

Both work on a DeepSpeed engine of any ZeRO stage or on a plain module. Under ZeRO-3 each rank
holds a shard of every parameter: :func:`gathered_for_generation` all-gathers the model once for a
phase of many forwards; :func:`hf_weights` gathers one parameter at a time, so a weight sync never
holds more than one full tensor beyond the shards. LoRA (peft) updates are merged on the fly:
``W' = W + scaling * B @ A`` (Hu et al. 2021, Eq. 3), the live model untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def is_zero3(engine) -> bool:
    """Whether ``engine`` is a DeepSpeed engine that partitions its parameters (ZeRO-3)."""
    return hasattr(engine, "zero_optimization_partition_weights") and bool(engine.zero_optimization_partition_weights())


def _unwrap(engine) -> nn.Module:
    module = getattr(engine, "module", None)
    return module if hasattr(engine, "zero_optimization_stage") and isinstance(module, nn.Module) else engine


def _zero3_offload(engine):
    """The object that owns the ZeRO-3 parameter-fetch hooks of ``engine``."""
    opt = engine.optimizer
    return getattr(opt, "parameter_offload", opt)


@contextmanager
def gathered_for_generation(engine) -> Iterator[nn.Module]:
    """Yield the module to call for a whole rollout phase.

    Under ZeRO-3 all parameters are all-gathered once on entry (``GatheredParameters``,
    ``modifier_rank=None``: read-only) and the per-module fetch/release hooks are detached,
    so the many sampler forwards inside the block run on full local weights without any
    communication; on exit the hooks are re-attached and the gathered copies freed. Other
    stages yield ``engine.module`` unchanged. Re-entrant: a nested call (an evaluation that
    generates through a rollout engine) yields the already-gathered module. Call the yielded
    module under ``torch.no_grad``.
    """
    module = _unwrap(engine)
    if not is_zero3(engine) or getattr(engine, "_rollout_gathered", False):
        yield module
        return
    import deepspeed

    # Why not DeepSpeed's public GatheredParameters alone: ZeRO-3's per-module hooks stay attached
    # inside it, and its post-forward release re-partitions every AVAILABLE parameter whose module
    # is done unless the parameter coordinator keeps it live (stage3_max_live_parameters /
    # max_reuse_distance: 1e9 in configs/deepspeed/zero3.json, less than LLaDA-8B's 8e9); each of
    # a rollout's hundreds of forwards would then all-gather every layer again. DeepSpeed 0.19 has
    # no public switch for the hooks, so they are detached here and re-registered on exit, as TRL's
    # ``unwrap_model_for_generation`` does (the same private attributes: ``forward_hooks``,
    # ``backward_hooks``, ``_register_deepspeed_module``; pyproject.toml pins deepspeed < 0.20).
    # tests/test_distributed_engine.py counts 0 all-gathers in this context on 2 ranks.
    offload = _zero3_offload(engine)
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        for h in offload.forward_hooks + offload.backward_hooks:
            h.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        engine._rollout_gathered = True
        try:
            yield module
        finally:
            engine._rollout_gathered = False
            offload._register_deepspeed_module(offload.module)


def _full(params: list[nn.Parameter], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` on the full ``params``: ZeRO-3 shards are gathered for the call and the result
    copied out (the gathered buffers are freed on exit); plain parameters are read in place."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        with torch.no_grad():
            return compute()
    import deepspeed

    with torch.no_grad(), deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return compute().clone()


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_lora_weight(layer: nn.Module, adapter: str, weight: torch.Tensor, a: torch.Tensor,
                       b: torch.Tensor) -> torch.Tensor:
    """``W + scaling * B @ A`` of one peft LoRA linear layer (in float32, returned in W's dtype)."""
    if getattr(layer, "use_dora", {}).get(adapter, False) or not isinstance(layer.lora_A[adapter], nn.Linear):
        raise NotImplementedError(f"LoRA layer {type(layer).__name__} (DoRA or non-Linear) cannot be merged")
    delta = (b.float() @ a.float()) * layer.scaling[adapter]
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return (weight.float() + delta).to(weight.dtype)


def hf_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every parameter of ``model`` (an HF model, or a peft model
    around one), in the base HF model's state-dict names, LoRA merged, one ZeRO-3 gather at a
    time (each yielded tensor is then a copy that the caller owns; otherwise the parameter
    itself, detached). Tied parameters appear once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora = _lora_layers(base)
    adapter = getattr(model, "active_adapter", None)
    seen: set[int] = set()
    for mod_name, module in base.named_modules():
        if any(mod_name.startswith(f"{n}.") for n in lora):
            continue  # inside a LoRA layer: its base layer's weights come merged below
        prefix = f"{mod_name}." if mod_name else ""
        if mod_name in lora:
            inner = module.base_layer
            if adapter in module.lora_A:
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                yield f"{prefix}weight", _full([inner.weight, a, b],
                                               lambda: merged_lora_weight(module, adapter, inner.weight, a, b))
            else:
                yield f"{prefix}weight", _full([inner.weight], inner.weight.detach)
            if getattr(inner, "bias", None) is not None:
                yield f"{prefix}bias", _full([inner.bias], inner.bias.detach)
            continue
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield f"{prefix}{name}", _full([p], p.detach)

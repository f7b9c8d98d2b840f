"""The rollout engine: the one way trainers and evaluation generate.

Built once from the rollout options (``rl.config.RolloutOptions``: the sampler's arguments, the
``backend`` and its settings) and attached to the policy being trained; then

    rollout = engine.generate(prompts)            # texts / chat messages, or ids + attention_mask
    seconds = engine.update_weights()             # after an optimizer step (None: nothing to sync)
    engine.sleep()                                # a generation phase ended (vLLM's sleep mode)

Backends (``options.backend``):

- ``torch``: :func:`rollout.sampler.generate` on the policy itself, in process. Under ZeRO-3 the
  whole model is gathered once per call (:func:`rollout.weights.gathered_for_generation`). Its
  weights are the training weights, so ``update_weights`` has nothing to do. A block-diffusion
  policy (SDAR / TraDo) is decoded block by block with the exact cache of finished blocks
  (:mod:`rollout.block_sampler`); the call and the ``Rollout`` are the same.
- ``vllm``: the same denoising loop; every forward is one vLLM call on the batch
  (:mod:`rollout.vllm_backend`). The engine holds its own copy of the weights, refreshed by
  ``update_weights`` tensor by tensor; bidirectional models only (a block-diffusion model is
  refused in one line, :func:`rollout.vllm_backend.engine.check_not_block_causal`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rollout.adapter import unwrap_model
from rollout.prompts import encode_prompt, left_pad
from rollout.sampler import OrderPolicy, generate
from rollout.types import Rollout
from rollout.weights import gathered_for_generation

# The fields of the options object that are the sampler's keyword arguments (rollout.generate).
SAMPLER_OPTIONS = ("gen_length", "block_length", "steps", "temperature", "cfg_scale", "remasking", "threshold",
                   "early_commit", "fill_after_eos", "kv_cache", "cache_lookahead")
BACKENDS = ("torch", "vllm")


def sampler_kwargs(options: Any) -> dict:
    """``{name: value}`` of the sampler's options in ``options`` (a ``RolloutOptions``)."""
    return {name: getattr(options, name) for name in SAMPLER_OPTIONS}


class RolloutEngine:
    """Generates with the attached policy (the torch backend; see the module docstring).

    ``options``: a ``RolloutOptions`` (any object with the :data:`SAMPLER_OPTIONS` fields and
    ``backend``); a call may pass other ``options`` (eval modes, another temperature).
    ``model``: a ``PolicyAdapter``, or a DeepSpeed engine / module around one, with ``adapter``
    picking the adapter out of the (gathered) module (e.g. an order policy's ``.dllm``)."""

    backend = "torch"

    def __init__(self, options: Any, model: nn.Module | None = None, *,
                 adapter: Callable[[nn.Module], nn.Module] | None = None):
        self.options = options
        self.model: nn.Module | None = None
        self._adapter: Callable[[nn.Module], nn.Module] = lambda m: m
        if model is not None:
            self.attach(model, adapter=adapter)

    def attach(self, model: nn.Module, *, adapter: Callable[[nn.Module], nn.Module] | None = None) -> None:
        """Serve ``model`` from now on (a trainer attaches its DeepSpeed engine)."""
        self.model, self._adapter = model, adapter or (lambda m: m)

    @property
    def adapter(self) -> nn.Module:
        """The policy adapter (ids, tokenizer); its parameters may be ZeRO-3 shards."""
        self._check_attached()
        return self._adapter(unwrap_model(self.model))

    def _check_attached(self) -> None:
        if self.model is None:
            raise RuntimeError("rollout engine: no policy attached (call engine.attach(model) first)")

    # ---- generation -----------------------------------------------------------------------------
    def encode(self, prompts: Sequence, options: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask of text / chat prompts (the adapter's tokenizer, chat template;
        ``options.prompt_special_tokens``: see :func:`rollout.prompts.encode_prompt`)."""
        tok = self.adapter.tokenizer
        if tok is None:
            raise ValueError("rollout engine: text prompts need the policy's tokenizer; pass ids instead")
        special = bool(getattr(options if options is not None else self.options, "prompt_special_tokens", False))
        return left_pad([encode_prompt(tok, p, add_special_tokens=special) for p in prompts], tok.pad_token_id)

    def generate(self, prompts: Sequence | torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 options: Any = None, generator: torch.Generator | None = None,
                 order_policy: OrderPolicy | None = None, record_scores: bool = False) -> Rollout:
        """Completions of ``prompts``: texts / chat messages, or left-padded ids ``[B, P]`` with
        ``attention_mask``. ``options`` (default: the engine's) sets the sampler's arguments;
        ``order_policy`` / ``record_scores`` as in :func:`rollout.generate`."""
        self._check_attached()
        options = options if options is not None else self.options
        if not isinstance(prompts, torch.Tensor):
            prompts, attention_mask = self.encode(prompts, options)
        adapter = self.adapter
        device = next(adapter.parameters()).device
        ids = prompts.to(device)
        mask = attention_mask.to(device) if attention_mask is not None else None
        return self._generate(ids, mask, options, generator=generator, order_policy=order_policy,
                              record_scores=record_scores)

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor | None, options: Any, *,
                  generator: torch.Generator | None, order_policy: OrderPolicy | None,
                  record_scores: bool) -> Rollout:
        with gathered_for_generation(self.model) as module:
            adapter = self._adapter(module)
            return generate(adapter, ids, attention_mask=mask, mask_id=adapter.mask_token_id,
                            eos_id=adapter.eos_token_id, generator=generator, order_policy=order_policy,
                            record_scores=record_scores, **sampler_kwargs(options))

    # ---- weights ----------------------------------------------------------------------------------
    def update_weights(self) -> float | None:
        """Serve the attached model's current weights; seconds taken, or None when the backend
        generates with the training weights themselves (torch)."""
        return None

    def sleep(self) -> None:
        """End of a generation phase: a backend with its own memory may hand it back to training
        until the next :meth:`generate` (vLLM's sleep mode, ``rollout.vllm.sleep``); no-op here."""

    def close(self) -> None:
        """Release what the backend holds and forget the attached model (so a closed engine keeps
        no trainer alive)."""
        self.model = None

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_rollout_engine(options: Any, model: nn.Module | None = None, *,
                         adapter: Callable[[nn.Module], nn.Module] | None = None) -> RolloutEngine:
    """The engine of ``options.backend`` (``torch`` when the options name none)."""
    backend = getattr(options, "backend", "torch")
    if backend == "torch":
        return RolloutEngine(options, model, adapter=adapter)
    if backend == "vllm":
        from rollout.vllm_backend.engine import VLLMEngine

        return VLLMEngine(options, model, adapter=adapter)
    raise ValueError(f"rollout backend={backend!r}: expected one of {BACKENDS}")


@contextmanager
def engine_for(policy: nn.Module | RolloutEngine, options: Any) -> Iterator[RolloutEngine]:
    """``policy`` itself when it is an engine (left open), else an engine of ``options.backend``
    around it, closed on exit."""
    if isinstance(policy, RolloutEngine):
        yield policy
        return
    engine = build_rollout_engine(options, policy)
    try:
        yield engine
    finally:
        engine.close()


"""Rollouts: the policy adapter, the rollout engine (torch and vLLM backends), the denoising sampler and
its fast modes, the tiny model."""

from rollout.adapter import KNOWN_MODELS, PolicyAdapter, build_tiny_policy, kv_cache_support
from rollout.engine import RolloutEngine, build_rollout_engine
from rollout.sampler import StepState, generate
from rollout.types import Rollout, completion_mask_from_eos

__all__ = [
    "KNOWN_MODELS", "PolicyAdapter", "Rollout", "RolloutEngine", "StepState", "build_rollout_engine",
    "build_tiny_policy", "completion_mask_from_eos", "generate", "kv_cache_support",
]

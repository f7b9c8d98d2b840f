"""The ``vllm`` rollout backend: our denoising loop, every forward one vLLM call on the batch.

vLLM serves the policy as a bidirectional *pooling* model (:mod:`rollout.vllm_backend.models`);
each call returns, per scored position, the proposal (Gumbel-max at the temperature, float64
noise) and the remasking statistics, never logits. :class:`rollout.vllm_backend.engine.VLLMEngine`
is the engine. Importing this package does not import vLLM.
"""

from __future__ import annotations

import os

# In process, quiet: vLLM's info lines and its warnings about options we set on purpose (no
# tokenizer, torch's threads) would drown the trainer's output. Set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

# our architecture name -> "module:class" (vLLM imports it lazily)
MODEL_CLASSES = {
    "DllmRlBert": "rollout.vllm_backend.models:BertDLLM",
    "DllmRlLlama": "rollout.vllm_backend.models:LlamaDLLM",
    "DllmRlQwen2": "rollout.vllm_backend.models:QwenDLLM",
}


def register() -> None:
    """Make LLaDA's and Dream's configs known to transformers (our classes: no remote code) and
    our model classes to vLLM. Idempotent; also the ``vllm.general_plugins`` entry point, so
    vLLM processes started by vLLM itself register them too."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from rollout.models import DreamConfig, LLaDAConfig

    for config in (LLaDAConfig, DreamConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    for arch, target in MODEL_CLASSES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)

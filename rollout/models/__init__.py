"""Our implementations of published dLLM architectures, selected by ``config.json``'s ``model_type``.

``model_type`` (case-insensitive) -> class; a checkpoint of one of these families loads here with
no remote code, whatever ``trust_remote_code`` says (see :mod:`rollout.models.base`).
"""

from __future__ import annotations

from rollout.models.base import BidirectionalLM, UnsupportedModelError, read_config_dict
from rollout.models.dream import DreamConfig, DreamForMaskedLM
from rollout.models.llada import LLaDAConfig, LLaDAForMaskedLM
from rollout.models.sdar import SDARConfig, SDARForMaskedLM

ARCHITECTURES: dict[str, type[BidirectionalLM]] = {"llada": LLaDAForMaskedLM, "dream": DreamForMaskedLM,
                                                   "sdar": SDARForMaskedLM}


def native_class(model_type: str | None) -> type[BidirectionalLM] | None:
    """Our class for a published ``model_type`` (None if we have none)."""
    return ARCHITECTURES.get(str(model_type or "").lower())


def load_model_config(name_or_path, *, trust_remote_code: bool = False):
    """``(config, our class or None)`` of a checkpoint, without its weights: our config class for
    LLaDA / Dream / SDAR (one :class:`UnsupportedModelError` naming what our implementation cannot
    reproduce), else transformers' ``AutoConfig``."""
    from transformers import AutoConfig

    native = native_class(read_config_dict(name_or_path).get("model_type"))
    if native is None:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code), None
    config = native.config_class.from_pretrained(name_or_path)
    config.layer_config()
    return config, native


def is_block_causal(name_or_path) -> bool:
    """Whether a checkpoint is a block-diffusion model (SDAR / TraDo: block-causal attention), by its
    ``config.json`` alone."""
    native = native_class(read_config_dict(name_or_path).get("model_type"))
    return bool(getattr(native, "block_causal", False))


__all__ = ["ARCHITECTURES", "BidirectionalLM", "DreamConfig", "DreamForMaskedLM", "LLaDAConfig",
           "LLaDAForMaskedLM", "SDARConfig", "SDARForMaskedLM", "UnsupportedModelError", "is_block_causal",
           "load_model_config", "native_class", "read_config_dict"]

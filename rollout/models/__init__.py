"""Our implementations of published dLLM architectures, selected by ``config.json``'s ``model_type``.

``model_type`` (case-insensitive) -> class; a checkpoint of one of these families loads here with
no remote code, whatever ``trust_remote_code`` says (see :mod:`rollout.models.base`).
"""

from __future__ import annotations

from rollout.models.base import BidirectionalLM, read_config_dict
from rollout.models.dream import DreamConfig, DreamForMaskedLM
from rollout.models.llada import LLaDAConfig, LLaDAForMaskedLM

ARCHITECTURES: dict[str, type[BidirectionalLM]] = {"llada": LLaDAForMaskedLM, "dream": DreamForMaskedLM}


def native_class(model_type: str | None) -> type[BidirectionalLM] | None:
    """Our class for a published ``model_type`` (None if we have none)."""
    return ARCHITECTURES.get(str(model_type or "").lower())


__all__ = ["ARCHITECTURES", "BidirectionalLM", "DreamConfig", "DreamForMaskedLM", "LLaDAConfig",
           "LLaDAForMaskedLM", "native_class", "read_config_dict"]

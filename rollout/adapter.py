"""The policy adapter: one face for every masked-diffusion LM the sampler and trainers drive.

It wraps an HF model (+ optional tokenizer) and knows the mask / EOS / pad ids and whether the
model's logits are *shifted* (Dream is initialised from an AR model, so its logits at position i
predict token i+1). ``forward`` always returns logits aligned so ``logits[:, i]`` predicts token
``i``; for shifted models it realigns them as Dream's reference sampler does:
``logits = cat([logits[:, :1], logits[:, :-1]], 1)`` (position 0 keeps its own logits; it is
always a prompt token and never scored).

The adapter is an ``nn.Module`` so that trainers can wrap it in a DeepSpeed engine and call the
engine like the model. Published LLaDA / Dream folders load into our own implementations of those
architectures (:mod:`rollout.models`); other models through transformers' Auto classes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils import ModelOutput


@dataclass
class PolicyOutput(ModelOutput):
    """``logits [B, T or n, V]``; ``hidden_states`` when asked; ``token_logps [B, n]`` (float32,
    0 where not scored) instead of logits when ``score_targets`` is given, with ``token_entropy``
    (the entropy of ``softmax(logits / T)``) and ``token_correct`` (1.0 where the argmax is the
    target; no gradient) when ``entropy_temperature = T`` is given too."""

    logits: torch.Tensor | None = None
    hidden_states: tuple | None = None
    token_logps: torch.Tensor | None = None
    token_entropy: torch.Tensor | None = None
    token_correct: torch.Tensor | None = None


@dataclass(frozen=True)
class KnownModel:
    """Defaults for a model family, keyed by ``config.model_type``."""

    mask_token_id: int | None  # None: take it from the config / tokenizer
    logits_shifted: bool


# model_type -> defaults. LLaDA: GSAI-ML/LLaDA-8B-Instruct; Dream: Dream-org/Dream-v0-Instruct-7B;
# SDAR / TraDo (JetLM/SDAR-*-Chat, Gen-Verse/TraDo-*): Qwen3's vocabulary with `<|MASK|>` = 151669
# (not in their config.json), block-causal attention, unshifted logits.
KNOWN_MODELS: dict[str, KnownModel] = {
    "llada": KnownModel(mask_token_id=126336, logits_shifted=False),
    "dream": KnownModel(mask_token_id=151666, logits_shifted=True),
    "sdar": KnownModel(mask_token_id=151669, logits_shifted=False),
}

# Masked-LM classes whose logits are exactly ``lm_head(trunk(x).last_hidden_state)``: (trunk, head)
# attribute names. Fused scoring needs this split.
_HEAD_ON_TRUNK = {"EuroBertForMaskedLM": ("model", "lm_head"), "BertForMaskedLM": ("bert", "cls"),
                  "LLaDAForMaskedLM": ("model", "lm_head"), "DreamForMaskedLM": ("model", "lm_head"),
                  "SDARForMaskedLM": ("model", "lm_head")}
# Classes verified with the sampler's block KV cache: forward appends to a transformers Cache given
# as ``past_key_values``, takes ``position_ids`` and passes a prepared 4D mask through. BERT's
# self-attention writes to a given Cache in encoder mode too since transformers 5 (4.x BertForMaskedLM
# takes no ``past_key_values``); absolute position embeddings come from ``position_ids``. Block-causal
# models (SDAR) are not listed: they always decode with the exact cache of finished blocks
# (rollout.block_sampler), never with this bidirectional approximation.
_CACHE_CLASSES = ("EuroBertForMaskedLM", "LLaDAForMaskedLM", "DreamForMaskedLM") + (
    ("BertForMaskedLM",) if int(transformers.__version__.split(".")[0]) >= 5 else ())


def known_model(config) -> KnownModel | None:
    """The :data:`KNOWN_MODELS` entry for ``config`` (by ``model_type``, case-insensitive)."""
    model_type = str(getattr(config, "model_type", "") or "").lower()
    return KNOWN_MODELS.get(model_type)


def resolve_model_ids(config, tokenizer=None, *, name: str = "model", mask_token_id: int | None = None,
                      logits_shifted: bool | None = None) -> tuple[int, bool]:
    """Mask id: explicit argument > ``config.mask_token_id`` > known family > tokenizer; logit shift:
    explicit argument > known family > unshifted.

    Raises one ``ValueError`` naming the model when no mask id can be found."""
    known = known_model(config)
    if mask_token_id is None:
        mask_token_id = getattr(config, "mask_token_id", None)
    if mask_token_id is None and known is not None:
        mask_token_id = known.mask_token_id
    if mask_token_id is None and tokenizer is not None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError(
            f"{name}: cannot tell its mask token id (model_type={getattr(config, 'model_type', None)!r} is not a "
            f"known dLLM, its config has no `mask_token_id` and its tokenizer no mask token); pass "
            f"mask_token_id=... explicitly")
    if logits_shifted is None:
        logits_shifted = known.logits_shifted if known is not None else False
    return int(mask_token_id), bool(logits_shifted)


def _first_not_none(*values):
    return next((v for v in values if v is not None), None)


class PolicyAdapter(nn.Module):
    """An HF masked-token predictor + its ids, with logits always aligned to their own position.

    Attributes: ``model``, ``tokenizer`` (may be None), ``mask_token_id``, ``eos_token_id``,
    ``pad_token_id``, ``logits_shifted``, ``supports_kv_cache``; properties ``dtype``, ``device``,
    ``block_causal`` and ``model_block_length`` (block-diffusion models: how the sampler decodes).
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, mask_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 logits_shifted: bool | None = None, name: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        config = getattr(model, "config", SimpleNamespace())
        name = name or getattr(config, "_name_or_path", None) or type(model).__name__
        self.mask_token_id, self.logits_shifted = resolve_model_ids(
            config, tokenizer, name=name, mask_token_id=mask_token_id, logits_shifted=logits_shifted)
        tok = tokenizer if tokenizer is not None else SimpleNamespace()
        self.eos_token_id = _first_not_none(eos_token_id, getattr(tok, "eos_token_id", None),
                                            getattr(config, "eos_token_id", None))
        self.pad_token_id = _first_not_none(pad_token_id, getattr(tok, "pad_token_id", None),
                                            getattr(config, "pad_token_id", None), self.eos_token_id)
        self._takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        # Block KV caching needs a forward that appends to a transformers Cache (see _CACHE_CLASSES).
        self.supports_kv_cache = type(_base_model(model)).__name__ in _CACHE_CLASSES

    # ----------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self):
        return getattr(self.model, "config", None)

    @property
    def block_causal(self) -> bool:
        """Whether the model attends block-causally (block diffusion: SDAR / TraDo). Such a model is
        decoded block by block with the exact KV cache of finished blocks (:mod:`rollout.block_sampler`);
        :class:`rollout.RolloutEngine` picks that decoder from this property."""
        return bool(getattr(_base_model(self.model), "block_causal", False))

    @property
    def model_block_length(self) -> int | None:
        """The block length of a block-causal model (``config.block_length``); None otherwise."""
        return int(self.config.block_length) if self.block_causal else None

    @property
    def fused_scoring(self) -> bool:
        """Whether ``forward(..., score_targets=...)`` is available (LM head split from the trunk)."""
        return _split_head(self.model) is not None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, logits_to_keep: int = 0,
                score_targets: torch.Tensor | None = None, entropy_temperature: float | None = None,
                **kw) -> PolicyOutput:
        """Run the model; ``.logits[:, i]`` predicts token ``i`` (realigned for shifted models);
        ``.hidden_states`` (tuple, realigned the same way) when ``output_hidden_states``.

        ``logits_to_keep = n > 0``: only the logits of the last ``n`` positions (a completion),
        with the LM head applied only there when the model allows it (see :func:`_split_head`);
        otherwise the full logits are sliced.

        ``score_targets [B, n]`` (with ``logits_to_keep = n``; -1 = not scored; needs
        :attr:`fused_scoring`): return ``token_logps`` = log p(target) at the scored positions
        instead of logits. The head runs only on scored positions, in chunks whose logits are
        recomputed in the backward pass, so no ``[B, n, V]`` tensor ever exists. With
        ``entropy_temperature`` the same chunks also give ``token_entropy`` and ``token_correct``
        (certainty forcing, :func:`rl.losses.certainty_forcing_loss`)."""
        if output_hidden_states:
            kw["output_hidden_states"] = True
        if attention_mask is not None and "position_ids" not in kw and self._takes_position_ids:
            # positions count real tokens only: left padding shifts nothing (absolute embeddings)
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        raw_keep = logits_to_keep + 1 if (logits_to_keep and self.logits_shifted) else logits_to_keep
        split = _split_head(self.model) if raw_keep and not output_hidden_states else None
        if score_targets is not None:
            if split is None or score_targets.shape[1] != logits_to_keep:
                raise ValueError("score_targets needs fused_scoring and score_targets.shape[1] == logits_to_keep")
            trunk, head = split
            h = trunk(input_ids, attention_mask=attention_mask, **kw).last_hidden_state
            # shifted models predict token i from position i - 1
            h = h[:, -logits_to_keep - 1:-1] if self.logits_shifted else h[:, -logits_to_keep:]
            if entropy_temperature is None:
                return PolicyOutput(token_logps=_scored_logprobs(head, h, score_targets))
            logp, ent, correct = _scored_logprobs(head, h, score_targets, entropy_temperature=entropy_temperature)
            return PolicyOutput(token_logps=logp, token_entropy=ent, token_correct=correct)
        if split is not None:
            trunk, head = split
            h = trunk(input_ids, attention_mask=attention_mask, **kw).last_hidden_state
            out = MaskedLMOutput(logits=head(h[:, -raw_keep:]))
        else:
            out = self.model(input_ids, attention_mask=attention_mask, **kw)
        logits = out.logits
        hidden = getattr(out, "hidden_states", None) if output_hidden_states else None
        if self.logits_shifted:
            logits = _unshift(logits)
            if hidden is not None:
                hidden = tuple(_unshift(h) for h in hidden)
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return PolicyOutput(logits=logits, hidden_states=hidden)

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, mask_token_id: int | None = None,
                        logits_shifted: bool | None = None, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, trust_remote_code: bool = True,
                        **model_kwargs) -> "PolicyAdapter":
        """Load model + tokenizer by hub name or local path.

        A published LLaDA, Dream or SDAR folder (``model_type`` ``llada`` / ``Dream`` / ``sdar``) loads into our
        implementation of its architecture (:mod:`rollout.models`; no remote code runs for the
        model, ``trust_remote_code`` then only concerns the tokenizer). Anything else: transformers'
        ``AutoModelForMaskedLM``, falling back to ``AutoModel``. Known families fill the mask id
        and logit shift."""
        from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

        from rollout.models import load_model_config

        config, native = load_model_config(name_or_path, trust_remote_code=trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, config=config, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            tokenizer = None
        # Fail on the ids before loading (possibly billions of) weights.
        resolve_model_ids(config, tokenizer, name=str(name_or_path), mask_token_id=mask_token_id,
                          logits_shifted=logits_shifted)
        kw = dict(config=config, **model_kwargs)
        if dtype is not None:
            kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if native is not None:
            model = native.from_pretrained(name_or_path, **kw)
        else:
            kw["trust_remote_code"] = trust_remote_code
            try:
                model = AutoModelForMaskedLM.from_pretrained(name_or_path, **kw)
            except ValueError:  # "Unrecognized configuration class ... for AutoModelForMaskedLM"
                model = AutoModel.from_pretrained(name_or_path, **kw)
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, mask_token_id=mask_token_id, logits_shifted=logits_shifted,
                   name=str(name_or_path))

    def save_pretrained(self, path) -> None:
        """Save model (and tokenizer, if any) so :meth:`from_pretrained` can load them back."""
        self.model.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)


def _unshift(t: torch.Tensor) -> torch.Tensor:
    """``t[:, i]`` predicts token ``i+1`` -> ``out[:, i]`` predicts token ``i`` (Dream's realignment)."""
    return torch.cat([t[:, :1], t[:, :-1]], dim=1)


def _base_model(model: nn.Module) -> nn.Module:
    """The model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _split_head(model: nn.Module):
    """``(trunk, head)`` for models whose LM head is applied directly to the trunk's last hidden
    state (peft wrappers looked through), so scoring a completion needs the head only on its
    positions; None for others (remote code: full logits, then a slice)."""
    base = _base_model(model)
    names = _HEAD_ON_TRUNK.get(type(base).__name__)
    if names is None:
        return None
    return getattr(base, names[0]), getattr(base, names[1])


def _chunk_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # [chunk, V] float32 for scored positions only (log_softmax: one fused kernel, faster than logsumexp)
    return torch.log_softmax(head(h).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _chunk_scores(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[chunk, 3]``: log p(target), entropy of softmax(logits / temperature), argmax == target."""
    logits = head(h).float()
    logp = torch.log_softmax(logits, dim=-1)
    logp_t = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(logp_t.exp() * logp_t).sum(-1)
    correct = (logits.detach().argmax(-1) == targets).float()
    return torch.stack([logp.gather(-1, targets[:, None]).squeeze(-1), entropy, correct], dim=-1)


def _scored_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256, *,
                     entropy_temperature: float | None = None):
    """``log softmax(head(h))[target]`` at positions with ``targets >= 0`` (0 elsewhere), float32
    ``[B, n]``. Chunks of ``chunk_size`` positions; each chunk is activation-checkpointed, so its
    logits live only while that chunk is computed (forward) or recomputed (backward). With
    ``entropy_temperature``: ``(log-probs, entropies, correct)``, each ``[B, n]``, from the same chunks."""
    sel = targets >= 0
    hs, ts = h[sel], targets[sel]
    if entropy_temperature is None:
        fn, cols = _chunk_logprobs, ()
    else:
        fn, cols = (lambda hd, x, t: _chunk_scores(hd, x, t, entropy_temperature)), (3,)
    parts = [checkpoint(fn, head, hs[i:i + chunk_size], ts[i:i + chunk_size], use_reentrant=False)
             for i in range(0, hs.shape[0], chunk_size)]
    out = torch.zeros((*targets.shape, *cols), dtype=torch.float32, device=h.device)
    if parts:
        out = out.index_put((sel,), torch.cat(parts))
    return out if entropy_temperature is None else out.unbind(-1)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip engine/DDP wrappers (anything exposing the wrapped module as ``.module``)."""
    seen = 0
    while isinstance(getattr(model, "module", None), nn.Module) and seen < 8:
        model, seen = model.module, seen + 1
    return model


def kv_cache_support(model: nn.Module) -> tuple[bool, str]:
    """Whether the sampler's block KV cache can drive ``model`` (an adapter, engine or HF model)."""
    inner = unwrap_model(model)
    if isinstance(inner, PolicyAdapter):
        if not inner.supports_kv_cache:
            return False, (f"{type(_base_model(inner.model)).__name__} is not verified for the block cache (forward "
                           f"must append to a transformers Cache given as `past_key_values` and take `position_ids`; "
                           f"verified: {', '.join(_CACHE_CLASSES)}); set adapter.supports_kv_cache = True to opt in")
        return True, ""
    if type(_base_model(inner)).__name__ in _CACHE_CLASSES:
        return True, ""
    return False, (f"{type(inner).__name__} is not a model verified for the block cache (see docs/models.md); "
                   f"wrap it in rollout.PolicyAdapter and set supports_kv_cache = True to opt in")


def build_tiny_policy(seed: int = 0, **overrides) -> PolicyAdapter:
    """The built-in tiny model (:mod:`rollout.tiny`) and its tokenizer, as a :class:`PolicyAdapter`."""
    from rollout.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    return PolicyAdapter(build_tiny_model(tokenizer, seed=seed, **overrides), tokenizer)

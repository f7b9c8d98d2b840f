"""The shared body of our dLLM architectures: transformers' decoder layers run bidirectionally.

A published LLaDA or Dream checkpoint is a folder of ``config.json`` (``model_type`` plus an
``auto_map`` into the remote ``.py`` files beside it), safetensors weights and a tokenizer. We load
such a folder into :class:`BidirectionalLM`: the family's decoder layers from transformers
(Llama for LLaDA, Qwen2 for Dream) with ``is_causal = False``, an RMSNorm, RoPE and an LM head.
No remote code runs; SDPA / eager / flash attention, gradient checkpointing and a transformers
``Cache`` (the sampler's block KV cache) come with the layers.

Checkpoint I/O keeps the published layout both ways: ``from_pretrained`` renames the published
tensor names to ours (:attr:`BidirectionalLM.published_names`, regex -> replacement) and
``save_pretrained`` writes them back, with the family's ``config.json`` keys and the remote-code
files of the folder it was loaded from, so the published code loads our exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, MaskedLMOutput

# Files of a published folder besides weights and tokenizer that its own code needs to load it.
CARRIED_FILES = ("generation_config.json",)


class UnsupportedModelError(ValueError):
    """A published config our implementation cannot reproduce (the message names the key)."""


class PublishedQwenConfig(PretrainedConfig):
    """The keys of a published Qwen-based dLLM config (Dream, SDAR) as saved in ``config.json``:
    ``rope_theta`` / ``rope_scaling`` are the source of the rotary settings (transformers 5's
    ``rope_parameters`` is dropped on load and not written back), ``num_key_value_heads`` defaults
    to ``num_attention_heads``, ``auto_map`` to the family's remote code. A family sets
    ``published_defaults`` (its published config class's defaults) and ``published_auto_map``."""

    published_defaults: ClassVar[dict] = {}
    published_auto_map: ClassVar[dict] = {}

    def __init__(self, use_cache: bool = False, rope_scaling: dict | None = None, **kwargs):
        values = {**self.published_defaults, **kwargs}
        values.pop("rope_parameters", None)  # written by newer transformers; rope_theta/rope_scaling are the source
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        values.setdefault("auto_map", dict(self.published_auto_map))
        super().__init__(use_cache=use_cache, **self.complete(values))
        self.published_rope_scaling = rope_scaling

    def __init_subclass__(cls, **kwargs):
        # PretrainedConfig makes every subclass a dataclass with a generated __init__ unless the
        # class defines its own: a family keeps this one.
        if "__init__" not in cls.__dict__:
            cls.__init__ = PublishedQwenConfig.__init__
        super().__init_subclass__(**kwargs)

    def complete(self, values: dict) -> dict:
        """Family-specific defaults derived from other keys (before ``PretrainedConfig`` sees them)."""
        return values

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size

    def to_dict(self) -> dict:
        """The published keys: ``rope_scaling`` (not transformers 5's ``rope_parameters``)."""
        out = super().to_dict()
        out.pop("rope_parameters", None)
        out["rope_scaling"] = out.pop("published_rope_scaling", None)
        return out

    def rope(self) -> dict:
        """The layers' ``rope_parameters``: ``rope_scaling`` (either spelling of its type key) with ``rope_theta``."""
        rope = {"rope_type": "default", **(self.published_rope_scaling or {}), "rope_theta": float(self.rope_theta)}
        if "type" in rope:  # the pre-``rope_type`` spelling
            rope["rope_type"] = rope.pop("type")
        return rope


class BidirectionalTrunk(nn.Module):
    """Embeddings -> decoder layers (non-causal) -> final RMSNorm. ``layer_config`` is the
    transformers config (LlamaConfig / Qwen2Config) the layers are built from."""

    def __init__(self, config: PretrainedConfig, layer_config: PretrainedConfig, layer_cls, norm_cls, rotary_cls):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.embedding_rows, layer_config.hidden_size)
        self.layers = nn.ModuleList([layer_cls(layer_config, i) for i in range(layer_config.num_hidden_layers)])
        for layer in self.layers:
            layer.self_attn.is_causal = False
            # the attention reads `config._attn_implementation` per call: follow the model's setting
            layer.self_attn.config = config
        self.norm = norm_cls(layer_config.hidden_size, eps=layer_config.rms_norm_eps)
        self.rotary_emb = rotary_cls(config=layer_config)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        """``attention_mask``: 2D ``[B, N]`` padding mask (1 = real token), or a prepared 4D mask
        (passed through, e.g. the sampler's cache window); ``position_ids`` default to 0..N-1.
        ``hidden_states`` (when asked): the input of every layer, then the final normed output."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = self.default_positions(x, past_key_values)
        mask = self.attention_mask_for(x, attention_mask, position_ids, past_key_values)
        cos_sin = self.rotary_emb(x, position_ids)
        hidden = []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x = layer(x, attention_mask=mask, position_ids=position_ids, past_key_values=past_key_values,
                      position_embeddings=cos_sin)
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=tuple(hidden) if hidden else None,
                                       past_key_values=past_key_values)

    def default_positions(self, x: torch.Tensor, past_key_values=None) -> torch.Tensor:
        """``position_ids`` when none are given: ``0..N-1``."""
        return torch.arange(x.shape[1], device=x.device)[None]

    def attention_mask_for(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                           past_key_values=None) -> torch.Tensor | None:
        """The mask the layers get: bidirectional over real tokens for a 2D padding mask; a
        prepared 4D mask (or None) as given. Subclasses with another attention pattern override it."""
        if attention_mask is not None and attention_mask.dim() == 2:
            return create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask)
        return attention_mask


class BidirectionalLM(PreTrainedModel):
    """A bidirectional masked-token predictor: :class:`BidirectionalTrunk` + LM head.

    Subclasses set ``config_class``, the layer classes and :attr:`published_names`: ordered
    ``(published prefix, our prefix)`` templates, ``{i}`` standing for a layer index."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    layer_cls = norm_cls = rotary_cls = None
    trunk_cls: type[BidirectionalTrunk] = BidirectionalTrunk
    published_names: tuple[tuple[str, str], ...] = ()
    published_architecture: str = ""

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        layer_config = config.layer_config()
        self._no_split_modules = [self.layer_cls.__name__]
        self.model = self.trunk_cls(config, layer_config, self.layer_cls, self.norm_cls, self.rotary_cls)
        self.lm_head = nn.Linear(layer_config.hidden_size, config.embedding_rows, bias=False)
        self.published_files: dict[str, str] = {}
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> MaskedLMOutput:
        """Logits for every position (or the last ``logits_to_keep``), as the published model
        computes them: unshifted for LLaDA, shifted (position i predicts token i+1) for Dream."""
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states, **kwargs)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return MaskedLMOutput(logits=logits, hidden_states=out.hidden_states)

    # ---- the published layout -----------------------------------------------------------------
    @classmethod
    def key_mapping(cls) -> dict[str, str]:
        """Published tensor name -> ours, as transformers' ``from_pretrained(key_mapping=...)`` takes it."""
        return dict(_rename_rule(pub, ours) for pub, ours in cls.published_names)

    @classmethod
    def to_published_name(cls, name: str) -> str:
        """Our tensor name -> the published one (the inverse of :meth:`key_mapping`)."""
        for pub, ours in cls.published_names:
            pattern, replacement = _rename_rule(ours, pub)
            new, n = re.subn(pattern, replacement, name)
            if n:
                return new
        return name

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader with the published tensor names mapped to ours; also keeps the
        folder's remote-code files so :meth:`save_pretrained` can write a folder they load."""
        kwargs.setdefault("key_mapping", cls.key_mapping())
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.published_files = read_published_files(pretrained_model_name_or_path, model.config)
        return model

    def save_pretrained(self, save_directory, state_dict: dict | None = None, safe_serialization: bool = True,
                        max_shard_size: str = "5GB", **kwargs) -> None:
        """Write the published layout: the family's config keys, published tensor names (the tied
        LM head dropped), and the remote-code files the folder was loaded with."""
        from huggingface_hub import save_torch_state_dict

        if not safe_serialization:
            raise ValueError(f"{type(self).__name__}.save_pretrained writes safetensors only")
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict() if state_dict is None else state_dict
        tied = self.config.tie_word_embeddings
        sd = {self.to_published_name(k): _own_storage(v) for k, v in sd.items() if not (tied and k == "lm_head.weight")}
        self.config.architectures = [self.published_architecture]
        self.config.save_pretrained(out)
        save_torch_state_dict(sd, out, max_shard_size=max_shard_size)
        for name, text in self.published_files.items():
            (out / name).write_text(text)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it owns its whole storage, else a copy: safetensors refuses views into a larger
    buffer (DeepSpeed keeps parameters as views of flat per-group buffers)."""
    t = t.detach()
    whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone()


def _rename_rule(src: str, dst: str) -> tuple[str, str]:
    """``("model.transformer.blocks.{i}.q_proj.", "model.layers.{i}.self_attn.q_proj.")`` -> an
    anchored regex over ``src`` names and its replacement (``{i}`` is a layer index)."""
    return "^" + re.escape(src).replace(r"\{i\}", r"(\d+)"), dst.replace("{i}", r"\1")


def read_published_files(path, config: PretrainedConfig) -> dict[str, str]:
    """The remote-code modules named by ``config.auto_map`` (and carried config files) in a local
    checkpoint folder or the hub cache, as ``{file name: text}``; missing ones are skipped."""
    from transformers.utils import cached_file

    names = {ref.split("--")[-1].split(".")[0] + ".py" for ref in _auto_map_refs(config)}
    names |= set(CARRIED_FILES)
    found = {}
    for name in sorted(names):
        local = Path(path) / name
        try:
            file = local if local.is_file() else cached_file(str(path), name, _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            file = None
        if file:
            found[name] = Path(file).read_text()
    # the published modules import each other (e.g. modeling -> configuration, generation utils)
    for name, text in list(found.items()):
        for dep in re.findall(r"^from \.(\w+) import", text, flags=re.M):
            dep_file = Path(path) / f"{dep}.py"
            if f"{dep}.py" not in found and dep_file.is_file():
                found[f"{dep}.py"] = dep_file.read_text()
    return found


def _auto_map_refs(config: PretrainedConfig) -> list[str]:
    auto_map = getattr(config, "auto_map", None) or {}
    refs = []
    for value in auto_map.values():
        refs.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if v)
    return refs


def read_config_dict(path) -> dict:
    """``config.json`` of a local folder or hub name, as a dict (for dispatch on ``model_type``)."""
    from transformers.utils import cached_file

    local = Path(path) / "config.json"
    file = local if local.is_file() else cached_file(str(path), "config.json")
    return json.loads(Path(file).read_text())

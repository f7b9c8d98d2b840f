"""vLLM model classes for the dLLMs we serve, and the pooler that turns one forward into what the
denoising loop needs.

Every class is vLLM's own trunk run bidirectionally (``EncoderOnlyAttention``: no causal mask, no
KV cache) as a *pooling* model (``runner="pooling"``, task ``token_classify``):

- :class:`BertDLLM`: the tiny default (BERT, absolute positions): vLLM's ``BertModel`` + MLM head;
- :class:`LlamaDLLM`: LLaDA (published tensor names, e.g. ``model.transformer.blocks.0.q_proj``,
  mapped with :attr:`rollout.models.LLaDAForMaskedLM.published_names`) and EuroBERT: vLLM's
  ``LlamaModel`` with ``is_causal=False``;
- :class:`QwenDLLM`: Dream (Qwen2's tensor names; shifted logits): vLLM's ``Qwen2Model``.

The forward returns hidden states; :class:`DenoisePooler` applies the LM head to the scored
window only and reduces each position to ``[x0, stats...]`` (proposal by Gumbel-max in float64,
remasking statistics: :func:`rollout.remasking.propose_and_score`, the same code as the torch
backend), so no full-vocabulary tensor leaves the engine. Configs are translated to the
transformers config of the trunk by :func:`to_vllm_config` (vLLM's ``hf_overrides``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Set

import torch
from torch import nn
from transformers import BertConfig, EuroBertConfig, LlamaConfig, PretrainedConfig
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather
from vllm.model_executor.layers.pooler import Pooler
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.models.bert import BertModel
from vllm.model_executor.models.interfaces_base import attn_type, default_pooling_type
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.v1.pool.metadata import PoolingMetadata

from rollout.models import DreamConfig, LLaDAConfig, LLaDAForMaskedLM
from rollout.remasking import propose_and_score

# Architecture names the translated configs carry (registered by rollout.vllm_backend.register).
BERT_ARCH, LLAMA_ARCH, QWEN_ARCH = "DllmRlBert", "DllmRlLlama", "DllmRlQwen2"
SUPPORTED = ("bert", "eurobert", "llada", "dream")


def to_vllm_config(config: PretrainedConfig) -> PretrainedConfig:
    """The transformers config vLLM builds our model from (``hf_overrides``): the trunk's config
    with ``is_causal=False`` and one of our architectures. Other configs (vLLM probes with a
    dummy) come back unchanged."""
    if isinstance(config, LLaDAConfig):
        out, arch = config.layer_config(), LLAMA_ARCH
    elif isinstance(config, DreamConfig):
        out, arch = config.layer_config(), QWEN_ARCH
    elif isinstance(config, EuroBertConfig):
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "attention_bias",
                "mlp_bias", "tie_word_embeddings", "head_dim")
        out = LlamaConfig(**{k: getattr(config, k) for k in keys}, rope_parameters=dict(config.rope_parameters))
        out.lm_head_bias, arch = bool(config.mlp_bias), LLAMA_ARCH
    elif isinstance(config, BertConfig):
        out, arch = BertConfig(**config.to_dict()), BERT_ARCH
    else:
        return config
    out.is_causal = False
    out.architectures = [arch]
    return out


class DenoisePooler(Pooler):
    """Per request: ``[n, 1 + len(stats)]`` float64 rows ``[x0, stats...]`` for the ``n`` scored
    positions that start ``back`` positions before the end of the sequence.

    Read from each request's ``PoolingParams.extra_kwargs`` (all requests of one call share them
    but ``seed``): ``back``, ``n``, ``shift`` (1 for models whose logits at i predict token i + 1),
    ``mask_id``, ``temperature``, ``stats``, ``seed`` (the request's Gumbel noise generator)."""

    def __init__(self, logits_fn):
        super().__init__()
        self.logits_fn = logits_fn

    def get_supported_tasks(self) -> Set[str]:
        return {"token_classify"}

    def forward(self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata) -> list[torch.Tensor]:
        kws = [p.extra_kwargs for p in pooling_metadata.pooling_params]
        kw = kws[0]
        if any((k["back"], k["n"], k["temperature"]) != (kw["back"], kw["n"], kw["temperature"]) for k in kws):
            raise ValueError("DenoisePooler: one engine step holds requests of different denoising calls")
        lens = pooling_metadata.get_pooling_cursor().num_scheduled_tokens_cpu
        ends = torch.cumsum(lens, 0).to(hidden_states.device)
        first = ends - kw["back"] - kw["shift"]
        idx = first[:, None] + torch.arange(kw["n"], device=hidden_states.device)[None]
        logits = self.logits_fn(hidden_states[idx.reshape(-1)]).view(len(kws), kw["n"], -1)
        stats = tuple(kw["stats"])
        common = dict(mask_id=kw["mask_id"], temperature=kw["temperature"], stats=stats)
        if kw["temperature"] == 0:  # no noise: one batched reduction
            x0, st = propose_and_score(logits, generator=None, **common)
            return list(_pack(x0, st, stats))
        rows = []
        for r, k in enumerate(kws):  # each request its own float64 Gumbel noise
            g = torch.Generator(device=logits.device).manual_seed(k["seed"])
            x0, st = propose_and_score(logits[r], generator=g, **common)
            rows.append(_pack(x0, st, stats))
        return rows


def _pack(x0: torch.Tensor, stats: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    """``[..., 1 + len(names)]`` float64: x0 then the statistics (both exact in float64)."""
    return torch.stack([x0.double(), *(stats[n].double() for n in names)], -1)


def _parallel_logits(head: ParallelLMHead, h: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits of ``h`` on every tensor-parallel rank."""
    logits = head.quant_method.apply(head, h, bias=getattr(head, "bias", None))
    if get_tensor_model_parallel_world_size() > 1:
        logits = tensor_model_parallel_all_gather(logits)
    return logits[..., :vocab_size]


class _PoolingDLLM(nn.Module):
    """Shared plumbing: embeddings for vLLM, the trunk's forward, the pooler."""

    is_pooling_model = True

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors,
                          inputs_embeds=inputs_embeds)


class BertLMHead(nn.Module):
    """BERT's MLM head (``cls.predictions``): dense, activation, LayerNorm, then the decoder, whose
    weight is the word embedding when tied (read through ``embeddings``, never a shared tensor)."""

    def __init__(self, config: BertConfig, embeddings: Callable[[], torch.Tensor] | None):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = get_act_fn(config.hidden_act)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.vocab_size, self.embeddings = config.vocab_size, embeddings
        if embeddings is None:
            self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.act(self.dense(h)))
        weight = self.embeddings()[:self.vocab_size] if self.embeddings is not None else self.decoder.weight
        return nn.functional.linear(x, weight, self.bias)


@attn_type("encoder_only")
@default_pooling_type(tok_pooling_type="ALL")
class BertDLLM(_PoolingDLLM):
    """The tiny default: ``transformers.BertForMaskedLM``'s tensors on vLLM's ``BertModel``."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={"bert.": "model."},
        orig_to_new_substr={"cls.predictions.decoder.bias": None,  # = cls.predictions.bias
                            "cls.predictions.transform.LayerNorm": "head.layer_norm",
                            "cls.predictions.transform.dense": "head.dense",
                            "cls.predictions.decoder": "head.decoder",
                            "cls.predictions.bias": "head.bias"})

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.model = BertModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        words = self.model.embeddings.word_embeddings
        self.head = BertLMHead(config, (lambda: words.weight) if self.tied else None)
        self.pooler = DenoisePooler(lambda h: self.head(h))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.tied:  # the decoder is the word embedding
            weights = ((n, w) for n, w in weights if n != "cls.predictions.decoder.weight")
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class _DecoderDLLM(_PoolingDLLM):
    """A decoder-only trunk with ``is_causal=False`` + an LM head (tied or not)."""

    trunk_cls: type[nn.Module]

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = self.trunk_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if not config.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          bias=getattr(config, "lm_head_bias", False),
                                          prefix=maybe_prefix(prefix, "lm_head"))
        # a tied head is the embedding module itself (never a second module sharing its tensor: vLLM's
        # in-place reload restores modules one by one and would break the sharing)
        self.pooler = DenoisePooler(lambda h: _parallel_logits(self.head(), h, config.vocab_size))

    def head(self) -> nn.Module:
        return self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head

    def rename(self, name: str) -> str:
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = self.config.tie_word_embeddings  # a tied head is the embedding: its copy is not loaded
        renamed = ((self.rename(n), w) for n, w in weights)
        kept = ((n, w) for n, w in renamed if not (tied and n.startswith("lm_head.")))
        return AutoWeightsLoader(self).load_weights(kept)


@attn_type("encoder_only")
@default_pooling_type(tok_pooling_type="ALL")
class LlamaDLLM(_DecoderDLLM):
    """LLaDA (published or our tensor names) and EuroBERT on vLLM's ``LlamaModel``."""

    trunk_cls = LlamaModel
    _rules = [(re.compile(p), r) for p, r in LLaDAForMaskedLM.key_mapping().items()]

    def rename(self, name: str) -> str:
        for pattern, replacement in self._rules:
            new, n = pattern.subn(replacement, name)
            if n:
                return new
        return name


@attn_type("encoder_only")
@default_pooling_type(tok_pooling_type="ALL")
class QwenDLLM(_DecoderDLLM):
    """Dream on vLLM's ``Qwen2Model`` (Dream's published names are Qwen2's)."""

    trunk_cls = Qwen2Model

"""Tiny random checkpoints of LLaDA, Dream and SDAR in their published folder layout, and the
published modeling code (``../shared/models``) loaded as a reference.

A fixture folder is what a user downloads, scaled down: ``config.json`` with ``auto_map`` and the
family's keys, the published ``.py`` files, ``model.safetensors`` with the published tensor names
(weights drawn by the *published* code's own init, so our loader never names them), and a small
fast tokenizer with a mask token (the built-in character tokenizer).

The published code predates transformers 5; :func:`published_model` imports it from a private
package with the shims the reference needs and nothing else:
- LLaDA: ``config.use_cache`` (v5 drops the constructor's kwarg);
- Dream: RoPE ``"default"`` init (removed from ``ROPE_INIT_FUNCTIONS``), ``_tied_weights_keys`` as
  the dict transformers 5 expects, ``DreamGenerationConfig.validate`` accepting v5's keywords, and, as the README of
  ``../shared/models`` prescribes, the one line that rebuilds ``position_ids`` is restored to use
  the given ones (Dream's released code does; its sampler passes positions that skip left padding);
- SDAR: ``LossKwargs`` (gone from ``transformers.utils``) defined in the private copy, RoPE
  ``"default"`` init (with the config's ``head_dim``), ``_tied_weights_keys`` as a dict, and a
  plain-torch stand-in for the ``flash_attn`` package its module imports at load time
  (``rms_norm_fn`` = the plain RMSNorm commented out under ``SDARRMSNorm.forward``), present in
  ``sys.modules`` only while the private copy is imported; a ``DynamicCache`` that can be indexed
  by layer (:class:`LegacyDynamicCache`, transformers 4's API, which SDAR's attention uses). SDAR's
  sampler ``generate.py`` is imported from the same package (``published_sdar.generate``) and run by
  :func:`sdar_generate`: the 3D ``[1, Q, K]`` block mask it passes gets the head axis the published
  attention indexes (it fails on a 3D mask otherwise), and "greedy" replaces its multinomial draw by
  the argmax (it has no temperature 0).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

ROOT = Path(__file__).resolve().parents[2]
SHARED_MODELS = Path(os.environ.get("DLLM_RL_SHARED_MODELS", ROOT.parent / "shared" / "models"))

LLADA_FILES = ("configuration_llada.py", "modeling_llada.py")
DREAM_FILES = ("configuration_dream.py", "modeling_dream.py", "generation_utils.py")
SDAR_FILES = ("configuration_sdar.py", "modeling_sdar.py")
_SDAR_LOSS_KWARGS_LINE = "from transformers.utils import LossKwargs, auto_docstring,"
_SDAR_LOSS_KWARGS_FIX = ("from typing import TypedDict\n\n\nclass LossKwargs(TypedDict, total=False):\n"
                         "    \"\"\"Removed from transformers.utils in v5 (test shim).\"\"\"\n\n\n"
                         "from transformers.utils import auto_docstring,")
FILES = {"llada": LLADA_FILES, "dream": DREAM_FILES, "sdar": SDAR_FILES}
_DREAM_POSITION_LINE = "        if not dual_cache:\n            position_ids = torch.arange("
_DREAM_POSITION_FIX = "        if not dual_cache and position_ids is None:\n            position_ids = torch.arange("

_packages: dict[str, object] = {}


def _shared(family: str) -> Path:
    folder = SHARED_MODELS / family
    if not folder.is_dir():
        raise FileNotFoundError(f"published model code not found: {folder} (set DLLM_RL_SHARED_MODELS)")
    return folder


def published_modules(family: str):
    """``(configuration module, modeling module)`` of the published code, imported once from a
    private package (with the reference shims described in the module docstring)."""
    if family in _packages:
        return _packages[family]
    files = FILES[family] + (("generate.py",) if family == "sdar" else ())
    pkg_root = Path(tempfile.mkdtemp(prefix="published-"))
    pkg = pkg_root / f"published_{family}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in files:
        text = (_shared(family) / name).read_text()
        if name == "modeling_dream.py":
            assert _DREAM_POSITION_LINE in text, "Dream's position_ids line moved; update the shim"
            text = text.replace(_DREAM_POSITION_LINE, _DREAM_POSITION_FIX)
        if name == "modeling_sdar.py":
            assert _SDAR_LOSS_KWARGS_LINE in text, "SDAR's transformers.utils import moved; update the shim"
            text = text.replace(_SDAR_LOSS_KWARGS_LINE, _SDAR_LOSS_KWARGS_FIX)
        (pkg / name).write_text(text)
    sys.path.insert(0, str(pkg_root))
    stem = family
    cfg_mod = importlib.import_module(f"published_{family}.configuration_{stem}")
    if family == "sdar":
        with _flash_attn_stand_in():
            model_mod = importlib.import_module(f"published_{family}.modeling_{stem}")
        model_mod.ROPE_INIT_FUNCTIONS = {**model_mod.ROPE_INIT_FUNCTIONS, "default": _default_rope}
        model_mod.SDARForCausalLM._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        importlib.import_module("published_sdar.generate").DynamicCache = LegacyDynamicCache
        _packages[family] = (cfg_mod, model_mod)
        return cfg_mod, model_mod
    model_mod = importlib.import_module(f"published_{family}.modeling_{stem}")
    if family == "dream":
        model_mod.ROPE_INIT_FUNCTIONS = {**model_mod.ROPE_INIT_FUNCTIONS, "default": _default_rope}
        model_mod.DreamModel._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # v5's dict form
        gen_mod = importlib.import_module("published_dream.generation_utils")
        gen_mod.DreamGenerationConfig.validate = lambda self, *a, **k: None  # v5 passes new keywords
    _packages[family] = (cfg_mod, model_mod)
    return cfg_mod, model_mod


class LegacyDynamicCache(DynamicCache):
    """transformers 4's ``cache[layer_idx] -> (keys, values)``, which SDAR's attention reads when it
    does not store (``store_kv=False``); SDAR's sampler gets this class in the private copy."""

    def __getitem__(self, layer_idx: int):
        layer = self.layers[layer_idx]
        return layer.keys, layer.values


@contextmanager
def _flash_attn_stand_in():
    """A plain-torch ``flash_attn`` in ``sys.modules`` for the duration (SDAR's module imports
    ``flash_attn.ops.triton.layer_norm.rms_norm_fn`` at load time); removed afterwards, so nothing
    else can import it. ``flash_attn_func`` is left out: SDAR only calls it for one-token queries
    with a cache, which no test runs (its guarded import then fails quietly, as without flash-attn)."""
    names = ("flash_attn", "flash_attn.ops", "flash_attn.ops.triton", "flash_attn.ops.triton.layer_norm")
    assert not any(n in sys.modules for n in names), "a flash_attn module is already imported"
    modules = {n: types.ModuleType(n) for n in names}
    modules["flash_attn.ops.triton.layer_norm"].rms_norm_fn = _rms_norm
    sys.modules.update(modules)
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)


def _rms_norm(x, weight, bias=None, eps=1e-6, **_):
    """The RMSNorm commented out under ``SDARRMSNorm.forward``: ``w * x / sqrt(mean(x^2) + eps)``
    computed in float32, cast back before the weight."""
    assert bias is None
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _default_rope(config, device=None, **_):
    """RoPE inverse frequencies, ``theta^(-2j/d)`` (Su et al. 2021), as transformers 4 computed them
    (``d`` = ``config.head_dim`` when set, else hidden size / heads)."""
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
    return inv_freq, 1.0


def published_config(family: str, folder: str | Path):
    cfg_mod, _ = published_modules(family)
    data = json.loads((Path(folder) / "config.json").read_text())
    cls = getattr(cfg_mod, {"llada": "LLaDAConfig", "dream": "DreamConfig", "sdar": "SDARConfig"}[family])
    config = cls(**{k: v for k, v in data.items() if k not in ("model_type", "transformers_version")})
    config.use_cache = False
    return config


def published_model(family: str, folder: str | Path):
    """The published model class with the folder's weights (fp32, eval mode)."""
    from safetensors.torch import load_file

    _, model_mod = published_modules(family)
    config = published_config(family, folder)
    if family == "llada":
        model = model_mod.LLaDAModelLM(config, init_params=False)
    elif family == "sdar":
        model = model_mod.SDARForCausalLM(config)
    else:
        model = model_mod.DreamModel(config)
    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = ["lm_head.weight"] if family != "llada" and config.tie_word_embeddings else []
    if family != "llada" and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    assert not unexpected and set(missing) <= set(tied), (missing, unexpected)
    return model.float().eval()


def build_published_folder(family: str, folder: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 2,
                           kv_heads: int | None = None, intermediate: int = 128, tie: bool = False,
                           seed: int = 0, init_std: float = 0.02, max_positions: int = 512,
                           mute_mask: bool = False, head_dim: int | None = None, block_length: int | None = None,
                           rope_theta: float = 10000.0) -> Path:
    """A tiny random checkpoint in the published layout (see the module docstring). Head size is
    ``hidden / heads`` (>= 32 keeps every attention backend happy); SDAR: ``head_dim`` (default
    ``hidden / heads``) and ``block_length`` (written to ``config.json`` when given; SDAR's own
    configs have none).

    ``mute_mask``: zero the output row of the mask token, so its logit is 0 and (with a large
    ``init_std``) never the argmax: the published samplers may propose the mask token, ours never
    does, and with this both propose the same tokens."""
    from safetensors.torch import save_file

    from rollout.tiny import build_tiny_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer()
    vocab = len(tok)
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id)
    cfg_mod, model_mod = published_modules(family)
    if family == "llada":
        rows = -(-vocab // 128) * 128  # padded like the released checkpoints
        data = dict(
            d_model=hidden, n_heads=heads, n_kv_heads=kv_heads or heads, n_layers=layers, mlp_hidden_size=intermediate,
            mlp_ratio=4, activation_type="silu", block_type="llama", rope=True, rope_theta=500000.0,
            rope_full_precision=True, layer_norm_type="rms", rms_norm_eps=1e-5, include_bias=False,
            include_qkv_bias=False, weight_tying=tie, vocab_size=vocab, embedding_size=rows,
            max_sequence_length=max_positions, attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0,
            init_fn="normal", init_std=init_std, init_device="cpu", alibi=False, scale_logits=False,
            block_group_size=1, flash_attention=False, **ids,
            auto_map={"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                      "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
            architectures=["LLaDAModelLM"], model_type="llada")
        config = cfg_mod.LLaDAConfig(**{k: v for k, v in data.items() if k != "model_type"})
        config.use_cache = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_mod.LLaDAModelLM(config, init_params=True)
        files = LLADA_FILES
    elif family == "sdar":
        data = dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads or heads, head_dim=head_dim or hidden // heads,
            hidden_act="silu", max_position_embeddings=max_positions, initializer_range=init_std, rms_norm_eps=1e-6,
            tie_word_embeddings=tie, rope_theta=rope_theta, rope_scaling=None, attention_bias=False,
            use_sliding_window=False, sliding_window=None, max_window_layers=layers, attention_dropout=0.0,
            fuse_cross_entropy=False, use_cache=False, bos_token_id=tok.bos_token_id, **ids,
            auto_map={"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                      "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
            architectures=["SDARForCausalLM"], model_type="sdar")
        if block_length is not None:
            data["block_length"] = block_length
        config = cfg_mod.SDARConfig(**{k: v for k, v in data.items() if k != "model_type"})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_mod.SDARForCausalLM(config)
        files = SDAR_FILES
        (folder / "generation_config.json").write_text(json.dumps(
            {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id},
            indent=2))
    else:
        data = dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads or heads, hidden_act="silu",
            max_position_embeddings=max_positions, initializer_range=init_std, rms_norm_eps=1e-6,
            tie_word_embeddings=tie, rope_theta=10000.0, rope_scaling=None, use_sliding_window=False,
            sliding_window=4096, max_window_layers=layers, attention_dropout=0.0, bos_token_id=tok.bos_token_id, **ids,
            auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
            architectures=["DreamModel"], model_type="Dream")
        config = cfg_mod.DreamConfig(**{k: v for k, v in data.items() if k != "model_type"})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_mod.DreamModel(config)
        files = DREAM_FILES
        (folder / "generation_config.json").write_text(json.dumps(
            {"mask_token_id": tok.mask_token_id, "pad_token_id": tok.pad_token_id,
             "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "rotary_emb" not in k}
    if mute_mask:
        head = [k for k in ("model.transformer.ff_out.weight", "lm_head.weight", "model.transformer.wte.weight",
                            "model.embed_tokens.weight") if k in state and not (tie and "ff_out" in k)][0]
        state[head][tok.mask_token_id] = 0.0
    if tie:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    for name in files:
        shutil.copy(_shared(family) / name, folder / name)
    tok.save_pretrained(folder)
    return folder


class _SamplerMaskShim(torch.nn.Module):
    """The published SDAR model as its sampler calls it: ``generate.py`` passes a 3D ``[1, Q, K]``
    block mask, which the published attention indexes as 4D; the shim adds the head axis."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    @property
    def device(self):
        return next(self.inner.parameters()).device

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 3:
            attention_mask = attention_mask[:, None]
        return self.inner(input_ids, attention_mask=attention_mask, **kwargs)


def _greedy_sample(logits, temperature=1.0, top_k=0, top_p=1.0):
    """SDAR's ``sample_with_temperature_topk_topp`` at temperature 1 with its multinomial draw
    replaced by the argmax: ``(argmax token, its softmax probability)``."""
    assert temperature == 1.0 and top_k == 0 and top_p == 1.0
    probs = torch.softmax(logits.float(), dim=-1)
    token = probs.argmax(-1)
    return token, probs.gather(-1, token[..., None]).squeeze(-1)


def sdar_generate(model, prompt: torch.Tensor, *, greedy: bool = True, **kwargs) -> torch.Tensor:
    """SDAR's published ``block_diffusion_generate`` (``generate.py``) on the published ``model`` and
    one unpadded prompt ``[1, P]``; ``greedy``: argmax instead of its multinomial draw (the
    published sampler has no temperature 0). Returns its ``x`` ``[1, ceil((P + L) / bl) * bl]``."""
    published_modules("sdar")
    gen = importlib.import_module("published_sdar.generate")
    original = gen.sample_with_temperature_topk_topp
    if greedy:
        gen.sample_with_temperature_topk_topp = _greedy_sample
    try:
        return gen.block_diffusion_generate(_SamplerMaskShim(model), {"input_ids": prompt}, **kwargs)
    finally:
        gen.sample_with_temperature_topk_topp = original

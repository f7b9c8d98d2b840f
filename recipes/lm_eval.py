"""lm-evaluation-harness model ``dllm-rl``: any checkpoint ``rollout.PolicyAdapter.from_pretrained``
loads (our LLaDA / Dream implementations, the tiny model's saved checkpoints, any HF masked-token
predictor), evaluated with lm-eval's tasks (docs/lm_eval.md).

    python -m recipes.lm_eval --model dllm-rl \\
        --model_args pretrained=<dir or hub name>,gen_length=256,block_length=32,steps=128 \\
        --tasks gsm8k --batch_size 8

lm-eval 0.4.13 finds models only in its in-process registry (no entry-point discovery), so the plain
``lm_eval`` command cannot see this one; ``python -m recipes.lm_eval`` imports this module (which
registers ``dllm-rl``) and then runs lm-eval's own CLI with the same arguments. In Python,
``import recipes.lm_eval`` before ``lm_eval.simple_evaluate(model="dllm-rl", ...)``.

Requests:

- ``generate_until``: the rollout engine (:func:`rollout.build_rollout_engine`, every sampler mode
  and backend of ``rl.config.RolloutOptions``) on the tokenised context, completion cut at its
  first EOS, decoded, then cut at the first of the request's ``until`` strings.
- ``loglikelihood``: LLaDA's Monte-Carlo estimate (Nie et al. 2025, Eq. 6; ML-GSAI/LLaDA
  ``eval_llada.py``): ``mc_num`` passes over ``[context, continuation]``, each masking exactly
  ``l`` of the ``L`` continuation tokens, ``l`` drawn per forward batch as LLaDA's
  ``_forward_process`` does (one ``k ~ U{1..L}``, the batch's counts spread evenly over ``1..L``
  from it), the masked tokens' log-probs weighted by ``L / l`` (= 1 / p_mask), averaged over the
  passes; optional CFG on the prompt-masked copy. ``is_greedy``: the continuation equals greedy
  decoding of ``L`` tokens, one per step, lowest confidence last (LLaDA's
  ``suffix_greedy_prediction``), run by our sampler.
- ``loglikelihood_rolling``: the same estimate summed over lm-eval's rolling windows (an ELBO:
  a lower bound of the log-likelihood, so perplexities are upper bounds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

try:
    import lm_eval  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("recipes.lm_eval needs lm-evaluation-harness: pip install -e '.[lmeval]' "
                      "(lm-eval==0.4.13)") from e
# lm-eval's get_model() imports its own models only while the registry is empty: register them first,
# so that importing this module never hides `hf`, `vllm`, ... from the same process.
import lm_eval.models  # noqa: F401,E402
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import model_registry  # noqa: E402
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text  # noqa: E402

from rl.config import ConfigError, RolloutOptions, VLLMOptions  # noqa: E402
from rl.estimators import MaskSample, MCElboLL  # noqa: E402
from rl.masking import exact_count_mask  # noqa: E402
from rollout.adapter import PolicyAdapter  # noqa: E402
from rollout.engine import RolloutEngine, build_rollout_engine  # noqa: E402
from rollout.prompts import left_pad  # noqa: E402

MODEL_NAME = "dllm-rl"
log = logging.getLogger(__name__)

# model_args that are RolloutOptions fields (the sampler's options and the backend); `vllm.<field>` sets
# RolloutOptions.vllm. Prompts reach the engine as token ids tokenised here, lm-eval's way (add_bos_token),
# so the engine's own text-prompt encoding options are not model_args.
PROMPT_ENCODING_FIELDS = ("prompt_special_tokens",)
ROLLOUT_FIELDS = {f.name: f for f in dataclasses.fields(RolloutOptions)
                  if f.name != "vllm" and f.name not in PROMPT_ENCODING_FIELDS}
VLLM_FIELDS = {f.name: f for f in dataclasses.fields(VLLMOptions)}
# request gen_kwargs aliases of the number of tokens to generate (lm-eval's priority order)
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
# gen_kwargs lm-eval tasks use that have no meaning for a dLLM sampler: ignored without a warning
IGNORED_GEN_KWARGS = {"do_sample", "top_p", "top_k", "min_p", "repetition_penalty", "num_beams", "use_cache"}


# ---- the Monte-Carlo log-likelihood estimate ------------------------------------------------------

def llada_mask_counts(length: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Masked-token counts ``l [n]`` of one forward batch of ``n`` passes over a continuation of
    ``length`` tokens, as LLaDA's ``_forward_process``: ``k ~ U{1..L}``, then
    ``l_i = ((k - 1 + round(i L / n)) mod L) + 1`` (the batch's counts spread evenly over 1..L).

    Rounding is half-up in integer arithmetic (LLaDA: ``torch.round`` of a float ``linspace``, half
    to even), so for every ``i`` the map ``k -> l_i`` is a bijection of ``{1..L}``: each ``l_i`` is
    exactly uniform and the estimate is exactly unbiased for the ELBO."""
    if length < 1 or n < 1:
        raise ValueError(f"llada_mask_counts: need length >= 1 and n >= 1, got {length}, {n}")
    return spread_counts(int(torch.randint(1, length + 1, (1,), generator=generator)), length, n)


def spread_counts(k: int, length: int, n: int) -> torch.Tensor:
    """The counts of :func:`llada_mask_counts` for its draw ``k``."""
    i = torch.arange(n, dtype=torch.long)
    offset = (2 * i * length + n) // (2 * n)  # round(i * L / n), ties up
    return (k - 1 + offset) % length + 1


@dataclasses.dataclass
class LLaDAElbo(MCElboLL):
    """:class:`rl.estimators.MCElboLL` (weights ``L / l`` on exactly ``l`` masked tokens) with
    LLaDA's draw of ``l``: stratified within each forward batch of ``max_batch`` passes
    (:func:`llada_mask_counts`) instead of independent. ``n_samples`` = LLaDA's ``mc_num``,
    ``max_batch`` = its ``batch_size``; a last batch of ``mc_num % batch_size`` passes is
    stratified on its own. Same expectation (the ELBO of Eq. 6), usually lower variance."""

    name: ClassVar[str] = "llada_elbo"

    def draw(self, attention_mask, completion_mask, prompt_len, generator) -> MaskSample:
        valid = completion_mask.bool()
        k, (b, l) = self.n_samples, valid.shape
        step = self.max_batch or k
        n_valid = valid.sum(-1)  # [B]
        counts = torch.stack([
            torch.cat([llada_mask_counts(int(n_valid[j]), min(step, k - s), generator) for s in range(0, k, step)])
            for j in range(b)], dim=1).to(valid.device)  # [K, B]
        masked = exact_count_mask(valid.expand(k, b, l), counts, generator)
        weights = masked.float() * (n_valid.float()[None] / counts.float()).unsqueeze(-1)
        no_prompt = torch.zeros(k, b, prompt_len, dtype=torch.bool, device=valid.device)
        return MaskSample(torch.cat([no_prompt, masked], -1), weights)


class GuidedLogits(nn.Module):
    """Unsupervised classifier-free guidance over a policy adapter (LLaDA, Nie et al. 2025,
    App. B.3; its ``get_logits``): ``un + (cfg + 1) * (cond - un)``, ``un`` the logits of the copy
    whose first ``prompt_len`` positions are all masked. Returns an object with ``.logits``."""

    def __init__(self, adapter: PolicyAdapter, prompt_len: int, cfg: float):
        super().__init__()
        self.adapter, self.prompt_len, self.cfg = adapter, prompt_len, cfg

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        un = input_ids.clone()
        un[:, :self.prompt_len] = self.adapter.mask_token_id
        mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
        cond, uncond = self.adapter(torch.cat([input_ids, un]), attention_mask=mask).logits.chunk(2)
        return PolicyLogits(uncond + (self.cfg + 1) * (cond - uncond))


@dataclasses.dataclass
class PolicyLogits:
    logits: torch.Tensor


@torch.no_grad()
def estimate_loglikelihood(adapter: PolicyAdapter, context: Sequence[int], continuation: Sequence[int], *,
                           mc_num: int = 128, batch_size: int = 32, cfg: float = 0.0,
                           generator: torch.Generator | None = None, sample: MaskSample | None = None) -> float:
    """LLaDA's Monte-Carlo estimate of ``log p(continuation | context)`` (module docstring): the mean
    over ``mc_num`` passes of ``(L / l) * sum over the l masked continuation tokens of log p``.
    ``sample`` (a :class:`MaskSample` for ``B = 1``) fixes the masks instead of drawing them."""
    if not continuation:
        return 0.0
    device = next(adapter.parameters()).device
    ids = torch.tensor([list(context) + list(continuation)], dtype=torch.long, device=device)
    p = len(context)
    est = LLaDAElbo(n_samples=mc_num, max_batch=batch_size)
    if sample is None:
        sample = est.draw(None, torch.ones(1, len(continuation), dtype=torch.long, device=device), p, generator)
    model = adapter if not cfg else GuidedLogits(adapter, p, cfg)
    logps = est.score(model, ids, None, p, sample, adapter.mask_token_id)
    return float(est.combine(sample, logps).seq[0])


def greedy_options(length: int, cfg: float = 0.0) -> RolloutOptions:
    """LLaDA's ``suffix_greedy_prediction`` as sampler options: ``length`` tokens in one block, one
    per step, the most confident first, no sampling noise."""
    return RolloutOptions(gen_length=length, block_length=length, steps=length, temperature=0.0, cfg_scale=cfg,
                          remasking="low_confidence")


@torch.no_grad()
def is_greedy(engine: RolloutEngine, context: Sequence[int], continuation: Sequence[int], cfg: float = 0.0) -> bool:
    """Whether greedy decoding of ``len(continuation)`` tokens after ``context`` gives ``continuation``."""
    if not continuation:
        return True
    ids = torch.tensor([list(context)], dtype=torch.long)
    out = engine.generate(ids, options=greedy_options(len(continuation), cfg))
    return out.completion_ids[0].tolist() == list(continuation)


def request_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``seed`` and the request's content: estimates do not depend on the order or
    the company of the requests (lm-eval reorders and caches them)."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2 ** 63 - 1)


def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ---- model_args ------------------------------------------------------------------------------------

def coerce(name: str, value: Any, type_str: str) -> Any:
    """``value`` (from lm-eval's ``k=v`` parsing: str, int, float, bool or None) as the dataclass
    field type ``type_str`` ('int', 'float | None', 'bool', 'str', ...); one-line ValueError otherwise."""
    optional = "None" in type_str
    base = type_str.replace("| None", "").replace("None |", "").strip()
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"model_args {name}={value!r}: a value is required ({base})")
    if base == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ValueError(f"model_args {name}={value!r}: expected true or false")
    if base in ("int", "float"):
        if isinstance(value, bool):
            raise ValueError(f"model_args {name}={value!r}: expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            kind = "an integer" if base == "int" else "a number"
            raise ValueError(f"model_args {name}={value!r}: expected {kind}") from None
        if base == "float":
            return number
        if not number.is_integer():
            raise ValueError(f"model_args {name}={value!r}: expected an integer")
        return int(number)
    return str(value)


def rollout_options(args: dict[str, Any]) -> RolloutOptions:
    """RolloutOptions from model_args (field names; ``vllm.<field>`` for the vLLM settings), each
    value coerced to the field's type and the whole validated by RolloutOptions itself."""
    kw, vllm = {}, {}
    for key, value in args.items():
        if key.startswith("vllm."):
            name = key[len("vllm."):]
            if name not in VLLM_FIELDS:
                raise ValueError(f"model_args {key}: unknown vLLM option; expected one of "
                                 f"{', '.join('vllm.' + n for n in VLLM_FIELDS)}")
            vllm[name] = coerce(key, value, str(VLLM_FIELDS[name].type))
        else:
            kw[key] = coerce(key, value, str(ROLLOUT_FIELDS[key].type))
    try:
        return RolloutOptions(**kw, vllm=VLLMOptions(**vllm))
    except ConfigError as e:
        raise ValueError(f"model_args {e}") from None


def _max_tokens(gen_kwargs: dict) -> int | None:
    for key in MAX_TOKEN_KEYS:
        if gen_kwargs.get(key) is not None:
            return int(gen_kwargs[key])
    return None


# ---- the lm-eval model ------------------------------------------------------------------------------

class DLLMEvalHarness(TemplateLM):
    """lm-eval's ``LM`` for a masked diffusion LM (registered as ``dllm-rl``); model_args in
    docs/lm_eval.md. One process (``rank`` 0 of 1)."""

    backend = "causal"  # TemplateLM: encode context + continuation together, then split

    def __init__(self, pretrained: str | None = None, *, batch_size: int | str = 32, max_batch_size: int | None = None,
                 mc_num: int = 128, cfg: float = 0.0, is_check_greedy: bool = True, max_length: int | None = None,
                 device: str | None = None, dtype: str | None = None, trust_remote_code: bool = True,
                 mask_token_id: int | None = None, add_bos_token: bool | None = None, seed: int = 1234,
                 threads: int | None = None, policy: PolicyAdapter | None = None, **options):
        super().__init__()
        threads = coerce("threads", threads, "int | None")
        if threads:  # torch's intra-op threads (the project's default elsewhere: 1; here torch's own)
            torch.set_num_threads(threads)
        encoding = sorted(k for k in options if k in PROMPT_ENCODING_FIELDS)
        if encoding:
            raise ValueError(f"model_args {encoding[0]}: lm-eval prompts are tokenised by {MODEL_NAME} itself; use "
                             "add_bos_token=true|false (default: the tokenizer's own special tokens)")
        unknown = sorted(k for k in options if k not in ROLLOUT_FIELDS and not k.startswith("vllm."))
        if unknown:
            raise ValueError(f"model_args: unknown key(s) {unknown}; {MODEL_NAME} takes pretrained, batch_size, "
                             "mc_num, cfg, is_check_greedy, max_length, device, dtype, trust_remote_code, "
                             "mask_token_id, add_bos_token, seed, threads and the rollout options "
                             f"{', '.join(ROLLOUT_FIELDS)}, vllm.<field>")
        if (pretrained is None) == (policy is None):
            raise ValueError("model_args: give pretrained=<checkpoint dir or hub name> (in Python: pretrained= or "
                             "policy=<PolicyAdapter>, not both)")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            raise ValueError(f"batch_size={batch_size!r}: not supported by {MODEL_NAME}; give an integer "
                             "(rows per forward: Monte-Carlo passes, prompts per rollout)")
        self._batch_size = coerce("batch_size", batch_size, "int")
        self.mc_num = coerce("mc_num", mc_num, "int")
        self.cfg = coerce("cfg", cfg, "float")
        if self._batch_size < 1 or self.mc_num < 1 or self.cfg < 0:
            raise ValueError(f"model_args: need batch_size >= 1, mc_num >= 1 and cfg >= 0 (got batch_size="
                             f"{self._batch_size}, mc_num={self.mc_num}, cfg={self.cfg})")
        self.is_check_greedy = coerce("is_check_greedy", is_check_greedy, "bool")
        self.add_bos_token = coerce("add_bos_token", add_bos_token, "bool | None")
        self.seed = coerce("seed", seed, "int")
        # `cfg` (LLaDA's name) guides log-likelihoods and, unless cfg_scale is given, generation too
        if self.cfg and "cfg_scale" not in options:
            options["cfg_scale"] = self.cfg
        self.explicit = frozenset(options)  # rollout options given in model_args: they win over requests
        self.options = rollout_options(options)

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda:0 unless told otherwise
            log.warning("%s: device=%s but CUDA is not available; using cpu", MODEL_NAME, device)
            device = "cpu"
        self._device = torch.device(device)
        if policy is None:
            policy = PolicyAdapter.from_pretrained(
                str(pretrained), dtype=None if dtype in (None, "auto") else dtype,
                trust_remote_code=coerce("trust_remote_code", trust_remote_code, "bool"),
                mask_token_id=None if mask_token_id is None else coerce("mask_token_id", mask_token_id, "int"))
        self.policy = policy.to(self._device).eval()
        if self.policy.tokenizer is None:
            raise ValueError(f"pretrained={pretrained}: no tokenizer found; lm-eval requests are text")
        self.tokenizer = self.policy.tokenizer
        self.pretrained = (str(pretrained) if pretrained is not None
                           else str(getattr(self.policy.config, "_name_or_path", "")))
        self._max_length = coerce("max_length", max_length, "int | None") or _model_max_length(self.policy)
        # generation through the configured backend; scoring (log-likelihoods, is_greedy) in process
        self.engine = build_rollout_engine(self.options, self.policy)
        self.scorer = self.engine if self.engine.backend == "torch" else RolloutEngine(self.options, self.policy)
        self._warned: set[str] = set()

    # ---- what lm-eval asks of a model ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.policy.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty-context request: BOS when the tokenizer has one, else EOS."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's ``--apply_chat_template``: the tokenizer's template as text (as its HF model does)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.policy.parameters()),
                "model_dtype": str(self.policy.dtype), "model_name": self.pretrained,
                "rollout_options": dataclasses.asdict(self.options), "mc_num": self.mc_num, "cfg": self.cfg}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's ``--model_args`` string plus its ``--batch_size`` / ``--device``; a key given in
        both comes from model_args (lm-eval's CLI always passes its default ``batch_size=1``)."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids as lm-eval's HF model makes them: the tokenizer's own special tokens unless
        ``add_bos_token`` or the caller says otherwise, none when the text already starts with BOS."""
        kw = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        bos = getattr(self.tokenizer, "bos_token", None)
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---- log-likelihoods ----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        out = []
        for key, context, continuation in tqdm(requests, desc="dllm-rl loglikelihood",
                                               disable=disable_tqdm or bool(self.rank)):
            context, continuation = self._fit(list(context), list(continuation))
            ll = self.loglikelihood_tokens(context, continuation)
            greedy = is_greedy(self.scorer, context, continuation, self.cfg) if self.is_check_greedy else False
            out.append((ll, bool(greedy)))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, out[-1])
        return out

    def loglikelihood_tokens(self, context: Sequence[int], continuation: Sequence[int]) -> float:
        """The estimate for one (context, continuation) pair of token ids, seeded by its content."""
        g = _generator(request_seed(self.seed, list(context), list(continuation)))
        return estimate_loglikelihood(self.policy, context, continuation, mc_num=self.mc_num,
                                      batch_size=self.batch_size, cfg=self.cfg, generator=g)

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context so that context + continuation fit ``max_length``."""
        if len(continuation) >= self.max_length:
            raise ValueError(f"loglikelihood: a continuation of {len(continuation)} tokens does not fit max_length="
                             f"{self.max_length} with its context")
        room = self.max_length - len(continuation)
        if not context:
            context = [self.prefix_token_id]
        return context[-room:], continuation

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of the estimate over lm-eval's rolling windows (``max_length`` tokens, the first one
        conditioned on ``prefix_token_id``): an ELBO, i.e. a lower bound of each string's log-likelihood."""
        out = []
        for (string,) in [req.args for req in requests]:
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=1))
            total = sum(self.loglikelihood_tokens(ctx, cont) for ctx, cont in windows)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # ---- generation ---------------------------------------------------------------------------
    def request_options(self, gen_kwargs: dict | None) -> tuple[RolloutOptions, int | None, list[str]]:
        """(sampler options, token cut or None, stop strings) for one request's gen_kwargs.

        Rollout options given in model_args win; the others follow the request: ``max_gen_toks``
        (or an alias) -> ``gen_length`` = that many tokens rounded up to a multiple of
        ``block_length``, ``steps`` keeping model_args' steps per block, completion cut back to
        ``max_gen_toks`` tokens; ``temperature`` (0 unless ``do_sample``); any RolloutOptions
        field by name (``--gen_kwargs threshold=0.9``)."""
        gen_kwargs = dict(gen_kwargs or {})
        max_tokens = _max_tokens(gen_kwargs)
        kw = dict(normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=max_tokens or self.options.gen_length))
        until = handle_stop_sequences(kw.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        kw.pop("max_gen_toks", None)
        changes: dict[str, Any] = {}
        cut = None
        if max_tokens is not None:
            if "gen_length" in self.explicit:
                self._warn_once("gen_length", f"request max_gen_toks={max_tokens} ignored: gen_length="
                                              f"{self.options.gen_length} from model_args")
            else:
                block = self.options.block_length
                per_block = self.options.steps // (self.options.gen_length // block)
                length = block * max(1, math.ceil(max_tokens / block))
                changes.update(gen_length=length, steps=per_block * (length // block))
                cut = max_tokens
        if "temperature" not in self.explicit:
            changes["temperature"] = float(kw.pop("temperature", 0.0))
        kw.pop("temperature", None)
        for key, value in kw.items():
            if key in ROLLOUT_FIELDS and key != "backend":
                if key in self.explicit:
                    self._warn_once(key, f"request {key}={value!r} ignored: {key}={getattr(self.options, key)!r} "
                                         "from model_args")
                else:
                    changes[key] = coerce(key, value, str(ROLLOUT_FIELDS[key].type))
            elif key not in IGNORED_GEN_KWARGS:
                self._warn_once(key, f"gen_kwargs {key}={value!r} has no meaning for the {MODEL_NAME} sampler; ignored")
        try:
            options = dataclasses.replace(self.options, **changes)
        except ConfigError as e:
            raise ValueError(f"gen_kwargs {gen_kwargs}: {e}") from None
        return options, cut, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions through the rollout engine, batches of ``batch_size`` prompts that share their
        options, in request order; each cut at its first EOS, then at the first stop string."""
        from tqdm import tqdm

        groups: dict[tuple, list[int]] = {}
        plans = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            options, cut, until = self.request_options(gen_kwargs)
            plans.append((options, cut, until))
            groups.setdefault((repr(options), cut, tuple(until)), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="dllm-rl generate_until", disable=disable_tqdm or bool(self.rank))
        for rows in groups.values():
            options, cut, until = plans[rows[0]]
            for s in range(0, len(rows), self.batch_size):
                batch = rows[s:s + self.batch_size]
                contexts = [requests[i].args[0] for i in batch]
                texts = self.generate_texts(contexts, options, cut=cut)
                for i, text in zip(batch, texts):
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(batch))
        bar.close()
        return out

    def encode_contexts(self, contexts: Sequence[str], gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask of ``contexts`` (left-truncated to ``max_length - gen_length``)."""
        room = self.max_length - gen_length
        if room < 1:
            raise ValueError(f"gen_length={gen_length} leaves no room for a prompt in max_length={self.max_length}")
        rows = [(self.tok_encode(c) or [self.prefix_token_id])[-room:] for c in contexts]
        return left_pad(rows, self.policy.pad_token_id)

    @torch.no_grad()
    def generate_texts(self, contexts: Sequence[str], options: RolloutOptions, *, cut: int | None = None) -> list[str]:
        """One rollout of ``contexts``: completion texts up to the first EOS (special tokens dropped),
        ``cut`` tokens at most. Random draws (temperature > 0, random remasking) are seeded by the batch."""
        ids, mask = self.encode_contexts(contexts, options.gen_length)
        g = _generator(request_seed(self.seed, ids.tolist(), repr(options)), self.device)
        rollout = self.engine.generate(ids, mask, options=options, generator=g)
        if cut is not None:
            rollout.completion_ids = rollout.completion_ids[:, :cut]
            rollout.completion_mask = rollout.completion_mask[:, :cut]
        return rollout.decode(self.tokenizer)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: %s", MODEL_NAME, message)


def _model_max_length(policy: PolicyAdapter) -> int:
    """Positions the model takes: its config's max_position_embeddings / max_sequence_length, else 4096."""
    config = policy.config
    for name in ("max_position_embeddings", "max_sequence_length", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def register() -> None:
    """Register :class:`DLLMEvalHarness` as ``dllm-rl`` in lm-eval's model registry (idempotent)."""
    current = model_registry.get(MODEL_NAME, None)
    if current is None:
        model_registry.register(MODEL_NAME)(DLLMEvalHarness)
    elif getattr(current, "__qualname__", None) != DLLMEvalHarness.__qualname__:
        raise ValueError(f"lm-eval model name {MODEL_NAME!r} is already taken by {current}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m recipes.lm_eval <lm_eval arguments>``: lm-eval's own CLI with ``dllm-rl`` registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # register the class of the importable module (not this __main__ copy), then run lm-eval's CLI
    from recipes.lm_eval import main as _main

    _main()
else:
    register()

"""One config dataclass per trainer (TRL style). Hydra's structured configs in ``recipes/`` are
built from these classes; defaults live here and nowhere else.

Every class checks its values in ``__post_init__`` (ranges, closed choices, names against the
registries that define them: rewards, estimators, sampler remasking), so a Python-API user gets
the same one-line :class:`ConfigError` as the CLI. Messages start with the field name
(``lr=-1.0: must be > 0``); the CLI prefixes the config key (``rl.lr=-1.0: ...``).

Batch sizes: ``per_device_batch_size`` (SFT, DPO) counts dataset rows, as TRL's
``per_device_train_batch_size`` does; the GRPO-style trainers count *prompts* per device and
step with ``per_device_prompts`` (TRL's GRPO batch counts completions = prompts x G), so that
a TRL config cannot be ported with the wrong meaning (README, "Coming from TRL").
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
LR_SCHEDULERS = ("constant", "cosine", "linear")  # after the warmup (rl.engine.lr_lambda)
WANDB_MODES = ("online", "offline", "disabled")
KV_CACHES = ("prefix", "dual")
ROLLOUT_BACKENDS = ("torch", "vllm")


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one line naming the key."""


# ---- checks --------------------------------------------------------------------------------------

def check_range(name: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite number within [low, high] (``*_open``: the bound itself excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}: must be a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{name}={value}: must be {'>' if low_open else '>='} {low}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{name}={value}: must be {'<' if high_open else '<='} {high}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: not allowed; expected one of: {', '.join(map(str, allowed))}")


def check_rewards(name: str, spec) -> None:
    """``{reward name: weight or {weight: w, **options}}``: every name registered (or an importable
    ``pkg.module:fn``), every weight a finite number."""
    from rewards.registry import check_reward_name

    if not hasattr(spec, "items"):
        raise ConfigError(f"{name}={spec!r}: expected a dict {{reward name: weight}}")
    for reward, weight in spec.items():
        try:
            check_reward_name(reward)
        except KeyError as e:
            raise ConfigError(f"{name}: {e.args[0]}") from None
        w = weight.get("weight", 1.0) if hasattr(weight, "get") else weight
        check_range(f"{name}.{reward}", w)


def check_estimator(name: str, estimator: str, options: dict, **extra) -> None:
    """A registered estimator (rl.estimators.ESTIMATORS) that accepts ``options``."""
    from rl.estimators import ESTIMATORS, get_estimator

    check_registered(f"{name}estimator", estimator, ESTIMATORS)
    try:
        get_estimator(estimator, **{**dict(options), **extra})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}estimator_options={dict(options)}: {e}") from None


def check_registered(name: str, value, registry) -> None:
    """``value`` is registered in ``registry`` (rl.registry.Registry); else one line with "did you mean"."""
    if value not in registry:
        raise ConfigError(f"{name}={value!r}: {registry.unknown(value)}")


def deepspeed_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "deepspeed").glob("*.json"))


# ---- configs -------------------------------------------------------------------------------------

LORA_TARGET_NAMES = ("published", "native")


@dataclass
class LoraOptions:
    """LoRA via peft. ``enabled=False`` trains all weights.

    ``target_modules`` are matched as peft matches them (a module whose name is, or ends with
    ``.<target>``) against the module names of the checkpoint's *published* code when
    ``target_names=published`` (LLaDA: ``q_proj k_proj v_proj attn_out ff_proj up_proj ff_out``), so
    a list written for the published model (d1's) adapts the same weights here although our LLaDA
    runs on Llama blocks with other names; ``native``: our own module names. Models without a
    published layout (the tiny model, Dream, remote code) have one set of names.
    ``load_in_4bit``: QLoRA as d1's GRPO: the frozen base loaded in 4-bit (bitsandbytes NF4 with
    double quantization, bf16 compute), adapters trained on top."""

    enabled: bool = False
    r: int = 128
    alpha: int = 64
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    target_names: str = "published"
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        check_range("r", self.r, low=1)
        check_range("alpha", self.alpha, low=0, low_open=True)
        check_range("dropout", self.dropout, low=0, high=1, high_open=True)
        check_choice("target_names", self.target_names, LORA_TARGET_NAMES)
        if self.load_in_4bit and not self.enabled:
            raise ConfigError("load_in_4bit: 4-bit weights cannot be trained; QLoRA trains adapters on them "
                              "(set lora.enabled=true)")


# TRL's colocated engines use a 4096-token step budget: vLLM's memory profiler runs one dummy
# step of max_num_batched_tokens tokens, and at its 32768 default the profiled activations leave
# no room (TRL's comment: "misled by the high default value"). Ours is raised to one whole
# sequence when max_model_len is longer: vLLM runs each non-causal sequence in one engine step.
VLLM_BATCHED_TOKENS = 4096


@dataclass
class VLLMOptions:
    """Settings of the vLLM rollout engine (``backend=vllm``; README, "Rollout backends"). One
    engine per training process, colocated with training on the same device."""

    tensor_parallel_size: int = 1  # devices per engine (> 1: ranks of a torchrun world form the groups; must divide it)
    gpu_memory_utilization: float = 0.3  # share of device memory the engine may take (CPU: of host memory)
    dtype: str = "auto"  # auto = the policy's dtype; else float32 | bfloat16 | float16
    max_num_seqs: int = 256  # rows per engine step (a larger batch takes more steps of the same call)
    # tokens per engine step; 0 = max(VLLM_BATCHED_TOKENS, max_model_len) (TRL's colocate budget)
    max_num_batched_tokens: int = 0
    # longest prompt + generation the engine serves; 0 = set by the recipe from the stage's longest prompt
    # (tokens) + its longest gen_length (outside a recipe: the model's positions)
    max_model_len: int = 0
    sleep: bool = False  # vLLM's sleep mode between generation and training (CUDA builds only): weights freed
    enforce_eager: bool = True  # no CUDA graphs / compilation: ~2 s startup

    def __post_init__(self) -> None:
        check_range("tensor_parallel_size", self.tensor_parallel_size, low=1)
        check_range("gpu_memory_utilization", self.gpu_memory_utilization, low=0, high=1, low_open=True)
        check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_range("max_num_seqs", self.max_num_seqs, low=1)
        check_range("max_num_batched_tokens", self.max_num_batched_tokens, low=0)
        check_range("max_model_len", self.max_model_len, low=0)
        if self.max_num_batched_tokens and self.max_model_len and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(f"max_num_batched_tokens={self.max_num_batched_tokens}: must be >= max_model_len="
                              f"{self.max_model_len} (vLLM runs each non-causal sequence whole in one engine step)")

    def batched_tokens(self, max_model_len: int) -> int:
        """The engine's step budget for sequences of up to ``max_model_len`` tokens."""
        return self.max_num_batched_tokens or max(VLLM_BATCHED_TOKENS, max_model_len)


@dataclass
class RolloutOptions:
    """The rollout engine's options, spelled once: the sampler's arguments (LLaDA semantics; see
    rollout/sampler.py) and the backend that runs its forwards (rollout/engine.py)."""

    gen_length: int = 256
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    early_commit: float | None = None
    fill_after_eos: bool = False
    kv_cache: str | None = None
    cache_lookahead: int = 0  # with kv_cache=dual: positions after the block recomputed each step
    backend: str = "torch"  # torch: the sampler in process; vllm: every denoising forward is a vLLM call
    # tokenize a rendered chat prompt with the tokenizer's own special tokens too (d1's evaluation
    # does: tokenizer(apply_chat_template(..., tokenize=False))); no effect for tokenizers that add none
    prompt_special_tokens: bool = False
    vllm: VLLMOptions = field(default_factory=VLLMOptions)

    def __post_init__(self) -> None:
        if self.gen_length < 1 or self.block_length < 1 or self.gen_length % self.block_length:
            raise ConfigError(f"gen_length={self.gen_length}: must be a positive multiple of "
                              f"block_length={self.block_length}")
        blocks = self.gen_length // self.block_length
        if self.steps < blocks or self.steps % blocks:
            raise ConfigError(f"steps={self.steps}: must be a positive multiple of the number of blocks ({blocks})")
        check_range("temperature", self.temperature, low=0)
        check_range("cfg_scale", self.cfg_scale, low=0)
        for name in ("threshold", "early_commit"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), low=0, high=1, low_open=True)
        check_choice("kv_cache", self.kv_cache, (None, *KV_CACHES))
        check_range("cache_lookahead", self.cache_lookahead, low=0)
        if self.cache_lookahead and self.kv_cache != "dual":
            raise ConfigError(f"cache_lookahead={self.cache_lookahead}: only the dual cache has a frozen suffix "
                              f"to look into (kv_cache={self.kv_cache!r}); set kv_cache=dual or cache_lookahead=0")
        if self.remasking != "low_confidence":  # the default is registered (tested); others: ask the sampler
            from rollout.remasking import REMASKING  # imports torch: only for a non-default value

            check_choice("remasking", self.remasking, REMASKING)
        check_choice("backend", self.backend, ROLLOUT_BACKENDS)
        if self.backend == "vllm":
            self._check_vllm()

    def _check_vllm(self) -> None:
        """What the vLLM backend cannot do: one line naming the key."""
        import importlib.util

        if self.cfg_scale:
            raise ConfigError(f"cfg_scale={self.cfg_scale}: backend=vllm runs one forward per step (no "
                              "classifier-free guidance); use backend=torch")
        if self.kv_cache is not None:
            raise ConfigError(f"kv_cache={self.kv_cache!r}: backend=vllm runs every step on the whole sequence "
                              "(no block KV cache); set kv_cache=null or use backend=torch")
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("backend=vllm: vLLM is not installed; `pip install -e .[vllm]` (README, "
                              "\"Rollout backends\")")


@dataclass
class TrainerConfig:
    """Options every trainer shares: optimisation, schedule, DeepSpeed, checkpoints, logging."""

    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    lr_scheduler: str = "constant"  # after warmup: constant | cosine | linear (to 0 at max_steps; HF Trainer's default)
    micro_batch_size: int = 0  # rows per forward/backward; 0 = whole local batch
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (HF models)
    deepspeed: str = "zero0"  # a name in configs/deepspeed/ or a path to a JSON file
    lora: LoraOptions = field(default_factory=LoraOptions)
    logging_steps: int = 1
    save_steps: int = 0  # 0: only at the end
    save_total_limit: int = 2
    eval_steps: int = 0  # 0: only at the end
    resume: bool = False
    export_hf: bool = True  # write run_dir/final (merged HF checkpoint) at the end
    wandb_mode: str | None = None  # None: $WANDB_MODE, else offline
    wandb_project: str = "dllm-rl"
    sample_table_every: int = 0

    def __post_init__(self) -> None:
        check_range("max_steps", self.max_steps, low=1)
        check_range("lr", self.lr, low=0, low_open=True)
        check_range("weight_decay", self.weight_decay, low=0)
        if len(self.adam_betas) != 2:
            raise ConfigError(f"adam_betas={list(self.adam_betas)}: expected two values (beta1, beta2)")
        for b in self.adam_betas:
            check_range("adam_betas[]", b, low=0, high=1, high_open=True)
        check_range("warmup_steps", self.warmup_steps, low=0)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_range("micro_batch_size", self.micro_batch_size, low=0)
        check_range("max_grad_norm", self.max_grad_norm, low=0)
        if not (self.deepspeed.endswith(".json") or Path(self.deepspeed).exists()):
            check_choice("deepspeed", self.deepspeed, deepspeed_names() or ["<configs/deepspeed/*.json>"])
        check_range("logging_steps", self.logging_steps, low=1)
        for name in ("save_steps", "eval_steps", "sample_table_every"):
            check_range(name, getattr(self, name), low=0)
        check_range("save_total_limit", self.save_total_limit, low=1)
        check_choice("wandb_mode", self.wandb_mode, (None, *WANDB_MODES))


@dataclass
class SFTConfig(TrainerConfig):
    """Masked-diffusion SFT (LLaDA Eq. 5 on the response; prompt never masked)."""

    lr: float = 1e-4
    per_device_batch_size: int = 8  # examples per device and step (TRL's per_device_train_batch_size)
    eps: float = 1e-3  # t ~ U(eps, 1)
    max_length: int = 1024
    pad_response_to: int = 0  # > 0: pad responses with EOS to this many tokens (LLaDA SFT style)
    example_format: str = "generation_prompt"  # how rows become tokens: rl/sft_format.py (d1: d1's preprocess_dataset)
    eval_batches: int = 4
    # dParallel's certainty forcing (rl/losses.py:certainty_forcing_loss): + weight x the mean entropy
    # of softmax(logits / temperature) at masked positions already predicted right; 0 = plain SFT
    certainty_weight: float = 0.0
    certainty_temperature: float = 0.5
    # block-diffusion policies (SDAR / TraDo; rl/block_diffusion.py, docs/block_diffusion.md): every block
    # predicted from the clean blocks before it, each response token masked with p ~ U(lower, upper)
    # (dLLM-RL's sft_sdar noise); unused for bidirectional models (they take eps above)
    block_lower_p: float = 0.1
    block_upper_p: float = 0.9
    block_weighting: str = "none"  # "none" (dLLM-RL) | "inverse_p": the ELBO's 1/p weight per masked token
    block_normalize: str = "tokens"  # per row: / its response tokens | "width": / the batch's response width (dLLM-RL)
    block_align: str = "absolute"  # blocks at multiples of the block length in position (the model's own) | "response"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("per_device_batch_size", self.per_device_batch_size, low=1)
        check_range("eps", self.eps, low=0, high=1, low_open=True, high_open=True)
        check_range("block_lower_p", self.block_lower_p, low=0, high=1)
        check_range("block_upper_p", self.block_upper_p, low=self.block_lower_p, high=1)
        check_choice("block_weighting", self.block_weighting, ("none", "inverse_p"))
        check_choice("block_normalize", self.block_normalize, ("tokens", "width"))
        check_choice("block_align", self.block_align, ("absolute", "response"))
        if self.block_weighting == "inverse_p" and self.block_lower_p <= 0:
            raise ConfigError(f"block_lower_p={self.block_lower_p}: must be > 0 with block_weighting=inverse_p "
                              "(it divides by p)")
        check_range("max_length", self.max_length, low=2)
        check_range("pad_response_to", self.pad_response_to, low=0)
        from rl.sft_format import SFT_FORMATS

        check_choice("example_format", self.example_format, sorted(SFT_FORMATS))
        check_range("eval_batches", self.eval_batches, low=0)
        check_range("certainty_weight", self.certainty_weight, low=0)
        check_range("certainty_temperature", self.certainty_temperature, low=0, low_open=True)


@dataclass
class SelfDistillConfig(SFTConfig):
    """Self-distillation for parallel decoding (rl/distill.py): the policy decodes the RL prompts
    with ``rollout`` (its reference loop), the verifier keeps the solved ones, and masked SFT with
    certainty forcing trains on them (dParallel's certainty-forcing distillation on the policy's
    own trajectories, filtered by reward as in rejection-sampling fine-tuning)."""

    certainty_weight: float = 2.0  # dParallel's entropy_weight
    num_prompts: int = 0  # RL prompts decoded for the data; 0 = all
    samples_per_prompt: int = 1  # completions per prompt (> 1 with rollout.temperature > 0)
    rollout: RolloutOptions = field(default_factory=RolloutOptions)  # the decoding that writes the data
    # validation (and so the kept checkpoint) decodes with the run's rollout options updated by these,
    # e.g. {steps: 5}: select for the parallel decoding the stage trains for; {} = the run's rollout
    val_rollout: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("num_prompts", self.num_prompts, low=0)
        check_range("samples_per_prompt", self.samples_per_prompt, low=1)
        unknown = sorted(set(self.val_rollout) - {f.name for f in dataclasses.fields(RolloutOptions)})
        if unknown:
            raise ConfigError(f"val_rollout: unknown rollout option(s) {unknown}")


@dataclass
class _GroupRLConfig(TrainerConfig):
    """Shared by the trainers that sample G completions per prompt and learn from rewards."""

    per_device_prompts: int = 8  # prompts per device and step; completions = per_device_prompts x G
    num_generations: int = 6  # G completions per prompt
    num_iterations: int = 1  # mu updates per batch against the rollout policy
    epsilon: float = 0.2  # clip range of the ratio
    scale_rewards: Any = "none"  # TRL's: "group" | "batch" | "none" (true = "group", false = "none")
    rewards: dict = field(default_factory=lambda: {"gsm8k": 1.0})  # reward name -> weight
    reward_weights: list[float] | None = None  # TRL: weights of the trainer's reward_funcs (default 1 each)
    reward_timeout_s: float = 10.0
    max_prompt_length: int | None = None  # TRL's: keep the last N prompt tokens (d1: 200); None = whole prompts
    rollout: RolloutOptions = field(default_factory=RolloutOptions)

    @property
    def per_device_batch_size(self) -> int:
        """Dataset rows the training loop draws per device and step: prompts here."""
        return self.per_device_prompts

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("per_device_prompts", self.per_device_prompts, low=1)
        if self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations}: must be >= 2 (group-relative advantages)")
        check_range("num_iterations", self.num_iterations, low=1)
        check_range("epsilon", self.epsilon, low=0, high=1, high_open=True)  # 0: ESPO's countdown recipe
        from rl.advantages import scale_rewards_mode

        try:
            self.scale_rewards = scale_rewards_mode(self.scale_rewards)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_rewards("rewards", self.rewards)
        for w in self.reward_weights or ():
            check_range("reward_weights[]", w)
        check_range("reward_timeout_s", self.reward_timeout_s, low=0, low_open=True)
        if self.max_prompt_length is not None:
            check_range("max_prompt_length", self.max_prompt_length, low=1)


@dataclass
class DiffuGRPOConfig(_GroupRLConfig):
    """diffu-GRPO (d1, Zhao et al. 2025). Defaults are d1's published settings."""

    lr: float = 3e-6
    per_device_prompts: int = 2  # d1: 2 prompts x G = 6 -> 12 completions per device and step
    num_generations: int = 6
    num_iterations: int = 12  # mu gradient steps per batch, each with its own mask
    epsilon: float = 0.5
    epsilon_high: float | None = None  # upper clip range (DAPO's clip-higher; TRL's); None = epsilon
    beta: float = 0.04  # KL coefficient (k3 estimator); 0 = no reference model at all
    objective: str = "diffu_grpo"  # a registered policy objective (rl.objectives.OBJECTIVES)
    objective_options: dict = field(default_factory=dict)  # its authors' options, e.g. spg: {logp_estimation: mix}
    advantage: str | None = None  # advantage estimator (rl.advantages.ADVANTAGES); None = the objective's (group)
    loss_type: str | None = None  # aggregation (rl.aggregation.LOSS_TYPES, TRL's names); None = the objective's
    estimator: str | None = None  # likelihood estimator; None = the objective's (diffu_grpo: mean_field)
    estimator_options: dict = field(default_factory=dict)  # over the objective's own when it picks the estimator
    sample_table_every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("beta", self.beta, low=0)
        if self.epsilon_high is not None:
            check_range("epsilon_high", self.epsilon_high, low=0, low_open=True)
        from rl.advantages import ADVANTAGES
        from rl.aggregation import LOSS_TYPES
        from rl.estimators import ESTIMATORS
        from rl.objectives import OBJECTIVES, get_objective

        check_registered("objective", self.objective, OBJECTIVES)
        try:
            objective = get_objective(self.objective, **dict(self.objective_options))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"objective_options={dict(self.objective_options)}: {e}") from None
        if self.estimator is None:  # the objective's estimator, its options updated by the config's
            self.estimator = objective.estimator
            self.estimator_options = {**objective.estimator_options, **dict(self.estimator_options)}
        from dataclasses import fields as dc_fields

        if (self.estimator in ESTIMATORS and "block_length" not in self.estimator_options
                and "block_length" in {f.name for f in dc_fields(ESTIMATORS[self.estimator])}):
            # block-wise masks (SPG) follow the rollouts' semi-AR blocks unless set
            self.estimator_options = {**self.estimator_options, "block_length": self.rollout.block_length}
        check_estimator("", self.estimator, self.estimator_options)
        from rl.estimators import get_estimator

        try:
            objective.check_estimator(get_estimator(self.estimator, **dict(self.estimator_options)))
        except ValueError as e:
            raise ConfigError(f"estimator_options={dict(self.estimator_options)}: {e}") from None
        if objective.estimators is not None and self.estimator not in objective.estimators:
            raise ConfigError(f"estimator={self.estimator!r}: objective {self.objective!r} takes "
                              f"{' or '.join(objective.estimators)}")
        if self.beta > 0 and not objective.supports_kl:
            raise ConfigError(f"beta={self.beta}: objective {self.objective!r} has no KL term (its authors' loss has "
                              "none); set beta=0")
        if self.advantage is None:
            self.advantage = objective.advantage
        check_registered("advantage", self.advantage, ADVANTAGES)
        if self.loss_type is None:
            self.loss_type = objective.default_loss_type(ESTIMATORS[self.estimator].level)
        check_registered("loss_type", self.loss_type, LOSS_TYPES)


@dataclass
class DPOConfig(TrainerConfig):
    """Diffusion DPO / VRPO. ``n_samples`` is VRPO's budget n (passes per ELBO; for the
    ``coupled`` estimator, n complementary pairs = 2n passes)."""

    lr: float = 1e-6  # TRL DPOConfig's default
    per_device_batch_size: int = 8  # preference pairs per device and step (TRL's per_device_train_batch_size)
    beta: float = 0.1
    estimator: str = "mc_elbo"
    estimator_options: dict = field(default_factory=dict)  # e.g. {"eps": 1e-3, "max_batch": 64}
    n_samples: int = 8
    antithetic: bool = True
    optimal_allocation: bool = True
    max_completion_length: int = 512  # responses longer than this (in tokens, EOS included) are cut
    rpo_alpha: float = 0.0  # > 0: add alpha * per-token NLL of the chosen response (RPO; TRL's rpo_alpha)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("per_device_batch_size", self.per_device_batch_size, low=1)
        check_range("beta", self.beta, low=0, low_open=True)
        check_range("n_samples", self.n_samples, low=1)
        if "n_samples" in self.estimator_options:
            raise ConfigError("estimator_options.n_samples: set the sampling budget with n_samples")
        check_estimator("", self.estimator, self.estimator_options, n_samples=self.n_samples)
        if not self.optimal_allocation and self.estimator not in ("mc_elbo", "mc_elbo_ll"):
            raise ConfigError(f"optimal_allocation=False: needs estimator mc_elbo or mc_elbo_ll, got {self.estimator!r}")
        check_range("max_completion_length", self.max_completion_length, low=1)
        check_range("rpo_alpha", self.rpo_alpha, low=0)


def _sudoku_rollout() -> RolloutOptions:
    # 16 digits + EOS in one block, 9 steps: 2 commits per step, so the order matters
    # (scripts/bench_unmask_order.py's setting).
    return RolloutOptions(gen_length=17, block_length=17, steps=9, temperature=0.0)


@dataclass
class UnmaskOrderConfig(_GroupRLConfig):
    """Unmasking-order learner (DCoLT-style UPM) on outcome rewards; defaults: the Sudoku default."""

    lr: float = 5e-4  # the block's; the gate moves conf_scale x faster
    per_device_prompts: int = 16
    num_generations: int = 8  # G rollouts per prompt
    num_iterations: int = 2  # mu updates per batch against the old (rollout) policy
    epsilon: float = 0.2  # clip range of the per-step ratio
    train_dllm: bool = False  # co-train the dLLM (DCoLT): add committed tokens' log-probs
    cache_features: bool = True  # frozen dLLM: reuse the rollout's hidden states (no dLLM pass)
    d_model: int = 128
    n_heads: int = 4
    ff_dim: int = 256
    conf_scale: float = 500.0  # head: multiplier of the confidence gate (its effective lr)
    residual_bound: float = 1.0  # head: the block's score lies in (-bound, bound); 0 = unbounded
    block_kl: float = 0.2  # coefficient of KL(pi || confidence-gate-only pi): pulls the block term to 0
    rewards: dict = field(default_factory=lambda: {"sudoku": 1.0})
    rollout: RolloutOptions = field(default_factory=_sudoku_rollout)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("d_model", "n_heads", "ff_dim"):
            check_range(name, getattr(self, name), low=1)
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model}: must be a multiple of n_heads={self.n_heads}")
        check_range("conf_scale", self.conf_scale, low=0, low_open=True)
        check_range("residual_bound", self.residual_bound, low=0)
        check_range("block_kl", self.block_kl, low=0)
        if self.lora.enabled and not self.train_dllm:
            raise ConfigError("lora.enabled: LoRA adapts the dLLM, which the order learner trains only with "
                              "train_dllm=true (the head alone needs no LoRA)")
        for name in ("threshold", "early_commit", "kv_cache"):
            if getattr(self.rollout, name) is not None:
                raise ConfigError(f"rollout.{name}={getattr(self.rollout, name)!r}: the order learner needs "
                                  "LLaDA's fixed schedule (set it to null)")
        if self.rollout.fill_after_eos or self.rollout.cfg_scale:
            raise ConfigError("rollout: fill_after_eos and cfg_scale are not supported by the order learner")
        if self.rollout.backend != "torch":
            raise ConfigError(f"rollout.backend={self.rollout.backend}: the order learner reads the dLLM's logits and "
                              "hidden states at every step, which only backend=torch gives")

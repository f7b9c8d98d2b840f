"""One config dataclass per trainer (TRL style). Hydra's structured configs in ``recipes/`` are
built from these classes; defaults live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraOptions:
    """LoRA via peft (d1: r=128, alpha=64). ``enabled=False`` trains all weights."""

    enabled: bool = False
    r: int = 128
    alpha: int = 64
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


@dataclass
class RolloutOptions:
    """Arguments of ``rollout.generate`` (LLaDA semantics; see rollout/sampler.py)."""

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
    lr_scheduler: str = "constant"  # "constant" | "cosine" (after warmup)
    per_device_batch_size: int = 8
    micro_batch_size: int = 0  # rows per forward/backward; 0 = whole local batch
    max_grad_norm: float = 1.0
    bf16: bool = False
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


@dataclass
class SFTConfig(TrainerConfig):
    """Masked-diffusion SFT (LLaDA Eq. 5 on the response; prompt never masked)."""

    lr: float = 1e-4
    eps: float = 1e-3  # t ~ U(eps, 1)
    max_length: int = 1024
    pad_response_to: int = 0  # > 0: pad responses with EOS to this many tokens (LLaDA SFT style)
    eval_batches: int = 4


@dataclass
class DiffuGRPOConfig(TrainerConfig):
    """diffu-GRPO (d1, Zhao et al. 2025). Defaults are d1's published settings."""

    lr: float = 3e-6
    num_generations: int = 6  # G completions per prompt
    num_iterations: int = 12  # mu gradient steps per batch, each with its own mask
    epsilon: float = 0.5  # clip range of the surrogate
    beta: float = 0.04  # KL coefficient (k3 estimator); 0 = no reference model at all
    estimator: str = "mean_field"
    estimator_options: dict = field(default_factory=lambda: {"p_mask_prompt": 0.15})
    scale_rewards: bool = False  # divide advantages by the group std (off in d1)
    rewards: dict = field(default_factory=lambda: {"gsm8k": 1.0})  # reward name -> weight
    reward_timeout_s: float = 10.0
    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    sample_table_every: int = 10


@dataclass
class DPOConfig(TrainerConfig):
    """Diffusion DPO / VRPO. ``n_samples`` is VRPO's budget n (passes per ELBO; for the
    ``coupled`` estimator, n complementary pairs = 2n passes)."""

    lr: float = 1e-6  # TRL DPOConfig's default
    beta: float = 0.1
    estimator: str = "mc_elbo"
    estimator_options: dict = field(default_factory=dict)  # e.g. {"eps": 1e-3, "max_batch": 64}
    n_samples: int = 8
    antithetic: bool = True
    optimal_allocation: bool = True
    max_completion_length: int = 512  # responses longer than this (in tokens, EOS included) are cut
    rpo_alpha: float = 0.0  # > 0: add alpha * per-token NLL of the chosen response (RPO; TRL's rpo_alpha)


def _sudoku_rollout() -> RolloutOptions:
    # 16 digits + EOS in one block, 9 steps: 2 commits per step, so the order matters
    # (scripts/bench_unmask_order.py's setting).
    return RolloutOptions(gen_length=17, block_length=17, steps=9, temperature=0.0)


@dataclass
class UnmaskOrderConfig(TrainerConfig):
    """Unmasking-order learner (DCoLT-style UPM) on outcome rewards; defaults: the Sudoku default."""

    lr: float = 5e-4  # the block's; the gate moves conf_scale x faster
    per_device_batch_size: int = 16  # prompts per step
    num_generations: int = 8  # G rollouts per prompt
    num_iterations: int = 2  # mu updates per batch against the old (rollout) policy
    epsilon: float = 0.2  # clip range of the per-step ratio
    scale_rewards: bool = False  # divide advantages by the group std
    train_dllm: bool = False  # co-train the dLLM (DCoLT): add committed tokens' log-probs
    cache_features: bool = True  # frozen dLLM: reuse the rollout's hidden states (no dLLM pass)
    d_model: int = 128
    n_heads: int = 4
    ff_dim: int = 256
    conf_scale: float = 500.0  # head: multiplier of the confidence gate (its effective lr)
    residual_bound: float = 1.0  # head: the block's score lies in (-bound, bound); 0 = unbounded
    block_kl: float = 0.2  # coefficient of KL(pi || confidence-gate-only pi): pulls the block term to 0
    rewards: dict = field(default_factory=lambda: {"sudoku": 1.0})
    reward_timeout_s: float = 10.0
    rollout: RolloutOptions = field(default_factory=_sudoku_rollout)

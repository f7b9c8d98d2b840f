"""Structured configs behind the Hydra groups in ``configs/``.

The trainer sections reuse the dataclasses of :mod:`rl.config` (their defaults live there and
nowhere else); this module only adds the run-level pieces (model, task, logger, recipe, eval)
and registers everything in Hydra's ConfigStore, so a typo'd key or a wrong type fails while the
config is composed, before any model is built. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from rl import config as rl_config
from rl.config import DiffuGRPOConfig, RolloutOptions, SFTConfig, TrainerConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

RECIPES = ("sft", "grpo", "dpo", "unmask_order", "sft_then_grpo", "eval")
MODEL_FAMILIES = ("tiny", "llada", "dream", "auto")
# what rollout.tiny.build_tiny_model(**overrides) may change (arch + model config fields)
TINY_MODEL_KEYS = ("arch", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "max_position_embeddings", "rope_theta", "hidden_act")
TASKS = ("sudoku4", "countdown", "gsm8k", "math500", "humaneval", "local")


@dataclass
class WandbOptions:
    mode: str = "offline"  # offline | online | disabled
    project: str = "dllm-rl"


@dataclass
class LoggerConfig:
    wandb: WandbOptions = field(default_factory=WandbOptions)


@dataclass
class ModelConfig:
    """The policy: the built-in tiny model, or an HF checkpoint by hub name or local path."""

    name: str = "tiny"  # label in run names and result tables
    path: str | None = None  # hub name or local directory; None = build the tiny model in code
    family: str = "tiny"  # tiny | llada | dream | auto: how the adapter reads the logits
    trust_remote_code: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16
    mask_token_id: int | None = None  # when the tokenizer does not name a mask token
    tiny: dict = field(default_factory=dict)  # overrides of rollout.tiny.TINY_MODEL_DEFAULTS


@dataclass
class TaskConfig:
    """A task from :mod:`rl.tasks`: where its rows come from, how they split, how they score."""

    name: str = "sudoku4"
    path: str | None = None  # local file/folder or hub dataset name (real-data tasks)
    hub_config: str | None = None  # the `name` argument of datasets.load_dataset
    columns: dict = field(default_factory=dict)  # task column -> file column (task=local)
    rewards: dict = field(default_factory=lambda: {"sudoku": 1.0})  # reward name -> weight (GRPO)
    accuracy_reward: str = "sudoku"  # a reward whose value 1.0 means "solved" (eval/accuracy)
    prompt_style: str = "minimal"  # minimal (tiny model) | instruct (real models: d1's format)
    split_seed: int = 1234  # fixes every split, independent of the run seed
    num_sft: int = 256  # labelled rows for the SFT stage (0 = all, for file tasks)
    num_rl: int = 2048  # prompts for RL
    num_val: int = 128  # model selection during training
    num_test: int = 256  # held-out test set (eval/accuracy); never used for selection
    sft_response_pad: int = 0  # see SFTConfig.pad_response_to


@dataclass
class RecipeConfig:
    name: str = "sft_then_grpo"
    select_best: bool = True  # keep the stage checkpoint with the best validation accuracy
    eval_batch_size: int = 128
    plot: bool = True  # reward_curve.png in run_dir
    # recipe=dpo: preference pairs = best vs worst of `pair_samples` policy samples per prompt
    pair_prompts: int = 512  # 0 = every RL prompt
    pair_samples: int = 8
    pair_temperature: float = 1.0


@dataclass
class EvalConfig:
    """The eval recipe: accuracy of one checkpoint on several tasks, lengths and rollout modes."""

    checkpoint: str | None = None  # HF checkpoint dir; None = the model group's weights
    tasks: list[str] = field(default_factory=lambda: ["sudoku4"])
    gen_lengths: list[int] = field(default_factory=list)  # [] = rollout.gen_length
    block_length: int = 32  # used when gen_lengths is set
    steps_per_token: float = 0.5  # d1: steps = gen_length / 2
    num_examples: int = 0  # per task; 0 = the whole test split
    modes: dict = field(default_factory=lambda: {"baseline": {}})  # name -> rollout overrides


@dataclass
class RunConfig:
    """The composed config every recipe receives (``configs/config.yaml``)."""

    run_dir: str = "runs/default"
    seed: int = 0
    resume: bool = False
    device: str = "auto"  # auto | cpu | cuda (launchers set LOCAL_RANK)
    threads: int = 0  # CPU threads for torch; 0 = torch's default (1 is fastest on a busy shared machine)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: Any = None  # an SFTConfig (trainer@sft group)
    rl: Any = None  # a DiffuGRPOConfig / DPO / unmasking-order config (trainer@rl group)


def trainer_schemas() -> dict[str, type]:
    """Trainer group option -> its dataclass. DPO / unmasking-order configs are taken from
    rl.config when they exist there; until then they validate against the shared base."""
    return {
        "sft": SFTConfig,
        "diffu_grpo": DiffuGRPOConfig,
        "dpo": getattr(rl_config, "DPOConfig", TrainerConfig),
        "unmask_order": getattr(rl_config, "UnmaskOrderConfig", TrainerConfig),
    }


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name, cls in trainer_schemas().items():
        cs.store(group="trainer", name=f"{name}_schema", node=cls)


# ---- checks that need more than a type ---------------------------------------------------------

class ConfigError(ValueError):
    """A config value that has the right type but is not allowed; the message names the key."""


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; expected one of: {', '.join(map(str, allowed))}")


def deepspeed_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "deepspeed").glob("*.json"))


def _check_trainer(key: str, cfg) -> None:
    if not isinstance(cfg, TrainerConfig):
        raise ConfigError(f"{key}: no trainer selected (set trainer@{key}=<one of {', '.join(trainer_schemas())}>)")
    _choice(f"{key}.lr_scheduler", cfg.lr_scheduler, ("constant", "cosine"))
    ds = cfg.deepspeed
    if not (ds.endswith(".json") or Path(ds).exists()):
        _choice(f"{key}.deepspeed", ds, deepspeed_names() or ["<configs/deepspeed/*.json>"])
    for name in ("max_steps", "per_device_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{key}.{name}={getattr(cfg, name)} must be >= 1")
    if cfg.lr <= 0:
        raise ConfigError(f"{key}.lr={cfg.lr} must be > 0")
    if isinstance(cfg, DiffuGRPOConfig):
        if cfg.num_generations < 2:
            raise ConfigError(f"{key}.num_generations={cfg.num_generations} must be >= 2 (group-relative advantages)")
        _check_rollout(f"{key}.rollout", cfg.rollout)


def _check_rollout(key: str, ro: RolloutOptions) -> None:
    _choice(f"{key}.remasking", ro.remasking, ("low_confidence", "random"))
    _choice(f"{key}.kv_cache", ro.kv_cache, (None, "prefix", "dual"))
    if ro.gen_length < 1 or ro.block_length < 1 or ro.gen_length % ro.block_length:
        raise ConfigError(f"{key}: gen_length={ro.gen_length} must be a positive multiple of block_length={ro.block_length}")
    blocks = ro.gen_length // ro.block_length
    if ro.steps < blocks or ro.steps % blocks:
        raise ConfigError(f"{key}.steps={ro.steps} must be a positive multiple of the number of blocks ({blocks})")


def validate(cfg: RunConfig) -> RunConfig:
    """Value checks beyond types: closed choices, ranges, and the stages the recipe needs."""
    _choice("recipe", cfg.recipe.name, RECIPES)
    _choice("model.family", cfg.model.family, MODEL_FAMILIES)
    _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    _choice("task.name", cfg.task.name, TASKS)
    _choice("task.prompt_style", cfg.task.prompt_style, ("minimal", "instruct"))
    _choice("logger.wandb.mode", cfg.logger.wandb.mode, ("offline", "online", "disabled"))
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    for key in cfg.model.tiny:
        _choice("model.tiny key", key, TINY_MODEL_KEYS)
    if cfg.model.family != "tiny" and not cfg.model.path:
        raise ConfigError(f"model.path is required for model.family={cfg.model.family!r} (hub name or local dir)")
    _check_rollout("rollout", cfg.rollout)
    for t in cfg.eval.tasks:
        _choice("eval.tasks[]", t, TASKS)
    stages = {"sft": ("sft",), "grpo": ("rl",), "dpo": ("rl",), "unmask_order": ("rl",),
              "sft_then_grpo": ("sft", "rl"), "eval": ()}[cfg.recipe.name]
    for key in stages:
        _check_trainer(key, getattr(cfg, key))
    return cfg

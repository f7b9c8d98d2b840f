"""Structured configs behind the Hydra groups in ``configs/``.

The trainer sections reuse the dataclasses of :mod:`rl.config` (their defaults live there and
nowhere else); this module only adds the run-level pieces (model, task, logger, recipe, eval)
and registers everything in Hydra's ConfigStore, so a typo'd key or a wrong type fails while the
config is composed, before any model is built. Every dataclass checks its values in
``__post_init__`` (ranges, registered names: tasks, rewards, recipes, estimators; each recipe
stage's trainer type), so Python-API users get the same checks as the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from rl.config import (WANDB_MODES, ConfigError, DiffuGRPOConfig, DPOConfig, RolloutOptions,  # noqa: F401
                       SelfDistillConfig, SFTConfig, TrainerConfig, UnmaskOrderConfig, check_choice, check_range,
                       check_rewards)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# The recipe registry: name -> its stages in run order, each (config key, trainer config class).
# The pipeline runs a stage by its class; configs/recipe/<name>.yaml exists for each (tested).
RECIPES: dict[str, tuple[tuple[str, type[TrainerConfig]], ...]] = {
    "sft": (("sft", SFTConfig),),
    "grpo": (("rl", DiffuGRPOConfig),),
    "dpo": (("rl", DPOConfig),),
    "unmask_order": (("rl", UnmaskOrderConfig),),
    "distill": (("distill", SelfDistillConfig),),
    "sft_then_grpo": (("sft", SFTConfig), ("rl", DiffuGRPOConfig)),
    # then self-distillation for parallel decoding (rl/distill.py): the speed-aware recipe
    "sft_grpo_distill": (("sft", SFTConfig), ("rl", DiffuGRPOConfig), ("distill", SelfDistillConfig)),
    "eval": (),
}
# Trainer group options (configs/trainer/<option>.yaml extends <schema>_schema) -> their dataclass.
TRAINER_SCHEMAS: dict[str, type[TrainerConfig]] = {"sft": SFTConfig, "diffu_grpo": DiffuGRPOConfig, "dpo": DPOConfig,
                                                   "unmask_order": UnmaskOrderConfig, "self_distill": SelfDistillConfig}
MODEL_FAMILIES = ("tiny", "llada", "dream", "auto")
# eval.protocol: ours = the task's verifiers; d1 = d1's evaluation (recipes/evaluation.py)
EVAL_PROTOCOLS = ("ours", "d1")
# what rollout.tiny.build_tiny_model(**overrides) may change (arch + model config fields)
TINY_MODEL_KEYS = ("arch", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "max_position_embeddings", "rope_theta", "hidden_act")


def task_names() -> list[str]:
    """The registered tasks (rl.tasks.TASKS; torch-free)."""
    from rl.tasks import TASKS

    return sorted(TASKS)


@dataclass
class WandbOptions:
    mode: str = "offline"  # offline | online | disabled
    project: str = "dllm-rl"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, WANDB_MODES)


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

    def __post_init__(self) -> None:
        check_choice("family", self.family, MODEL_FAMILIES)
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        for key in self.tiny:
            check_choice("tiny key", key, TINY_MODEL_KEYS)
        if self.family != "tiny" and not self.path:
            raise ConfigError(f"path: required for family={self.family!r} (hub name or local dir)")


@dataclass
class TaskConfig:
    """A task from :mod:`rl.tasks`: where its rows come from, how they split, how they score.

    ``rewards`` / ``accuracy_reward`` left empty mean the task's registered defaults; each
    configs/task/<name>.yaml states them, and the composed config holds exactly the file's."""

    name: str = "sudoku4"
    path: str | None = None  # local file/folder or hub dataset name; None: $DLLM_RL_DATA/<task> or the hub
    hub_config: str | None = None  # the `name` argument of datasets.load_dataset
    columns: dict = field(default_factory=dict)  # task column -> file column (task=local)
    rewards: dict = field(default_factory=dict)  # reward name -> weight (GRPO); {} = the task's default
    accuracy_reward: str = ""  # a reward whose value 1.0 means "solved" (eval/accuracy); "" = the task's
    prompt_style: str = "minimal"  # minimal (tiny model) | instruct (real models: d1's format)
    split_seed: int = 1234  # fixes every split, independent of the run seed
    num_sft: int = 256  # labelled rows for the SFT stage (0 = all, for file tasks)
    num_rl: int = 2048  # prompts for RL
    num_val: int = 128  # model selection during training
    num_test: int = 256  # held-out test set (eval/accuracy); never used for selection
    sft_response_pad: int = 0  # see SFTConfig.pad_response_to

    def __post_init__(self) -> None:
        from rewards.registry import check_reward_name
        from rl.tasks import PROMPT_STYLES

        check_choice("name", self.name, task_names())
        check_choice("prompt_style", self.prompt_style, PROMPT_STYLES)
        check_rewards("rewards", self.rewards)
        if self.accuracy_reward:
            try:
                check_reward_name(self.accuracy_reward)
            except KeyError as e:
                raise ConfigError(f"accuracy_reward: {e.args[0]}") from None
        for key, col in self.columns.items():
            if not isinstance(col, str):
                raise ConfigError(f"columns.{key}={col!r}: expected the name of a column in the data")
        for name in ("num_sft", "num_rl", "num_val", "num_test", "sft_response_pad"):
            check_range(name, getattr(self, name), low=0)


@dataclass
class RecipeConfig:
    name: str = "sft_grpo_distill"
    select_best: bool = True  # keep the stage checkpoint with the best validation accuracy
    eval_batch_size: int = 128
    plot: bool = True  # reward_curve.png in run_dir
    final_eval: bool = False  # training recipes: then the eval table (eval.*) of the final checkpoint -> <run_dir>/eval
    # recipe=dpo: preference pairs = best vs worst of `pair_samples` policy samples per prompt
    pair_prompts: int = 512  # 0 = every RL prompt
    pair_samples: int = 8
    pair_temperature: float = 1.0

    def __post_init__(self) -> None:
        check_choice("name", self.name, list(RECIPES))
        check_range("eval_batch_size", self.eval_batch_size, low=1)
        check_range("pair_prompts", self.pair_prompts, low=0)
        check_range("pair_samples", self.pair_samples, low=2)
        check_range("pair_temperature", self.pair_temperature, low=0)


@dataclass
class EvalConfig:
    """The eval recipe: accuracy of one checkpoint on several tasks, lengths and rollout modes."""

    checkpoint: str | None = None  # HF checkpoint dir; None = the model group's weights
    tasks: list[str] = field(default_factory=list)  # [] = the run's task (task.name)
    gen_lengths: list[int] = field(default_factory=list)  # [] = rollout.gen_length
    block_length: int = 32  # used when gen_lengths is set
    steps_per_token: float = 0.5  # d1: steps = gen_length / 2
    num_examples: int = 0  # per task; 0 = the whole test split
    modes: dict = field(default_factory=lambda: {"baseline": {}})  # name -> rollout overrides
    # d1: d1's prompts, lengths (default 128/256/512) and greedy decoding; generations in d1's JSON
    # layout under <run_dir>/generations; accuracy by our verifiers and by d1's parse rules
    protocol: str = "ours"

    def __post_init__(self) -> None:
        for t in self.tasks:
            check_choice("tasks[]", t, task_names())
        check_choice("protocol", self.protocol, EVAL_PROTOCOLS)
        if self.protocol == "d1":
            from rl.tasks.d1 import D1_TASKS

            for t in self.tasks:
                if t not in D1_TASKS:
                    raise ConfigError(f"tasks[]={t!r}: protocol=d1 evaluates d1's tasks only ({', '.join(D1_TASKS)})")
        for n in self.gen_lengths:
            check_range("gen_lengths[]", n, low=1)
        check_range("block_length", self.block_length, low=1)
        check_range("steps_per_token", self.steps_per_token, low=0, low_open=True)
        check_range("num_examples", self.num_examples, low=0)
        known = set(RolloutOptions.__dataclass_fields__)
        for mode, overrides in self.modes.items():
            if not hasattr(overrides, "items"):
                raise ConfigError(f"modes.{mode}={overrides!r}: expected a dict of rollout options")
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ConfigError(f"modes.{mode}: unknown rollout option(s) {unknown}; known: {sorted(known)}")


@dataclass
class PlanConfig:
    """``dllm-rl plan`` (the per-GPU memory table of the composed run) and the memory check at
    preflight (recipes/plan.py)."""

    gpu_memory_gib: float = 0.0  # memory of one GPU; 0 = the visible GPU's (none visible: 80)
    world_size: int = 0  # processes of the run; 0 = this launch's (`dllm-rl plan`: $WORLD_SIZE, else 8)
    check: bool = True  # CUDA runs: stop at preflight when a stage is predicted not to fit (false: run anyway)

    def __post_init__(self) -> None:
        check_range("gpu_memory_gib", self.gpu_memory_gib, low=0)
        check_range("world_size", self.world_size, low=0)


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
    task: TaskConfig = field(default_factory=TaskConfig)  # the RL task; validation and test come from it
    sft_task: TaskConfig | None = None  # the SFT stage's rows (task@sft_task=s1k); None = task's own sft split
    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    sft: Any = None  # an SFTConfig (trainer@sft group)
    rl: Any = None  # a DiffuGRPOConfig / DPO / unmasking-order config (trainer@rl group)
    distill: Any = None  # a SelfDistillConfig (trainer@distill group; recipe=sft_grpo_distill)

    def __post_init__(self) -> None:
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.eval.protocol == "d1" and not self.eval.tasks:
            from rl.tasks.d1 import D1_TASKS

            if self.task.name not in D1_TASKS:
                raise ConfigError(f"eval.protocol=d1: evaluates d1's tasks only ({', '.join(D1_TASKS)}); task is "
                                  f"{self.task.name!r} (set eval.tasks=[...])")
        check_range("threads", self.threads, low=0)
        for key, cls in RECIPES[self.recipe.name]:
            stage = getattr(self, key)
            if not isinstance(stage, cls):
                got = "no trainer" if stage is None else f"a {type(stage).__name__}"
                raise ConfigError(stage_mismatch(key, self.recipe.name, cls, got))
            trains_dllm = not isinstance(stage, UnmaskOrderConfig) or stage.train_dllm
            if self.model.dtype != "float32" and not stage.bf16 and trains_dllm and not stage.lora.enabled:
                raise ConfigError(f"{key}.bf16=false: model.dtype={self.model.dtype} weights would be updated by AdamW "
                                  f"with no fp32 master copy; set {key}.bf16=true (DeepSpeed keeps fp32 master "
                                  f"weights) or model.dtype=float32")
            if stage.lora.load_in_4bit:
                if "zero3" in str(stage.deepspeed):
                    raise ConfigError(f"{key}.lora.load_in_4bit: 4-bit weights cannot be ZeRO-3 partitioned; use "
                                      f"{key}.deepspeed=zero2 (d1's setting) or zero0")
                backend = getattr(getattr(stage, "rollout", None), "backend", self.rollout.backend)
                if backend != "torch":
                    raise ConfigError(f"{key}.lora.load_in_4bit: the vLLM engine cannot take 4-bit weights from the "
                                      f"trainer; use rollout.backend=torch")
            if isinstance(stage, UnmaskOrderConfig) and self.rollout.backend != "torch":
                raise ConfigError(f"rollout.backend={self.rollout.backend}: recipe {self.recipe.name} reads the dLLM's "
                                  "logits and hidden states at every step, which only backend=torch gives")
            if isinstance(stage, (DiffuGRPOConfig, UnmaskOrderConfig)):
                # a recipe scores with the task's rewards: nothing else may look like it is used
                if stage.reward_weights is not None:
                    raise ConfigError(f"{key}.reward_weights: weighs a Python trainer's reward_funcs; recipes "
                                      f"take weights from task.rewards={{name: weight}}")
                if self.task.rewards and dict(stage.rewards) != dict(self.task.rewards):
                    raise ConfigError(f"{key}.rewards={dict(stage.rewards)}: recipes score with the task's rewards; "
                                      f"set task.rewards instead (now {dict(self.task.rewards)})")

    @property
    def run_name(self) -> str:
        """``<recipe>-<task>-<model>-seed<S>``: the W&B run name (one group per pipeline)."""
        return f"{self.recipe.name}-{self.task.name}-{self.model.name}-seed{self.seed}"


def stage_mismatch(key: str, recipe: str, cls: type, got: str) -> str:
    """The one line for a recipe stage whose trainer is not the kind the recipe runs there."""
    options = [o for o, c in TRAINER_SCHEMAS.items() if c is cls]
    return (f"{key}: recipe {recipe} runs {cls.__name__} at this stage but got {got}; "
            f"select trainer@{key}=<{' or '.join(trainer_options(options))}>")


def trainer_options(schemas: list[str]) -> list[str]:
    """configs/trainer/*.yaml options that extend one of the given ``<schema>_schema`` nodes."""
    out = []
    for path in sorted((CONFIG_DIR / "trainer").glob("*.yaml")):
        head = path.read_text().split("_self_", 1)[0]
        if any(f"- {s}_schema" in head for s in schemas):
            out.append(path.stem)
    return out


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name, cls in TRAINER_SCHEMAS.items():
        cs.store(group="trainer", name=f"{name}_schema", node=cls)

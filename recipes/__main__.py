"""``dllm-rl`` / ``python -m recipes``: compose the config from Hydra overrides and run a recipe.

    dllm-rl                                  # SFT then diffu-GRPO on the tiny model, Sudoku 4x4
    dllm-rl seed=1 rl.max_steps=50           # any key of the composed config
    dllm-rl recipe=eval eval.checkpoint=runs/.../rl/final eval.tasks=[sudoku4,countdown]
    dllm-rl experiment=llada_gsm8k           # d1 on LLaDA-8B-Instruct (GPU): SFT on s1K, GRPO on GSM8K, d1's eval
    dllm-rl task=gsm8k task@sft_task=s1k     # each stage its own task (validation and test: the RL task)
    dllm-rl --cfg [overrides]                # print the composed config and exit
    dllm-rl plan [overrides]                 # per-GPU memory of the run, item by item (plan.world_size, plan.gpu_memory_gib)
    dllm-rl --help

A bad config or bad data (an override, a file, a split the recipe needs, prompts longer than the
model's positions) exits with status 2 and one line on stderr, before any training starts.
"""

from __future__ import annotations

import os
import sys

USAGE = __doc__


def registries() -> dict[str, list[str]]:
    """What the RL stage can be built from, read from the registries (the only lists)."""
    from rl.advantages import ADVANTAGES, SCALE_REWARDS
    from rl.aggregation import LOSS_TYPES
    from rl.estimators import ESTIMATORS
    from rl.objectives import OBJECTIVES
    from rewards.registry import registered_rewards

    return {"objective": OBJECTIVES.names(), "estimator": ESTIMATORS.names(), "advantage": ADVANTAGES.names(),
            "scale_rewards": list(SCALE_REWARDS), "loss_type": LOSS_TYPES.names(), "rewards": registered_rewards()}


def _help() -> str:
    from recipes.config import GROUPS, group_options

    lines = [USAGE.strip(), "", "Config groups (pick with group=option):"]
    for g in GROUPS:
        lines.append(f"  {g:<12} {', '.join(group_options(g))}")
    lines.append("\nRegistered (rl.<key>=name; options in rl.<key>_options where there are any):")
    for key, names in registries().items():
        lines.append(f"  {key:<14} {', '.join(names)}")
    lines.append("\nTop-level keys: run_dir, seed, resume, device, logger.wandb.mode, sft.*, rl.*, "
                 "task.*, sft_task.*, model.*, rollout.*, recipe.*, eval.*, plan.* (see --cfg)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(_help())
        return 0
    if args[:1] == ["plan"]:
        return _plan(args[1:])
    print_cfg = "--cfg" in args
    overrides = [a for a in args if a != "--cfg"]
    bad = [a for a in overrides if a.startswith("-")]
    if bad:
        print(f"dllm-rl: unknown option {bad[0]!r}; pass Hydra overrides key=value (see --help)", file=sys.stderr)
        return 2

    from recipes.config import load_config
    from recipes.schema import ConfigError

    notes: list[str] = []
    try:
        cfg = load_config(overrides, notes=notes)
    except ConfigError as e:
        print(f"dllm-rl: config error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        for line in notes:  # e.g. a rollout.<key>=... that a stage's own setting shadows
            print(f"[dllm-rl] note: {line}", flush=True)
    if print_cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0

    from recipes.pipeline import run  # heavy imports (torch, deepspeed) start here
    from rl.tasks import DataError

    try:
        run(cfg, overrides=overrides)
    except (ConfigError, DataError) as e:
        kind = "data" if isinstance(e, DataError) else "config"
        print(f"dllm-rl: {kind} error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def _plan(overrides: list[str]) -> int:
    """``dllm-rl plan``: 0 when every stage fits, 1 when one does not, 2 on a bad config. Offline:
    the model's config and the task's rows are read from disk (or the hub cache) only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from recipes.plan import main as plan_main
    from recipes.schema import ConfigError

    try:
        return plan_main(overrides)
    except ConfigError as e:
        print(f"dllm-rl: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Every recipe, 3 steps, on the tiny LLaDA and Dream fixtures: full fine-tuning and LoRA, with
gradient checkpointing, under a given DeepSpeed config. Run in-process (one rank) by
tests/test_models_training.py, or once per rank under a launcher:

    torchrun --nproc_per_node 2 -m tests.helpers.recipe_matrix ROOT --zero zero3 --folders LLADA DREAM

Case ``<family>-<recipe>-<full|lora>`` runs in ``ROOT/<case>`` through the CLI entry point
(``recipes.__main__.main``); ``ROOT/<case>/exit_code`` records its exit status.
"""

from __future__ import annotations

import argparse
from pathlib import Path

RECIPES = ("sft", "grpo", "dpo", "unmask_order", "eval")
SMALL_TASK = ["task.num_sft=8", "task.num_rl=8", "task.num_val=4", "task.num_test=4"]
# A random fixture solves no puzzle, so the Sudoku reward is 0 for every sample: nothing to learn.
# The reward-driven recipes use this one instead, which random text already spreads.
DIGIT_REWARD = "task.rewards={helpers.recipe_matrix.digit_share: 1.0}"


def digit_share(prompts, completions, **columns) -> list[float]:
    """Fraction of a completion's characters that are digits (TRL's reward signature)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def objective_recipes() -> list[str]:
    """``grpo.<objective>`` for every registered objective other than the default diffu_grpo
    (which the plain ``grpo`` cases run): the trainer with that objective and its own estimator."""
    from rl.objectives import OBJECTIVES

    return [f"grpo.{name}" for name in OBJECTIVES.names() if name != "diffu_grpo"]


def cases(families=("llada", "dream")) -> list[tuple[str, str, str]]:
    """(family, recipe, variant): eval has no training, so one variant; each other objective runs
    full fine-tuning on LLaDA and LoRA on Dream."""
    out = [(f, r, v) for f in families for r in RECIPES for v in (("full",) if r == "eval" else ("full", "lora"))]
    pick = {"llada": "full", "dream": "lora"}
    return out + [(f, r, pick[f]) for r in objective_recipes() for f in families if f in pick]


def case_name(family: str, recipe: str, variant: str) -> str:
    return f"{family}-{recipe}-{variant}"


def overrides(family: str, recipe: str, variant: str, folder: str | Path, run_dir: str | Path,
              zero: str = "zero0") -> list[str]:
    """CLI overrides of one case (``grpo.<objective>``: the grpo recipe with ``rl.objective``)."""
    recipe, _, objective = recipe.partition(".")
    out = [f"recipe={recipe}", f"model.path={folder}", f"model.name={family}-fixture", f"run_dir={run_dir}",
           "seed=0", "logger.wandb.mode=disabled", "recipe.plot=false", "recipe.eval_batch_size=8", *SMALL_TASK]
    if recipe == "eval":
        return out + [f"eval.checkpoint={folder}"]
    key = "sft" if recipe == "sft" else "rl"
    out += [f"{key}.max_steps=3", f"{key}.eval_steps=2", f"{key}.warmup_steps=0", f"{key}.deepspeed={zero}",
            f"{key}.gradient_checkpointing=true"]
    if variant == "lora":
        out += [f"{key}.lora.enabled=true", f"{key}.lora.r=4", f"{key}.lora.alpha=8", f"{key}.lora.dropout=0.0"]
    if recipe == "sft":
        out += ["sft.per_device_batch_size=4"]
    elif recipe == "grpo":
        out += [DIGIT_REWARD, "rl.per_device_prompts=2", "rl.num_generations=4", "rl.num_iterations=2"]
        if objective:
            out += [f"rl.objective={objective}"]
    elif recipe == "dpo":
        out += [DIGIT_REWARD, "rl.per_device_batch_size=2", "recipe.pair_prompts=8", "recipe.pair_samples=4",
                "recipe.pair_temperature=2.0"]
    elif recipe == "unmask_order":
        out += [DIGIT_REWARD, "rl.per_device_prompts=2", "rl.num_generations=4", "rl.num_iterations=1", "rl.d_model=32",
                "rl.n_heads=2", "rl.ff_dim=32", "rl.rollout.temperature=1.5",
                *(["rl.train_dllm=true"] if variant == "lora" else [])]
    return out


def run(root: Path, folders: dict[str, str], zero: str, only: list[str] | None = None) -> None:
    from recipes.__main__ import main

    for family, recipe, variant in cases(tuple(folders)):
        name = case_name(family, recipe, variant)
        if only and name not in only:
            continue
        run_dir = root / name
        code = main(overrides(family, recipe, variant, folders[family], run_dir, zero))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "exit_code").write_text(str(code))


def _cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--zero", default="zero0")
    parser.add_argument("--llada", required=True)
    parser.add_argument("--dream", required=True)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    run(args.root, {"llada": args.llada, "dream": args.dream}, args.zero, args.only)


if __name__ == "__main__":
    _cli()

"""The recipes: thin scripts that build the parts from the config and run stages (torchtune style).

    sft            masked-diffusion SFT                      -> <run_dir>/sft
    grpo           diffu-GRPO from the model group            -> <run_dir>/rl
    dpo            diffusion DPO on verifier-ranked pairs     -> <run_dir>/rl
    unmask_order   unmasking-order policy for a frozen dLLM   -> <run_dir>/rl
    sft_then_grpo  SFT, then diffu-GRPO from the SFT checkpoint (the default)
    eval           accuracy table of one checkpoint           -> <run_dir>/results.{md,json}

Every training stage: build the policy, the task's rows and a validation ``eval_fn``, run the
trainer, then evaluate the stage's checkpoint on the task's held-out test split. With
``recipe.select_best`` the checkpoint is the one with the best *validation* accuracy (written
to ``<stage>/best`` at each evaluation); the test split is never used for selection.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from recipes import report
from recipes.evaluation import eval_rollouts, evaluate_rows, write_results
from recipes.preflight import check_eval, check_training
from recipes.schema import RECIPES, DiffuGRPOConfig, DPOConfig, RunConfig, SFTConfig, TaskConfig, UnmaskOrderConfig
from rl.tasks import Task, build_task
from rl.tracking import run_context
from rollout import PolicyAdapter, build_tiny_policy

STAGE_DIRS = {"sft": "sft", "rl": "rl"}
OWNED_OUTPUTS = ("sft", "rl", "final", "metrics.jsonl", "summary.json", "reward_curve.png", "results.md",
                 "results.json", "wandb_group.txt")


# ---- building blocks -----------------------------------------------------------------------------

def target_device(cfg: RunConfig) -> torch.device:
    from rl.engine import device

    return torch.device("cpu") if cfg.device == "cpu" else device()


def build_policy(cfg: RunConfig, path: str | Path | None = None) -> PolicyAdapter:
    """The policy of the model group, or the HF checkpoint at ``path`` (a stage's output)."""
    m = cfg.model
    path = path or m.path
    if path is None:
        policy = build_tiny_policy(seed=cfg.seed, **dict(m.tiny))
    else:
        # llada / dream force the logit convention; otherwise the checkpoint's model_type decides
        shifted = {"dream": True, "llada": False}.get(m.family)
        dtype = None if m.dtype == "float32" else m.dtype
        policy = PolicyAdapter.from_pretrained(str(path), mask_token_id=m.mask_token_id, logits_shifted=shifted,
                                               dtype=dtype, trust_remote_code=m.trust_remote_code)
    return policy.to(target_device(cfg))


def make_val_fn(cfg: RunConfig, task: Task, stage_dir: Path, *, prefix: str = "eval/val_"):
    """``eval_fn(module, step)`` for the trainer: validation accuracy; with ``select_best`` the
    best-so-far weights are exported to ``stage_dir/best`` (HF format) with ``best.json``."""
    from rl.checkpoint import export_hf

    rows = task.rows("val")
    state = {"best": -1.0}
    best_json = stage_dir / "best.json"
    if cfg.resume and best_json.exists():
        state["best"] = json.loads(best_json.read_text())["val_accuracy"]

    def eval_fn(module, step: int) -> dict:
        # this rank's full weights (gathered under ZeRO-3): ranks must agree on it
        state["param_checksum"] = float(sum(p.detach().double().sum() for p in module.parameters()))
        if not rows:
            return {}
        metrics = evaluate_rows(module, task, rows, cfg.rollout, batch_size=cfg.recipe.eval_batch_size,
                                seed=cfg.seed, prefix=prefix)
        acc = metrics[f"{prefix}accuracy"]
        if cfg.recipe.select_best and acc > state["best"]:
            state["best"] = acc
            export_hf(module, module.tokenizer, stage_dir / "best")
            if _is_main():
                best_json.write_text(json.dumps({"step": step, "val_accuracy": acc}))
        return {k: v for k, v in metrics.items() if not k.endswith(("seconds", "num_examples", "forward_passes"))}

    eval_fn.state = state
    return eval_fn


def stage_checkpoint(cfg: RunConfig, stage_dir: Path) -> Path:
    """The checkpoint a stage hands on: ``best`` (validation-selected) or ``final``."""
    best = stage_dir / "best"
    return best if cfg.recipe.select_best and best.is_dir() else stage_dir / "final"


def test_eval(cfg: RunConfig, task: Task, checkpoint: Path) -> dict:
    """``eval/accuracy`` (exact solve) and ``eval/reward`` of a checkpoint on the test split."""
    policy = build_policy(cfg, checkpoint).eval()
    return evaluate_rows(policy, task, task.rows("test"), cfg.rollout, batch_size=cfg.recipe.eval_batch_size,
                         seed=cfg.seed)


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _stage_config(trainer_cfg, stage_dir: Path):
    return dataclasses.replace(trainer_cfg, run_dir=str(stage_dir))


# ---- stages --------------------------------------------------------------------------------------

def run_sft(cfg: RunConfig, task: Task, run_dir: Path, init: Path | None = None) -> dict:
    from rl.sft import SFTTrainer

    stage_dir = run_dir / STAGE_DIRS["sft"]
    rows = task.rows("sft")
    if not rows:
        raise ValueError(f"task {task.name!r} has no labelled rows for SFT (task.num_sft / the data's responses)")
    policy = build_policy(cfg, init)
    t0 = time.perf_counter()
    val_fn = make_val_fn(cfg, task, stage_dir)
    trainer = SFTTrainer(_stage_config(cfg.sft, stage_dir), policy, rows,
                         eval_dataset=[r for r in task.rows("val") if "response" in r], eval_fn=val_fn)
    last = trainer.train()
    return _finish_stage(cfg, task, stage_dir, last, time.perf_counter() - t0, val_fn)


def run_grpo(cfg: RunConfig, task: Task, run_dir: Path, init: Path | None = None) -> dict:
    from rl.grpo import DiffuGRPOTrainer

    stage_dir = run_dir / STAGE_DIRS["rl"]
    policy = build_policy(cfg, init)
    t0 = time.perf_counter()
    val_fn = make_val_fn(cfg, task, stage_dir)
    trainer = DiffuGRPOTrainer(_stage_config(cfg.rl, stage_dir), policy, task.rows("rl"), eval_fn=val_fn,
                               reward_fn=task.reward_fn())
    last = trainer.train()
    return _finish_stage(cfg, task, stage_dir, last, time.perf_counter() - t0, val_fn)


def run_dpo(cfg: RunConfig, task: Task, run_dir: Path, init: Path | None = None) -> dict:
    """Diffusion DPO on pairs (best vs worst of G samples, ranked by the task's verifier) drawn
    once from the initial policy (offline DPO on self-generated data)."""
    from rl import dpo
    from rl.pairs import build_preference_pairs
    from rl.trainer import seeded_generator

    stage_dir = run_dir / STAGE_DIRS["rl"]
    policy = build_policy(cfg, init)
    base = cfg.rl
    dpo_cfg = base if isinstance(base, dpo.DPOConfig) else dpo.DPOConfig(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    rc = cfg.recipe
    prompts = task.rows("rl")[:rc.pair_prompts] if rc.pair_prompts > 0 else task.rows("rl")
    pairs = build_preference_pairs(policy, prompts, task.reward_fn(), num_generations=rc.pair_samples,
                                   rollout=dataclasses.replace(cfg.rollout, temperature=rc.pair_temperature),
                                   generator=seeded_generator(cfg.seed, "pairs", 0, next(policy.parameters()).device),
                                   batch_size=rc.eval_batch_size)
    if not pairs:
        raise ValueError(f"dpo: no preference pairs from {len(prompts)} prompts (every group tied); raise "
                         f"recipe.pair_samples or recipe.pair_temperature")
    t0 = time.perf_counter()
    val_fn = make_val_fn(cfg, task, stage_dir)
    trainer = dpo.DiffusionDPOTrainer(_stage_config(dpo_cfg, stage_dir), policy, pairs, eval_fn=val_fn)
    last = trainer.train()
    return _finish_stage(cfg, task, stage_dir, last, time.perf_counter() - t0, val_fn)


def run_unmask_order(cfg: RunConfig, task: Task, run_dir: Path, init: Path | None = None) -> dict:
    from recipes.unmask import train_unmask_order

    stage_dir = run_dir / STAGE_DIRS["rl"]
    t0 = time.perf_counter()
    result = train_unmask_order(cfg, task, stage_dir, build_policy(cfg, init))
    return {**result, "train_wall_time_s": time.perf_counter() - t0}


def _finish_stage(cfg: RunConfig, task: Task, stage_dir: Path, last: dict, seconds: float, val_fn=None) -> dict:
    ckpt = stage_checkpoint(cfg, stage_dir)
    result = {"checkpoint": str(ckpt), "train_wall_time_s": seconds,
              "train": {k: v for k, v in last.items() if not k.startswith("timing/")}}
    if val_fn is not None and "param_checksum" in val_fn.state:
        result["param_checksum"] = val_fn.state["param_checksum"]
    if (stage_dir / "best.json").exists() and cfg.recipe.select_best:
        result["selected"] = json.loads((stage_dir / "best.json").read_text())
    result.update(test_eval(cfg, task, ckpt))
    return result


STAGES = {"sft": run_sft, "grpo": run_grpo, "dpo": run_dpo, "unmask_order": run_unmask_order}
# the stage each trainer config runs; PIPELINES follows the recipe registry (recipes.schema.RECIPES)
STAGE_OF = {SFTConfig: "sft", DiffuGRPOConfig: "grpo", DPOConfig: "dpo", UnmaskOrderConfig: "unmask_order"}
PIPELINES = {name: [(key, STAGE_OF[cls]) for key, cls in stages] for name, stages in RECIPES.items() if stages}


# ---- entry points --------------------------------------------------------------------------------

def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create ``run_dir``; a fresh (non-resumed) run removes the previous run's outputs there."""
    run_dir = Path(cfg.run_dir)
    if not cfg.resume and run_dir.exists() and _is_main():
        for name in OWNED_OUTPUTS:
            p = run_dir / name
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
        for p in run_dir.glob("rank*.done.json"):
            p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_training(cfg: RunConfig, overrides: list[str] | None = None) -> dict:
    """Run the recipe's stages in order, each starting from the previous stage's checkpoint."""
    from rl.engine import init_distributed

    init_distributed()
    task = build_task(cfg.task)
    check_training(cfg, task, _world_size())
    run_dir = prepare_run_dir(cfg)
    _barrier()
    group = wandb_group(cfg, run_dir)
    t0 = time.perf_counter()
    summary: dict = {"recipe": cfg.recipe.name, "task": task.name, "model": cfg.model.name, "seed": cfg.seed,
                     "overrides": list(overrides or [])}
    init = None
    for key, stage in PIPELINES[cfg.recipe.name]:
        if _is_main():
            print(f"[dllm-rl] stage {key} ({stage}) -> {run_dir / STAGE_DIRS[key]}", flush=True)
        with run_context(name=cfg.run_name, group=group, job_type=key, config=dataclasses.asdict(cfg)):
            summary[key] = STAGES[stage](cfg, task, run_dir, init)
        init = Path(summary[key]["checkpoint"])
        if _is_main():
            report.merge_metrics(run_dir, [k for k, _ in PIPELINES[cfg.recipe.name] if k in summary])
    summary["wall_time_s"] = time.perf_counter() - t0
    if _is_main():
        final = run_dir / "final"
        if final.is_symlink() or final.exists():
            final.unlink() if final.is_symlink() else shutil.rmtree(final)
        final.symlink_to(init.relative_to(run_dir) if init.is_relative_to(run_dir) else init.resolve())
        if "sft" in summary and "rl" in summary:
            summary["lift"] = summary["rl"]["eval/accuracy"] - summary["sft"]["eval/accuracy"]
        (run_dir / "summary.json").write_text(json.dumps(report.json_safe(summary), indent=2, allow_nan=False))
        if cfg.recipe.plot:
            report.plot_curves(run_dir)
        report.print_outputs(run_dir, summary)
    _write_rank_marker(run_dir, summary)
    return summary


def run_eval(cfg: RunConfig) -> list[dict]:
    """Accuracy of one checkpoint on ``eval.tasks`` x generation lengths x rollout modes."""
    from rl.engine import init_distributed

    init_distributed()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for name in cfg.eval.tasks:
        task = build_task(cfg.task if name == cfg.task.name else load_task_config(name))
        rows = task.rows("test")
        rows = rows[:cfg.eval.num_examples] if cfg.eval.num_examples > 0 else rows
        check_eval(cfg, task, rows)
        tasks[name] = (task, rows)
    policy = build_policy(cfg, cfg.eval.checkpoint).eval()
    results = []
    for name, (task, rows) in tasks.items():
        for mode, ro in eval_rollouts(cfg.rollout, list(cfg.eval.gen_lengths), cfg.eval.block_length,
                                      cfg.eval.steps_per_token, dict(cfg.eval.modes)):
            m = evaluate_rows(policy, task, rows, ro, batch_size=cfg.recipe.eval_batch_size, seed=cfg.seed, prefix="")
            results.append({"task": name, "mode": mode, "gen_length": ro.gen_length, "block_length": ro.block_length,
                            "steps": ro.steps, **m})
            if _is_main():
                print(f"[dllm-rl] {name} gen={ro.gen_length} mode={mode}: accuracy {100 * m['accuracy']:.1f}% "
                      f"({int(m['num_examples'])} examples, {m['seconds']:.1f}s)", flush=True)
    if _is_main():
        ckpt = cfg.eval.checkpoint or cfg.model.path or f"{cfg.model.name} (built in, seed {cfg.seed})"
        md, js = write_results(results, run_dir, f"dllm-rl eval: {ckpt}")
        print(f"[dllm-rl] results: {md} and {js}", flush=True)
    return results


def load_task_config(name: str) -> TaskConfig:
    """configs/task/<name>.yaml as a TaskConfig (for eval over several tasks)."""
    from omegaconf import OmegaConf

    from recipes.schema import CONFIG_DIR

    node = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(CONFIG_DIR / "task" / f"{name}.yaml"))
    return OmegaConf.to_object(node)


def run(cfg: RunConfig, overrides: list[str] | None = None):
    """Dispatch on ``recipe.name``."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.recipe.name == "eval":
        return run_eval(cfg)
    return run_training(cfg, overrides)


def wandb_group(cfg: RunConfig, run_dir: Path) -> str:
    """One W&B group per pipeline: ``<run name>-<start time>``, kept in run_dir for a resumed run."""
    path = run_dir / "wandb_group.txt"
    if cfg.resume and path.exists():
        return path.read_text().strip()
    group = f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if _is_main():
        path.write_text(group)
    return group


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write_rank_marker(run_dir: Path, summary: dict) -> None:
    """``rank<r>.done.json`` per process in multi-process runs: the final metrics each rank saw,
    so launchers/tests can check that every rank finished and that they agree."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    last_key = PIPELINES.get(summary.get("recipe"), [("rl", "")])[-1][0]
    stage = summary.get(last_key, {})
    marker = {"rank": dist.get_rank(), "world_size": dist.get_world_size(),
              "train": stage.get("train", {}), "eval/accuracy": stage.get("eval/accuracy"),
              "param_checksum": stage.get("param_checksum")}
    (run_dir / f"rank{dist.get_rank()}.done.json").write_text(json.dumps(marker, indent=2, sort_keys=True))

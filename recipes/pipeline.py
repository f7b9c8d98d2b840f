"""The recipes: thin scripts that build the parts from the config and run stages (torchtune style).

    sft            masked-diffusion SFT                      -> <run_dir>/sft
    grpo           diffu-GRPO from the model group            -> <run_dir>/rl
    dpo            diffusion DPO on verifier-ranked pairs     -> <run_dir>/rl
    unmask_order   unmasking-order policy for a frozen dLLM   -> <run_dir>/rl
    sft_then_grpo  SFT, then diffu-GRPO from the SFT checkpoint (the default)
    distill        self-distillation for parallel decoding     -> <run_dir>/distill
    sft_grpo_distill  SFT, diffu-GRPO, then self-distillation for parallel decoding
    eval           accuracy table of one checkpoint           -> <run_dir>/results.{md,json}

Every training stage: build the policy, the task's rows and a validation ``eval_fn``, run the
trainer, then evaluate the stage's checkpoint on the task's held-out test split. With
``recipe.select_best`` the checkpoint is the one with the best *validation* accuracy (written
to ``<stage>/best`` at each evaluation); the test split is never used for selection.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import torch

from recipes import report
from recipes.evaluation import d1_rollout, eval_rollouts, evaluate_rows, evaluate_rows_d1, write_results
from recipes.preflight import check_eval, check_training
from recipes.schema import (RECIPES, ConfigError, DiffuGRPOConfig, DPOConfig, RunConfig, SelfDistillConfig, SFTConfig,
                            TaskConfig, UnmaskOrderConfig)
from rl import distributed as D
from rl.engine import release_memory
from rl.tasks import DataError, Task, build_task
from rl.tasks.d1 import D1_GEN_LENGTHS, D1_TASKS
from rl.tracking import run_context
from rollout import PolicyAdapter, build_tiny_policy
from rollout.engine import RolloutEngine, build_rollout_engine

STAGE_DIRS = {"sft": "sft", "rl": "rl", "distill": "distill"}
OWNED_OUTPUTS = ("sft", "rl", "distill", "eval", "final", "metrics.jsonl", "summary.json", "reward_curve.png", "results.md",
                 "results.json", "generations", "wandb_group.txt")


# ---- building blocks -----------------------------------------------------------------------------

def target_device(cfg: RunConfig) -> torch.device:
    from rl.engine import device

    return torch.device("cpu") if cfg.device == "cpu" else device()


def build_policy(cfg: RunConfig, path: str | Path | None = None, *, load_in_4bit: bool = False) -> PolicyAdapter:
    """The policy of the model group, or the HF checkpoint at ``path`` (a stage's output), in
    ``model.dtype`` (the built-in tiny model is cast to it); ``load_in_4bit``: QLoRA's frozen base
    (:func:`quantization_config`; the layers it does not quantize are in ``model.dtype``)."""
    m = cfg.model
    path = path or m.path
    dtype = getattr(torch, m.dtype)
    if path is None:
        if load_in_4bit:
            raise ConfigError("lora.load_in_4bit: the built-in tiny model is built in code, not loaded; 4-bit "
                              "loading needs a checkpoint (model.path=<dir>)")
        policy = build_tiny_policy(seed=cfg.seed, **dict(m.tiny))
        return policy.to(device=target_device(cfg), dtype=dtype)
    # llada / dream force the logit convention; otherwise the checkpoint's model_type decides
    shifted = {"dream": True, "llada": False}.get(m.family)
    extra = {}
    if load_in_4bit:  # bitsandbytes places the quantized weights itself
        extra = {"quantization_config": quantization_config(), "device_map": {"": target_device(cfg)}}
    # the dtype as asked: transformers 5 would otherwise load the checkpoint's own (LLaDA's: bf16)
    policy = PolicyAdapter.from_pretrained(str(path), mask_token_id=m.mask_token_id, logits_shifted=shifted,
                                           dtype=dtype, trust_remote_code=m.trust_remote_code, **extra)
    loaded = {p.dtype for p in policy.parameters() if p.is_floating_point()}
    if loaded - {dtype}:
        raise RuntimeError(f"model.dtype={m.dtype}: {path} loaded as {sorted(map(str, loaded))}")
    return policy if load_in_4bit else policy.to(target_device(cfg))


def quantization_config():
    """d1's 4-bit loading (``diffu_grpo_train.py``): bitsandbytes NF4, double quantization, bf16 compute."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("lora.load_in_4bit: bitsandbytes is not installed (pip install -e .[qlora])") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16)


def stage_policy(cfg: RunConfig, stage_cfg, init: Path | None) -> PolicyAdapter:
    """The policy a training stage starts from (4-bit when its LoRA options say so)."""
    return build_policy(cfg, init, load_in_4bit=bool(getattr(stage_cfg.lora, "load_in_4bit", False)))


def make_val_fn(cfg: RunConfig, task: Task, stage_dir: Path, rollouts: RolloutEngine, *, prefix: str = "eval/val_",
                val_rollout: dict | None = None):
    """``eval_fn(module, step)`` for the trainer: validation accuracy (generated by ``rollouts``,
    the stage's engine, which serves the trainer's current weights); with ``select_best`` the
    best-so-far weights are exported to ``stage_dir/best`` (HF format) with ``best.json``. Decoding:
    ``cfg.rollout`` updated by ``val_rollout`` (e.g. the distill stage's ``{steps: 5}``)."""
    from rl.checkpoint import export_hf, param_checksum

    rows = task.rows("val")
    val_ro = dataclasses.replace(cfg.rollout, **dict(val_rollout or {}))
    state = {"best": -1.0}
    best_json = stage_dir / "best.json"
    if cfg.resume and best_json.exists():
        state["best"] = json.loads(best_json.read_text())["val_accuracy"]

    def eval_fn(module, step: int) -> dict:
        # this rank's full weights (gathered under ZeRO-3): ranks must agree on it
        state["param_checksum"] = param_checksum(module)  # float64 in chunks: no full-size copy
        if not rows:
            return {}
        metrics = evaluate_rows(rollouts, task, rows, val_ro, batch_size=cfg.recipe.eval_batch_size,
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
    """``eval/accuracy`` (exact solve) and ``eval/reward`` of a checkpoint on the test split (one
    policy, one rollout engine, both freed on return)."""
    policy = build_policy(cfg, checkpoint).eval()
    try:
        return evaluate_rows(policy, task, task.rows("test"), cfg.rollout, batch_size=cfg.recipe.eval_batch_size,
                             seed=cfg.seed)
    finally:
        del policy
        release_memory()


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _stage_config(trainer_cfg, stage_dir: Path):
    return dataclasses.replace(trainer_cfg, run_dir=str(stage_dir))


# ---- stages --------------------------------------------------------------------------------------

def train_stage(cfg: RunConfig, task: Task, stage_dir: Path, policy: PolicyAdapter, build,
                rollouts: RolloutEngine | None = None, val_rollout: dict | None = None) -> tuple[dict, dict, float]:
    """Run one training stage and free it: ``build(policy, rollouts, val_fn) -> trainer`` with the
    stage's rollout engine (``rollouts``, else one built from ``cfg.rollout``; one per stage, shared
    by the trainer and its validation). On return the trainer, its DeepSpeed engine and optimizer
    states, the policy and the rollout engine are gone (:meth:`rl.trainer.Trainer.close`), so the
    test evaluation that follows loads the only copy of the weights and starts the only engine.
    Returns ``(last metrics, validation state, train seconds)``."""
    t0 = time.perf_counter()
    with (rollouts if rollouts is not None else build_rollout_engine(cfg.rollout)) as engine:
        val_fn = make_val_fn(cfg, task, stage_dir, engine, val_rollout=val_rollout)
        trainer = build(policy, engine, val_fn)
        del policy  # the trainer holds it
        try:
            last = trainer.train()
        finally:
            trainer.close()
        state = dict(val_fn.state)
        del trainer, val_fn
    release_memory()
    return last, state, time.perf_counter() - t0


def run_sft(cfg: RunConfig, task: Task, run_dir: Path, init: Path | None = None, data: Task | None = None) -> dict:
    """Masked SFT on ``data``'s labelled rows (the SFT stage's own task, e.g. s1K; default: ``task``),
    its eval loss on ``data``'s validation rows; validation accuracy and test on ``task``."""
    from rl.sft import SFTTrainer

    data = data or task
    stage_dir = run_dir / STAGE_DIRS["sft"]
    rows = data.rows("sft")
    if not rows:
        raise ValueError(f"task {data.name!r} has no labelled rows for SFT (task.num_sft / the data's responses)")
    eval_rows = [r for r in data.rows("val") if "response" in r]
    last, state, seconds = train_stage(cfg, task, stage_dir, stage_policy(cfg, cfg.sft, init),
                                       lambda policy, rollouts, val_fn: SFTTrainer(
                                           _stage_config(cfg.sft, stage_dir), policy, rows, eval_dataset=eval_rows,
                                           eval_fn=val_fn, rollouts=rollouts))
    return _finish_stage(cfg, task, stage_dir, last, seconds, state)


def run_grpo(cfg: RunConfig, task: Task, run_dir: Path, init: Path | None = None, data: Task | None = None) -> dict:
    """diffu-GRPO on ``task``'s RL prompts; its rollouts (``rl.rollout`` options) and validation share
    the stage's rollout engine."""
    from rl.grpo import DiffuGRPOTrainer

    stage_dir = run_dir / STAGE_DIRS["rl"]
    last, state, seconds = train_stage(cfg, task, stage_dir, stage_policy(cfg, cfg.rl, init),
                                       lambda policy, rollouts, val_fn: DiffuGRPOTrainer(
                                           _stage_config(cfg.rl, stage_dir), policy, task.rows("rl"), eval_fn=val_fn,
                                           reward_fn=task.reward_fn(), rollouts=rollouts))
    return _finish_stage(cfg, task, stage_dir, last, seconds, state)


def run_dpo(cfg: RunConfig, task: Task, run_dir: Path, init: Path | None = None, data: Task | None = None) -> dict:
    """Diffusion DPO on pairs (best vs worst of G samples, ranked by the task's verifier) drawn
    once from the initial policy (offline DPO on self-generated data)."""
    from rl import dpo
    from rl.pairs import build_preference_pairs
    from rl.trainer import seeded_generator

    stage_dir = run_dir / STAGE_DIRS["rl"]
    policy = stage_policy(cfg, cfg.rl, init)
    base = cfg.rl
    dpo_cfg = base if isinstance(base, dpo.DPOConfig) else dpo.DPOConfig(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    rc = cfg.recipe
    prompts = task.rows("rl")[:rc.pair_prompts] if rc.pair_prompts > 0 else task.rows("rl")
    rollouts = build_rollout_engine(cfg.rollout, policy)  # the pairs, then the trainer's validation
    generator = seeded_generator(cfg.seed, "pairs", 0, next(policy.parameters()).device)
    pairs = build_preference_pairs(rollouts, prompts, task.reward_fn(), num_generations=rc.pair_samples,
                                   rollout=dataclasses.replace(cfg.rollout, temperature=rc.pair_temperature),
                                   generator=generator, batch_size=rc.eval_batch_size)
    if not pairs:
        rollouts.close()
        raise ValueError(f"dpo: no preference pairs from {len(prompts)} prompts (every group tied); raise "
                         f"recipe.pair_samples or recipe.pair_temperature")
    last, state, seconds = train_stage(cfg, task, stage_dir, policy,
                                       lambda policy, rollouts, val_fn: dpo.DiffusionDPOTrainer(
                                           _stage_config(dpo_cfg, stage_dir), policy, pairs, eval_fn=val_fn,
                                           rollouts=rollouts), rollouts=rollouts)
    del policy, rollouts  # the only references left: the test evaluation loads the checkpoint again
    release_memory()
    return _finish_stage(cfg, task, stage_dir, last, seconds, state)


def run_distill(cfg: RunConfig, task: Task, run_dir: Path, init: Path | None = None, data: Task | None = None) -> dict:
    """Self-distillation for parallel decoding (rl/distill.py): the policy decodes ``task``'s RL
    prompts with ``distill.rollout``, the verifier keeps the solved completions, and masked SFT
    with certainty forcing trains on them; validation and test as every stage."""
    from rl.distill import self_distill_rows
    from rl.sft import SFTTrainer
    from rl.trainer import seeded_generator

    dcfg = cfg.distill
    stage_dir = run_dir / STAGE_DIRS["distill"]
    policy = stage_policy(cfg, dcfg, init)
    prompts = task.rows("rl")[:dcfg.num_prompts] if dcfg.num_prompts > 0 else task.rows("rl")
    rollouts = build_rollout_engine(dcfg.rollout, policy)  # the data, then the trainer's validation
    t0 = time.perf_counter()
    generator = seeded_generator(cfg.seed, "distill", D.get_rank(), next(policy.parameters()).device)
    rows, stats = self_distill_rows(rollouts, task, prompts, dcfg.rollout, samples_per_prompt=dcfg.samples_per_prompt,
                                    batch_size=cfg.recipe.eval_batch_size, generator=generator)
    stats["seconds"] = time.perf_counter() - t0
    if _is_main():
        print(f"[dllm-rl] distill data: {stats['kept']} solved completions of {stats['samples']} "
              f"({100 * stats['solved']:.1f}% solved, {stats['forward_passes']:.1f} passes per call, "
              f"{stats['seconds']:.0f}s)", flush=True)
    need = dcfg.per_device_batch_size * _world_size()
    if len(rows) < need:  # nothing to distil: hand the policy on unchanged (every rank gathered the same rows)
        rollouts.close()
        del policy, rollouts
        release_memory()
        reason = (f"the policy solved {len(rows)} of {stats['samples']} decoded RL prompts, fewer than one global "
                  f"batch ({need}); lower distill.per_device_batch_size, raise distill.num_prompts, or train the "
                  f"policy further first")
        if init is None:
            raise DataError(f"distill: {reason}")
        if _is_main():
            print(f"[dllm-rl] distill skipped: {reason}; the stage hands on its input checkpoint {init}", flush=True)
        return {"checkpoint": str(init), "skipped": reason, "train_wall_time_s": stats["seconds"], "data": stats,
                **test_eval(cfg, task, init)}
    last, state, seconds = train_stage(cfg, task, stage_dir, policy,
                                       lambda policy, rollouts, val_fn: SFTTrainer(
                                           _stage_config(dcfg, stage_dir), policy, rows, eval_fn=val_fn,
                                           rollouts=rollouts), rollouts=rollouts, val_rollout=dcfg.val_rollout)
    del policy, rollouts
    release_memory()
    result = _finish_stage(cfg, task, stage_dir, last, seconds + stats["seconds"], state)
    result["data"] = stats
    return result


def run_unmask_order(cfg: RunConfig, task: Task, run_dir: Path, init: Path | None = None,
                     data: Task | None = None) -> dict:
    from recipes.unmask import train_unmask_order

    stage_dir = run_dir / STAGE_DIRS["rl"]
    t0 = time.perf_counter()
    result = train_unmask_order(cfg, task, stage_dir, stage_policy(cfg, cfg.rl, init))
    return {**result, "train_wall_time_s": time.perf_counter() - t0}


def _finish_stage(cfg: RunConfig, task: Task, stage_dir: Path, last: dict, seconds: float,
                  val_state: dict | None = None) -> dict:
    """The stage's result: its checkpoint, training metrics, and the test evaluation of the
    checkpoint (run after the stage's trainer and engine are freed, :func:`train_stage`)."""
    ckpt = stage_checkpoint(cfg, stage_dir)
    result = {"checkpoint": str(ckpt), "train_wall_time_s": seconds,
              "train": {k: v for k, v in last.items() if not k.startswith("timing/")}}
    if val_state and "param_checksum" in val_state:
        result["param_checksum"] = val_state["param_checksum"]
    if (stage_dir / "best.json").exists() and cfg.recipe.select_best:
        result["selected"] = json.loads((stage_dir / "best.json").read_text())
    result.update(test_eval(cfg, task, ckpt))
    return result


STAGES = {"sft": run_sft, "grpo": run_grpo, "dpo": run_dpo, "unmask_order": run_unmask_order, "distill": run_distill}
# the stage each trainer config runs; PIPELINES follows the recipe registry (recipes.schema.RECIPES)
STAGE_OF = {SFTConfig: "sft", DiffuGRPOConfig: "grpo", DPOConfig: "dpo", UnmaskOrderConfig: "unmask_order",
            SelfDistillConfig: "distill"}
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
    sft_task = build_task(cfg.sft_task) if cfg.sft_task is not None else None
    base_cfg = cfg
    lengths = check_training(cfg, task, _world_size(), sft_task)
    cfg = with_engine_length(cfg, lengths.get("generation"))
    check_memory(cfg, _world_size(), lengths)
    run_dir = prepare_run_dir(cfg)
    _barrier()
    group = wandb_group(cfg, run_dir)
    t0 = time.perf_counter()
    summary: dict = {"recipe": cfg.recipe.name, "task": task.name, "model": cfg.model.name, "seed": cfg.seed,
                     "overrides": list(overrides or [])}
    if sft_task is not None:
        summary["sft_task"] = sft_task.name
    init = None
    for key, stage in PIPELINES[cfg.recipe.name]:
        if _is_main():
            print(f"[dllm-rl] stage {key} ({stage}) -> {run_dir / STAGE_DIRS[key]}", flush=True)
        with run_context(name=cfg.run_name, group=group, job_type=key, config=dataclasses.asdict(cfg)):
            summary[key] = STAGES[stage](cfg, task, run_dir, init, sft_task if stage == "sft" else None)
        init = Path(summary[key]["checkpoint"])
        if _is_main():
            report.merge_metrics(run_dir, [k for k, _ in PIPELINES[cfg.recipe.name] if k in summary])
    summary["wall_time_s"] = time.perf_counter() - t0
    if _is_main():
        final = run_dir / "final"
        if final.is_symlink() or final.exists():
            final.unlink() if final.is_symlink() else shutil.rmtree(final)
        final.symlink_to(init.relative_to(run_dir) if init.is_relative_to(run_dir) else init.resolve())
        last_key = PIPELINES[cfg.recipe.name][-1][0]
        if "sft" in summary and last_key != "sft":  # the final stage's test accuracy over SFT's
            summary["lift"] = summary[last_key]["eval/accuracy"] - summary["sft"]["eval/accuracy"]
    if cfg.recipe.final_eval:  # the eval table of the handed-on checkpoint (every rank generates)
        summary["final_eval"] = run_eval(base_cfg, checkpoint=init, out_dir=run_dir / "eval")
    if _is_main():
        (run_dir / "summary.json").write_text(json.dumps(report.json_safe(summary), indent=2, allow_nan=False))
        if cfg.recipe.plot:
            report.plot_curves(run_dir)
        report.print_outputs(run_dir, summary)
    _write_rank_marker(run_dir, summary)
    return summary


def run_eval(cfg: RunConfig, *, checkpoint: str | Path | None = None, out_dir: Path | None = None) -> list[dict]:
    """Accuracy of one checkpoint (``eval.checkpoint``, else the model group) on ``eval.tasks`` x
    generation lengths x rollout modes, with ``eval.protocol``'s prompts and scoring; the table
    goes to ``out_dir`` (default: ``run_dir``)."""
    from rl.engine import init_distributed

    init_distributed()
    d1 = cfg.eval.protocol == "d1"
    checkpoint = checkpoint or cfg.eval.checkpoint
    run_dir = Path(out_dir or cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tasks, need = {}, 0
    for name in cfg.eval.tasks or [cfg.task.name]:
        task_cfg = cfg.task if name == cfg.task.name else load_task_config(name)
        if d1:  # d1's evaluation prompts (rl/tasks/d1.py), d1's answer columns
            task_cfg = dataclasses.replace(task_cfg, prompt_style="d1_eval")
        task = build_task(task_cfg)
        rows = task.rows("test")
        rows = rows[:cfg.eval.num_examples] if cfg.eval.num_examples > 0 else rows
        need = max(need, check_eval(cfg, task, rows, path=checkpoint, world_size=_world_size()).get("generation", 0))
        tasks[name] = (task, rows)
    cfg = with_engine_length(cfg, need)
    policy = build_policy(cfg, checkpoint).eval()
    base = d1_rollout(cfg.rollout) if d1 else cfg.rollout
    lengths = list(cfg.eval.gen_lengths) or (list(D1_GEN_LENGTHS) if d1 else [])
    label = _model_label(cfg, checkpoint)
    results = []
    with build_rollout_engine(base, policy) as rollouts:
        for name, (task, rows) in tasks.items():
            for mode, ro in eval_rollouts(base, lengths, cfg.eval.block_length, cfg.eval.steps_per_token,
                                          dict(cfg.eval.modes)):
                if d1:  # d1's file name: {task}_{model}_{gen_length}_{steps}_{rank}_generations.json
                    out_file = run_dir / "generations" / (f"{D1_TASKS[name]}_{label}-{mode}_{ro.gen_length}_{ro.steps}"
                                                          "_{rank}_generations.json")
                    meta = {"model_path": str(cfg.model.path or cfg.model.name),
                            "checkpoint_path": str(checkpoint or ""), "gen_length": ro.gen_length, "diffusion_steps": ro.steps, "block_length": ro.block_length}
                    m = evaluate_rows_d1(rollouts, task, rows, ro, batch_size=cfg.recipe.eval_batch_size,
                                         seed=cfg.seed, out_file=out_file, meta=meta)
                else:
                    m = evaluate_rows(rollouts, task, rows, ro, batch_size=cfg.recipe.eval_batch_size, seed=cfg.seed,
                                      prefix="")
                results.append({"task": name, "mode": mode, "gen_length": ro.gen_length,
                                "block_length": ro.block_length, "steps": ro.steps, "protocol": cfg.eval.protocol, **m})
                if _is_main():
                    extra = f", d1's parser {100 * m['d1_accuracy']:.1f}%" if d1 else ""
                    print(f"[dllm-rl] {name} gen={ro.gen_length} mode={mode}: accuracy {100 * m['accuracy']:.1f}%"
                          f"{extra} ({int(m['num_examples'])} examples, {m['seconds']:.1f}s)", flush=True)
    if _is_main():
        ckpt = checkpoint or cfg.model.path or f"{cfg.model.name} (built in, seed {cfg.seed})"
        md, js = write_results(results, run_dir, f"dllm-rl eval ({cfg.eval.protocol} protocol): {ckpt}")
        print(f"[dllm-rl] results: {md} and {js}", flush=True)
    return results


def with_engine_length(cfg: RunConfig, need: int | None) -> RunConfig:
    """``cfg`` with ``rollout.vllm.max_model_len`` = ``need`` (the run's longest prompt + generation,
    from preflight; TRL: max_prompt_length + max_completion_length) when it is 0 and the backend is vLLM."""
    vllm = cfg.rollout.vllm
    if cfg.rollout.backend != "vllm" or vllm.max_model_len or not need:
        return cfg
    rollout = dataclasses.replace(cfg.rollout, vllm=dataclasses.replace(vllm, max_model_len=int(need)))
    return dataclasses.replace(cfg, rollout=rollout)


def check_memory(cfg: RunConfig, world_size: int, lengths: dict | None = None) -> None:
    """Stop before loading anything when a stage is predicted not to fit the GPU (recipes/plan.py;
    ``plan.check=false`` runs anyway). Only on CUDA: the plan is a GPU plan."""
    if not cfg.plan.check or target_device(cfg).type != "cuda":
        return
    from recipes.plan import check_fits

    check_fits(cfg, world_size, lengths)


def _model_label(cfg: RunConfig, checkpoint) -> str:
    """A file-name-safe model name for d1's generation files."""
    raw = Path(str(checkpoint or cfg.model.path)).name if (checkpoint or cfg.model.path) else cfg.model.name
    return re.sub(r"[^A-Za-z0-9.-]+", "-", raw).strip("-") or "model"


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

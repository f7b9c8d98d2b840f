"""Profile of the default recipe's diffu-GRPO step: where the time goes and how far each phase is
from this CPU's arithmetic peak; optionally the same steps under other settings, same run.

    .venv/bin/python scripts/profile_rl_step.py --sft-model runs/sft_seed0/sft/best
    .venv/bin/python scripts/profile_rl_step.py --sft-model ... --compare rl.rollout.threshold=0.9

Builds the default config (plus ``--override``s), loads the SFT checkpoint as the policy, runs
``--warmup`` then ``--steps`` GRPO steps per setting on the same prompts (the trainers' own
timing metrics: rollout / reward / update), and prints per setting: seconds per phase and share,
forward passes, tokens through the model and achieved GFLOP/s (2 x params x tokens forward,
x3 with backward) against the peak measured here (single-thread float32 GEMM), plus the top
operators of one profiled step (torch.profiler). Settings are compared as ratios to the first.
"""

from __future__ import annotations

import argparse
import re
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gemm_peak_gflops(n: int = 512, reps: int = 20) -> float:
    """Float32 matmul GFLOP/s at the current thread count: this machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def build_trainer(overrides: list[str], sft_model: str, run_dir: Path):
    from recipes.config import load_config
    from recipes.pipeline import build_policy
    from rl.grpo import DiffuGRPOTrainer
    from rl.tasks import build_task

    cfg = load_config(["recipe=grpo", f"model.path={sft_model}", f"run_dir={run_dir}", "logger.wandb.mode=disabled",
                       *overrides])
    task = build_task(cfg.task)
    policy = build_policy(cfg)
    rl_cfg = dataclasses.replace(cfg.rl, run_dir=str(run_dir), eval_steps=0)
    return DiffuGRPOTrainer(rl_cfg, policy, task.rows("rl"), reward_fn=task.reward_fn())


def flops_per_step(trainer, shape: tuple[int, int], passes: float, n_params: int) -> tuple[float, float]:
    """(rollout GFLOP, update GFLOP) per step for ``shape`` = (rows, sequence width): 2 x params x
    tokens per forward (Kaplan et al. 2020's estimate; attention's share is small at these widths),
    3x that with the backward pass."""
    mu = trainer.config.num_iterations
    fwd = 2 * n_params * shape[0] * shape[1] / 1e9
    return fwd * passes, fwd * ((mu - 1) + 3 * mu)  # update: old log-probs for mu - 1 masks, mu fwd+bwd


def run_setting(label: str, overrides: list[str], args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    trainer = build_trainer(overrides, args.sft_model, args.out / re.sub(r"[^A-Za-z0-9.]+", "_", label))
    trainer.engine.train()
    n_params = sum(p.numel() for p in trainer.policy.parameters())
    shape, rollout = [], trainer.rollout

    def recording_rollout(rows):  # the sequences' shape, for the FLOP count
        out = rollout(rows)
        shape[:] = out.sequences.shape
        return out

    trainer.rollout = recording_rollout
    steps = []
    for i in range(args.warmup + args.steps):
        rows = [trainer.train_dataset[j] for j in trainer.data.next_indices()]
        if i == args.warmup + args.steps - 1:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                m = trainer.training_step(rows)
            top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        else:
            m = trainer.training_step(rows)
        m = {k: float(v) for k, v in m.items()}
        if i >= args.warmup:
            steps.append(m)
    # the profiled step carries the profiler's overhead: timings come from the others
    timed = steps[:-1] or steps
    phases = {p: statistics.mean(m[f"timing/{p}"] for m in timed) for p in ("rollout", "reward", "update")}
    passes = statistics.mean(m["rollout/forward_passes"] for m in steps)
    rollout_gf, update_gf = flops_per_step(trainer, tuple(shape), passes, n_params)
    return {"label": label, "overrides": overrides, "phases": phases, "step": sum(phases.values()),
            "passes": passes, "shape": tuple(shape),
            "reward": statistics.mean(m["reward"] for m in steps), "gflop": (rollout_gf, update_gf),
            "params": n_params, "top": top}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft-model", required=True, help="the SFT checkpoint GRPO starts from (e.g. <run>/sft/best)")
    ap.add_argument("--override", action="append", default=[], help="Hydra override for every setting")
    ap.add_argument("--compare", action="append", default=[],
                    help="another setting: space-separated overrides on top of --override (repeatable)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "profile_rl_step")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = gemm_peak_gflops()
    settings = [("default", list(args.override))] + [(c, [*args.override, *c.split()]) for c in args.compare]
    results = [run_setting(label, ov, args) for label, ov in settings]
    base = results[0]
    print(f"\nGEMM peak here: {peak:.1f} GFLOP/s ({args.threads} thread); policy {base['params'] / 1e6:.2f}M "
          f"parameters; {args.steps} timed steps per setting after {args.warmup} warm-up steps\n")
    for r in results:
        print(f"== {r['label']}: {', '.join(r['overrides']) or 'the default recipe'}")
        for p, s in r["phases"].items():
            gf = {"rollout": r["gflop"][0], "update": r["gflop"][1]}.get(p)
            rate = f", {gf / s:.1f} GFLOP/s = {100 * gf / s / peak:.0f}% of peak" if gf else ""
            print(f"  {p:<8} {s:6.3f} s  {100 * s / r['step']:4.1f}%{rate}")
        print(f"  step     {r['step']:6.3f} s  (x{base['step'] / r['step']:.2f} vs default); rollout forward passes "
              f"{r['passes']:.1f} on {r['shape'][0]} x {r['shape'][1]} tokens; mean reward {r['reward']:.3f}")
        print(r["top"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

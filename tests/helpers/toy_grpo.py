"""A tiny, fast diffu-GRPO setup on the built-in model with an easy-to-climb reward.

Used by tests in-process and as a subprocess (``python -m tests.helpers.toy_grpo RUN_DIR ...``)
for kill-and-resume and distributed runs."""

from __future__ import annotations

import argparse
import json
import sys

TARGET = "7"


def target_char_reward(prompts, completions, **_):
    """Fraction of completion characters equal to TARGET: easy to climb from a random model."""
    return [sum(c == TARGET for c in s) / max(len(s), 1) for s in completions]


def make_trainer(run_dir: str, *, max_steps: int = 30, save_steps: int = 0, resume: bool = False,
                 deepspeed: str = "zero0", seed: int = 0, lr: float = 3e-3, beta: float = 0.0,
                 num_iterations: int = 2, estimator: str = "mean_field", lora: bool = False,
                 micro_batch_size: int = 8, rows: list[dict] | None = None, reward_funcs=None,
                 reward_weights: list[float] | None = None, backend: str = "torch", rollouts=None,
                 objective: str = "diffu_grpo", objective_options: dict | None = None):
    from rl.config import DiffuGRPOConfig, LoraOptions, RolloutOptions
    from rl.grpo import DiffuGRPOTrainer
    from rollout import build_tiny_policy

    policy = build_tiny_policy(seed=seed, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128)
    rows = rows if rows is not None else [{"prompt": f"{i:03d}"} for i in range(64)]
    cfg = DiffuGRPOConfig(
        run_dir=run_dir, seed=seed, max_steps=max_steps, lr=lr, per_device_prompts=4, num_generations=4,
        num_iterations=num_iterations, beta=beta, epsilon=0.5, objective=objective,
        objective_options=objective_options or {},
        estimator=estimator if objective == "diffu_grpo" else None,  # other objectives: their own
        estimator_options={"p_mask_prompt": 0.15} if estimator == "mean_field" and objective == "diffu_grpo" else {},
        deepspeed=deepspeed, save_steps=save_steps, resume=resume,
        rollout=RolloutOptions(gen_length=8, block_length=8, steps=8, temperature=1.0, backend=backend),
        lora=LoraOptions(enabled=lora, r=8, alpha=16, dropout=0.0), sample_table_every=0, export_hf=True,
        micro_batch_size=micro_batch_size, max_grad_norm=1.0, reward_weights=reward_weights,
    )
    return DiffuGRPOTrainer(cfg, policy, rows, reward_funcs=reward_funcs or [target_char_reward], rollouts=rollouts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--deepspeed", default="zero0")
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--objective", default="diffu_grpo")
    ap.add_argument("--backend", default="torch", help="rollout backend (vllm: also compares it with torch at the end)")
    ap.add_argument("--out", default=None, help="write final metrics + a weight checksum to OUT.rank<r>.json")
    args = ap.parse_args(argv)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from rl.config import RolloutOptions
    from rollout.engine import RolloutEngine, build_rollout_engine

    rollouts = build_rollout_engine(RolloutOptions(gen_length=8, block_length=8, steps=8, backend=args.backend))
    trainer = make_trainer(args.run_dir, max_steps=args.max_steps, save_steps=args.save_steps,
                           resume=args.resume, deepspeed=args.deepspeed, beta=args.beta, backend=args.backend,
                           rollouts=rollouts, objective=args.objective)
    last = trainer.train()
    # greedy rollouts of the trained weights: this backend vs the torch sampler on the (gathered) policy
    prompts = [f"{i:03d}" for i in range(4)]
    same = bool(torch.equal(rollouts.generate(prompts).sequences,
                            RolloutEngine(rollouts.options, trainer.engine).generate(prompts).sequences))
    rollouts.close()
    from rl.engine import consolidated_state_dict

    sd = consolidated_state_dict(trainer.engine, rank0_only=False)  # every rank: full weights
    if args.out:
        checksum = float(sum(v.double().abs().sum() for v in sd.values()))
        with open(f"{args.out}.rank{dist.get_rank()}.json", "w") as f:
            json.dump({"metrics": last, "checksum": checksum, "world_size": dist.get_world_size(),
                       "step": trainer.step, "backend_equals_torch": same}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

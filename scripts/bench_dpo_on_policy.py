"""Benchmark: on-policy diffusion DPO (and DPO + NLL, "RPO") from an SFT checkpoint on Sudoku 4x4.

Data: the recipe's ``sudoku4`` task (rl/tasks.py, prompt_style minimal, split_seed 1234). Pairs:
best vs worst of G policy samples (``--pair-temperature``) per RL-split puzzle, ranked by the ``sudoku``
verifier (rl/pairs.py). The baseline is the SFT checkpoint itself, measured in the same run:
greedy task reward (fraction of empty cells right) and exact-solve rate, at the recipe's eval
settings (17 tokens, 17 steps, low-confidence remasking), on the pair prompts, the validation and
the held-out test split, before and after DPO. Each ``--rpo-alpha`` value is one DPO run from the
same checkpoint and the same pairs.

    .venv/bin/python scripts/bench_dpo_on_policy.py --sft-model runs/seeds/seed0/sft/final \\
        --rpo-alpha 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from rl.config import RolloutOptions  # noqa: E402
from rl.dpo import DiffusionDPOTrainer, DPOConfig  # noqa: E402
from rl.pairs import build_preference_pairs, sample_completions  # noqa: E402
from rl.trainer import seeded_generator  # noqa: E402
from rollout import PolicyAdapter  # noqa: E402

GREEDY = RolloutOptions(gen_length=17, block_length=17, steps=17, temperature=0.0)  # configs/rollout/sudoku4.yaml


def task_eval(policy, task, rows) -> tuple[float, float]:
    """(mean greedy task reward, exact-solve rate) of ``policy`` on ``rows``."""
    texts = [c[0] for c in sample_completions(policy, rows, num_generations=1, rollout=GREEDY, generator=None,
                                               batch_size=128)]
    cols = {k: [r[k] for r in rows] for k in ("puzzle", "solution")}
    reward = task.reward_fn()([r["prompt"] for r in rows], texts, **cols).total
    return sum(reward) / len(reward), task.accuracy(rows, texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-model", required=True, metavar="PATH", help="HF dLLM checkpoint (e.g. runs/.../sft/final)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pair-prompts", type=int, default=256, help="first N puzzles of the RL split")
    ap.add_argument("--generations", type=int, default=8, help="samples per prompt")
    ap.add_argument("--pair-temperature", type=float, default=1.0, help="sampling temperature of the pair samples")
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--n-samples", type=int, default=4, help="VRPO budget n (passes per ELBO)")
    ap.add_argument("--rpo-alpha", type=float, nargs="+", default=[0.0, 1.0], help="one DPO run per value")
    ap.add_argument("--run-dir", default="runs/bench_dpo_on_policy")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from recipes.config import load_config
    from rl.tasks import build_task

    task = build_task(load_config().task)  # the default recipe's sudoku4 splits
    prompts, val, test = task.rows("rl")[:args.pair_prompts], task.rows("val"), task.rows("test")
    policy = PolicyAdapter.from_pretrained(args.sft_model)
    t0 = time.perf_counter()
    pairs = build_preference_pairs(policy, prompts, task.reward_fn(), num_generations=args.generations,
                                   rollout=RolloutOptions(gen_length=17, block_length=17, steps=17,
                                                          temperature=args.pair_temperature),
                                   generator=seeded_generator(args.seed, "pairs", 0))
    mean = lambda key: sum(p[key] for p in pairs) / max(len(pairs), 1)  # noqa: E731
    print(f"{len(pairs)} pairs from {len(prompts)} prompts x {args.generations} samples at temperature "
          f"{args.pair_temperature:g} ({time.perf_counter() - t0:.0f} s); mean reward chosen {mean('chosen_reward'):.3f}, "
          f"rejected {mean('rejected_reward'):.3f}", flush=True)
    base = {name: task_eval(policy, task, rows) for name, rows in (("pairs", prompts), ("val", val), ("test", test))}
    print("SFT: " + ", ".join(f"{k} reward {v[0]:.3f} exact {v[1]:.3f}" for k, v in base.items()), flush=True)

    results = {}
    for alpha in args.rpo_alpha:
        policy = PolicyAdapter.from_pretrained(args.sft_model)
        run_dir = Path(args.run_dir) / f"rpo{alpha:g}"
        cfg = DPOConfig(run_dir=str(run_dir), seed=args.seed, max_steps=args.dpo_steps, lr=args.lr, beta=args.beta,
                        per_device_batch_size=args.batch, n_samples=args.n_samples, rpo_alpha=alpha,
                        wandb_mode="disabled", export_hf=False, save_total_limit=1)
        t0 = time.perf_counter()
        DiffusionDPOTrainer(cfg, policy, pairs).train()
        secs = time.perf_counter() - t0
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        acc = [m["rewards/accuracies"] for m in logged if "rewards/accuracies" in m]
        k = max(1, len(acc) // 4)
        after = {name: task_eval(policy, task, rows) for name, rows in (("pairs", prompts), ("val", val), ("test", test))}
        results[alpha] = (acc, k, after, logged[-1])
        print(f"rpo_alpha {alpha:g}: {args.dpo_steps} steps in {secs:.0f} s; rewards/accuracies steps 2-{k + 1} "
              f"{sum(acc[1:k + 1]) / k:.3f}, last {k} {sum(acc[-k:]) / k:.3f}; "
              + ", ".join(f"{n} reward {v[0]:.3f} exact {v[1]:.3f}" for n, v in after.items()), flush=True)

    print(f"\nOn-policy DPO from {args.sft_model}: {len(pairs)} pairs, {args.dpo_steps} steps x batch {args.batch}, "
          f"lr {args.lr:g}, beta {args.beta:g}, n = {args.n_samples}, pair temperature {args.pair_temperature:g}, "
          f"seed {args.seed}; greedy eval (17 steps)")
    print("| run | rewards/accuracies steps 2-k+1 -> last k | reward pairs | reward val | reward test "
          "| exact val | exact test | test reward / SFT |")
    print("|---|---|---|---|---|---|---|---|")
    b = base
    print(f"| SFT (baseline) | - | {b['pairs'][0]:.3f} | {b['val'][0]:.3f} | {b['test'][0]:.3f} | {b['val'][1]:.3f} "
          f"| {b['test'][1]:.3f} | 1.00x |")
    for alpha, (acc, k, a, _) in results.items():
        name = "DPO" if alpha == 0 else f"DPO + {alpha:g} x NLL (RPO)"
        print(f"| {name} | {sum(acc[1:k + 1]) / k:.3f} -> {sum(acc[-k:]) / k:.3f} | {a['pairs'][0]:.3f} | "
              f"{a['val'][0]:.3f} | {a['test'][0]:.3f} | {a['val'][1]:.3f} | {a['test'][1]:.3f} | "
              f"{a['test'][0] / b['test'][0]:.3f}x |")


if __name__ == "__main__":
    main()

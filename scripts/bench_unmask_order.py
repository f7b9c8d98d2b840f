"""Benchmark: a learned unmasking order vs random order vs low-confidence remasking (Sudoku 4x4).

Pipeline (the embedded default, nothing downloaded):
  1. SFT the tiny char-level dLLM on a small labelled set (64 puzzles; masked-diffusion SFT).
  2. Per seed: train an unmasking-order head (uniform initial scores, frozen dLLM) with
     ``UnmaskOrderTrainer`` on unlabelled puzzles, reward = fraction of empty cells right.
  3. Evaluate exact-solve accuracy on a fixed held-out set at the same number of denoising steps
     (fewer steps than tokens, so several positions are committed per step and order matters):
     random order (sampler's ``remasking="random"``), low-confidence remasking (LLaDA), and the
     learned head (top-K of its scores). Tokens are decoded greedily (temperature 0) everywhere.

    .venv/bin/python scripts/bench_unmask_order.py            # ~15-25 min on 2 shared CPU cores
    .venv/bin/python scripts/bench_unmask_order.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from rewards.sudoku import make_sudoku_dataset, sudoku_score, sudoku_solved  # noqa: E402
from rl.config import RolloutOptions, SFTConfig  # noqa: E402
from rl.data import encode_prompt, left_pad  # noqa: E402
from rl.sft import SFTTrainer  # noqa: E402
from rl.unmask_order import (OrderPolicy, PlackettLuceOrder, UnmaskOrderConfig, UnmaskOrderTrainer,  # noqa: E402
                             generate_with_order)
from rollout import PolicyAdapter, build_tiny_policy, generate  # noqa: E402


def split_data(n_sft: int, n_rl: int, n_val: int, n_test: int, seed: int = 0):
    """Disjoint (sft, rl, val, test) puzzles; the sft and test sets do not depend on the other sizes."""
    rows = make_sudoku_dataset(n_sft + n_test + n_val + n_rl, seed=seed)
    for r in rows:
        r["prompt"] = r["puzzle"]
    a, b, c = n_sft, n_sft + n_test, n_sft + n_test + n_val
    return rows[:a], rows[c:], rows[b:c], rows[a:b]


def sft(policy, rows, steps: int, run_dir: str):
    data = [{"prompt": r["puzzle"], "response": r["solution"]} for r in rows]
    data = data * max(1, -(-128 // len(data)))  # >= one batch of 128 (each puzzle, fresh masks)
    cfg = SFTConfig(run_dir=run_dir, max_steps=steps, lr=1e-3, per_device_batch_size=128, export_hf=False,
                    wandb_mode="disabled", seed=0)
    SFTTrainer(cfg, policy, data).train()
    return policy


@torch.no_grad()
def evaluate(dllm, rows, ro: RolloutOptions, *, order: str, head=None, seed: int = 0, batch: int = 128):
    """Exact-solve and cell accuracy on ``rows``: ``order`` in random | low_confidence | learned."""
    tok = dllm.tokenizer
    g = torch.Generator().manual_seed(10_000 + seed)
    solved, cells = [], []
    dllm.eval()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        ids, mask = left_pad([encode_prompt(tok, r["prompt"]) for r in chunk], tok.pad_token_id)
        if order == "learned":
            hook = PlackettLuceOrder(head, gen_length=ro.gen_length, greedy=True)
            out = generate_with_order(dllm, hook, ids, mask, ro)
        else:
            out = generate(dllm, ids, attention_mask=mask, mask_id=dllm.mask_token_id, eos_id=dllm.eos_token_id,
                           steps=ro.steps, gen_length=ro.gen_length, block_length=ro.block_length,
                           temperature=0.0, remasking=order, generator=g)
        for r, text in zip(chunk, out.decode(tok)):
            solved.append(float(sudoku_solved(text, r["puzzle"], r["solution"])))
            cells.append(sudoku_score(text, r["puzzle"], r["solution"]))
    return sum(solved) / len(solved), sum(cells) / len(cells)


def train_order(dllm, rl_rows, val_rows, ro: RolloutOptions, *, seed: int, steps: int, eval_every: int,
                run_dir: str, prompts_per_step: int, generations: int, lr: float):
    """Order head from uniform scores; keeps the head of the best validation exact-solve rate."""
    policy = OrderPolicy(dllm)
    best = {"acc": -1.0, "step": 0, "state": None}

    def eval_fn(module, step):
        acc, cell = evaluate(module.dllm, val_rows, ro, order="learned", head=module.head)
        if acc > best["acc"]:
            best.update(acc=acc, step=step, state={k: v.clone() for k, v in module.head.state_dict().items()})
        return {"eval/exact": acc, "eval/cell": cell}

    cfg = UnmaskOrderConfig(run_dir=run_dir, seed=seed, max_steps=steps, eval_steps=eval_every, rollout=ro,
                            per_device_batch_size=prompts_per_step, num_generations=generations, lr=lr,
                            wandb_mode="disabled", save_total_limit=1)
    trainer = UnmaskOrderTrainer(cfg, policy, rl_rows, eval_fn=eval_fn if eval_every else None)
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    if best["state"] is not None:
        policy.head.load_state_dict(best["state"])
    return policy.head, best, elapsed


def mean_std(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):5.1f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0.0):4.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="denoising steps for 17 completion tokens")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sft-steps", type=int, default=120)
    ap.add_argument("--rl-steps", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=0, help="> 0: keep the best head on the validation set")
    ap.add_argument("--n-test", type=int, default=128)
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--run-dir", default="runs/bench_unmask_order")
    ap.add_argument("--sft-dir", default=None, help="reuse this SFT checkpoint if it exists, else write it there")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.sft_steps, args.rl_steps, args.eval_every, args.n_test, args.n_val, args.seeds = 20, 4, 2, 32, 32, [0]
    torch.set_num_threads(2)

    sft_rows, rl_rows, val_rows, test_rows = split_data(64, 512, args.n_val, args.n_test)
    ro = RolloutOptions(gen_length=17, block_length=17, steps=args.steps, temperature=0.0)
    t0 = time.perf_counter()
    if args.sft_dir and (Path(args.sft_dir) / "config.json").is_file():
        dllm = PolicyAdapter.from_pretrained(args.sft_dir)
        print(f"SFT checkpoint loaded from {args.sft_dir}", flush=True)
    else:
        dllm = sft(build_tiny_policy(seed=0), sft_rows, args.sft_steps, f"{args.run_dir}/sft")
        print(f"SFT: 64 puzzles, {args.sft_steps} steps, {time.perf_counter() - t0:.0f} s", flush=True)
        if args.sft_dir:
            dllm.save_pretrained(args.sft_dir)

    low_conf = evaluate(dllm, test_rows, ro, order="low_confidence")
    rand = {s: evaluate(dllm, test_rows, ro, order="random", seed=s) for s in args.seeds}
    print(f"baselines: low-confidence exact {100 * low_conf[0]:.1f}%; random exact "
          + ", ".join(f"{100 * v[0]:.1f}%" for v in rand.values()), flush=True)
    learned = {}
    for s in args.seeds:
        head, best, secs = train_order(dllm, rl_rows, val_rows, ro, seed=s, steps=args.rl_steps,
                                       eval_every=args.eval_every, run_dir=f"{args.run_dir}/seed{s}",
                                       prompts_per_step=args.prompts_per_step, generations=args.generations, lr=args.lr)
        learned[s] = evaluate(dllm, test_rows, ro, order="learned", head=head)
        chosen = f"best val exact {100 * best['acc']:.1f}% at step {best['step']}" if args.eval_every else "final head"
        print(f"seed {s}: RL {args.rl_steps} steps in {secs:.0f} s ({chosen}); test exact "
              f"{100 * learned[s][0]:.1f}% cell {100 * learned[s][1]:.1f}%; conf gate "
              f"{float(head.conf_gate[0]) * head.conf_scale:.2f}", flush=True)

    k = -(-17 // args.steps)
    lc = low_conf[0]
    print(f"\nSudoku 4x4, tiny dLLM after 64-puzzle SFT; {len(test_rows)} held-out puzzles; 17 tokens in "
          f"{args.steps} steps (up to {k} per step), greedy tokens; seeds {args.seeds}")
    print("| order | exact solve % (mean ± std) | cell acc % | exact / low-confidence |")
    print("|---|---|---|---|")
    rows = [("random", [rand[s] for s in args.seeds]), ("low-confidence", [low_conf] * len(args.seeds)),
            ("learned (uniform init, RL)", [learned[s] for s in args.seeds])]
    for name, vals in rows:
        ex, ce = [v[0] for v in vals], [v[1] for v in vals]
        ratio = statistics.mean(ex) / lc if lc else float("nan")
        print(f"| {name} | {mean_std(ex)} | {mean_std(ce)} | {ratio:.2f}x |")
    print("per seed exact %: " + "; ".join(
        f"seed {s}: random {100 * rand[s][0]:.1f}, learned {100 * learned[s][0]:.1f}" for s in args.seeds)
          + f"; low-confidence {100 * lc:.1f}")


if __name__ == "__main__":
    main()

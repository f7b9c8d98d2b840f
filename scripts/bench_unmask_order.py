"""Benchmark: a learned unmasking order vs random order vs low-confidence remasking (Sudoku 4x4).

Data: the recipe's ``sudoku4`` task (rl/tasks.py, prompt_style minimal, split_seed 1234): the
same SFT / RL / validation / held-out test splits and prompts as ``python -m recipes``, so the
numbers compare with the recipe's eval (nothing downloaded).

  1. The dLLM: ``--sft-model PATH`` (e.g. the recipe's ``runs/.../sft/final``; one path for every
     seed, or one per seed), else a masked-diffusion SFT of the tiny model on the task's SFT split.
  2. Per seed: train an unmasking-order head (uniform initial scores, frozen dLLM) with
     ``UnmaskOrderTrainer`` on the RL split, reward = fraction of empty cells right. Reported: the
     final head, and with ``--eval-every N`` also the head of the best validation exact-solve rate
     (never the test split; on 128 validation puzzles this pick is noisy).
  3. Evaluate exact-solve accuracy on the held-out test split at the same number of denoising steps
     (fewer steps than tokens, so several positions are committed per step and order matters):
     random order (sampler's ``remasking="random"``, seeded per seed), low-confidence remasking
     (LLaDA), and the learned heads (top-K of their scores). Tokens are greedy (temperature 0) everywhere.

    .venv/bin/python scripts/bench_unmask_order.py --seeds 0 --sft-model runs/v3/seed0/sft/best \
        --steps 9 --rl-steps 150 --eval-every 10   # ~5 min per seed (the recipe's SFT checkpoint per seed)
    .venv/bin/python scripts/bench_unmask_order.py --quick    # smoke run (in-script SFT)
"""

from __future__ import annotations

import argparse
import dataclasses
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

from rewards.sudoku import sudoku_score, sudoku_solved  # noqa: E402
from rl.config import RolloutOptions, SFTConfig  # noqa: E402
from rl.data import encode_prompt, left_pad  # noqa: E402
from rl.sft import SFTTrainer  # noqa: E402
from rl.unmask_order import (OrderPolicy, PlackettLuceOrder, UnmaskOrderConfig, UnmaskOrderTrainer,  # noqa: E402
                             generate_with_order, load_order_policy)
from rollout import PolicyAdapter, build_tiny_policy, generate  # noqa: E402


def task_splits():
    """The default recipe's sudoku4 splits (its composed config: configs/task/sudoku4.yaml)."""
    from recipes.config import load_config
    from rl.tasks import build_task

    task = build_task(load_config().task)
    return tuple(task.rows(s) for s in ("sft", "rl", "val", "test"))


def fresh_test_rows(n: int, taken: list[list[dict]], seed: int = 424_242) -> list[dict]:
    """``n`` procedurally generated puzzles in no split of the recipe's task (a larger held-out
    test set: 256 puzzles resolve differences of a few points only), prompted like the task."""
    from recipes.config import load_config
    from rewards.sudoku import make_sudoku_dataset
    from rl.tasks import sudoku_prompt

    seen = {r["puzzle"] for rows in taken for r in rows}
    style = load_config().task.prompt_style
    rows = [r for r in make_sudoku_dataset(2 * n + len(seen), seed) if r["puzzle"] not in seen][:n]
    if len(rows) < n:
        raise ValueError(f"--extra-test {n}: only {len(rows)} fresh puzzles found")
    return [{**r, "prompt": sudoku_prompt(r["puzzle"], style), "response": r["solution"]} for r in rows]


def sft(policy, rows, steps: int, run_dir: str):
    data = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
    data = data * max(1, -(-128 // len(data)))  # >= one batch of 128 (each puzzle, fresh masks)
    cfg = SFTConfig(run_dir=run_dir, max_steps=steps, lr=1e-3, per_device_batch_size=128, export_hf=False,
                    wandb_mode="disabled", seed=0)
    SFTTrainer(cfg, policy, data).train()
    return policy


@torch.no_grad()
def evaluate(dllm, rows, ro: RolloutOptions, *, order: str, head=None, seed: int = 0, batch: int = 128,
             outputs: list | None = None):
    """Exact-solve and cell accuracy on ``rows``: ``order`` in random | low_confidence | learned.
    ``outputs``: receives each batch's completion token ids."""
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
        if outputs is not None:
            outputs.append(out.sequences[:, ids.shape[1]:])
        for r, text in zip(chunk, out.decode(tok)):
            solved.append(float(sudoku_solved(text, r["puzzle"], r["solution"])))
            cells.append(sudoku_score(text, r["puzzle"], r["solution"]))
    return sum(solved) / len(solved), sum(cells) / len(cells)


def train_order(dllm, rl_rows, val_rows, ro: RolloutOptions, *, seed: int, steps: int, eval_every: int,
                run_dir: str, prompts_per_step: int, generations: int, lr: float, conf_scale: float,
                residual_bound: float, block_kl: float):
    """Order head from uniform scores, trained ``steps`` steps; returns it (the final head) and,
    with ``eval_every``, the best validation exact-solve rate, its step and its head state."""
    policy = OrderPolicy(dllm, conf_scale=conf_scale, residual_bound=residual_bound, seed=seed)
    best = {"acc": -1.0, "step": 0, "state": None}

    def eval_fn(module, step):
        acc, cell = evaluate(module.dllm, val_rows, ro, order="learned", head=module.head)
        if acc > best["acc"]:
            best.update(acc=acc, step=step, state={k: v.clone() for k, v in module.head.state_dict().items()})
        return {"eval/exact": acc, "eval/cell": cell}

    cfg = UnmaskOrderConfig(run_dir=run_dir, seed=seed, max_steps=steps, eval_steps=eval_every, rollout=ro,
                            per_device_prompts=prompts_per_step, num_generations=generations, lr=lr,
                            block_kl=block_kl, wandb_mode="disabled", save_total_limit=1)
    trainer = UnmaskOrderTrainer(cfg, policy, rl_rows, eval_fn=eval_fn if eval_every else None)
    t0 = time.perf_counter()
    trainer.train()
    return policy.head, best, time.perf_counter() - t0


def score_head(dllm, head, rows, ro: RolloutOptions, lc_out: list) -> tuple[tuple[float, float], str]:
    """Test (exact, cell) of a learned head and a report line, with how often its completion equals
    low-confidence's (``lc_out``: :func:`evaluate`'s outputs for low-confidence on ``rows``)."""
    out: list = []
    res = evaluate(dllm, rows, ro, order="learned", head=head, outputs=out)
    same = sum(int((a == b).all(1).sum()) for a, b in zip(out, lc_out)) / len(rows)
    gate = float(head.conf_gate.detach()[0]) * head.conf_scale
    return res, (f"(conf gate {gate:.2f}): test exact {100 * res[0]:.1f}% cell {100 * res[1]:.1f}%, the same "
                 f"completion as low-confidence on {100 * same:.1f}% of test puzzles")


def mean_std(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):5.1f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0.0):4.1f}"


def load_dllms(args, sft_rows) -> dict[int, PolicyAdapter]:
    """One frozen dLLM per learner seed: ``--sft-model`` (one path for all seeds or one per seed),
    else an in-script SFT (cached in ``--sft-dir``)."""
    if args.sft_model:
        if len(args.sft_model) not in (1, len(args.seeds)):
            raise ValueError(f"--sft-model: give one path or one per seed ({len(args.seeds)}), got {len(args.sft_model)}")
        paths = args.sft_model * len(args.seeds) if len(args.sft_model) == 1 else args.sft_model
        cache: dict[str, PolicyAdapter] = {}
        for p in paths:
            if not (Path(p) / "config.json").is_file():
                raise FileNotFoundError(f"--sft-model {p}: no HF checkpoint (config.json) there")
            cache.setdefault(p, PolicyAdapter.from_pretrained(p).eval())
        for s, p in zip(args.seeds, paths):
            print(f"seed {s}: SFT checkpoint {p}", flush=True)
        return {s: cache[p] for s, p in zip(args.seeds, paths)}
    if args.sft_dir and (Path(args.sft_dir) / "config.json").is_file():
        dllm = PolicyAdapter.from_pretrained(args.sft_dir)
        print(f"SFT checkpoint loaded from {args.sft_dir}", flush=True)
    else:
        t0 = time.perf_counter()
        dllm = sft(build_tiny_policy(seed=0), sft_rows, args.sft_steps, f"{args.run_dir}/sft")
        print(f"SFT: {len(sft_rows)} puzzles, {args.sft_steps} steps, {time.perf_counter() - t0:.0f} s", flush=True)
        if args.sft_dir:
            dllm.save_pretrained(args.sft_dir)
    return {s: dllm for s in args.seeds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=9, help="denoising steps for 17 completion tokens")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sft-model", nargs="+", default=None, metavar="PATH",
                    help="HF dLLM checkpoint(s) to freeze (one for every seed, or one per seed)")
    ap.add_argument("--sft-steps", type=int, default=120, help="in-script SFT steps (without --sft-model)")
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=5, help="> 0: keep the best head on the validation split")
    ap.add_argument("--n-test", type=int, default=0, help="first N test puzzles (0 = the whole split)")
    ap.add_argument("--extra-test", type=int, default=0,
                    help="add N fresh puzzles (in no split of the task) to the held-out test set")
    ap.add_argument("--n-val", type=int, default=0, help="first N validation puzzles (0 = the whole split)")
    ap.add_argument("--run-dir", default="runs/bench_unmask_order")
    ap.add_argument("--sft-dir", default=None, help="reuse this in-script SFT checkpoint if it exists, else write it there")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--conf-scale", type=float, default=500.0, help="head: confidence-gate multiplier")
    ap.add_argument("--residual-bound", type=float, default=1.0, help="head: bound of the block's score (0 = unbounded)")
    ap.add_argument("--block-kl", type=float, default=0.2, help="trainer: KL(pi || confidence-only pi) coefficient")
    ap.add_argument("--eval-heads", nargs="+", default=None, metavar="RUN_DIR",
                    help="evaluate the final heads saved in RUN_DIR/seed{S}/final (earlier runs) instead of training")
    ap.add_argument("--baselines-only", action="store_true", help="print the fixed orders' accuracies and stop")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.sft_steps, args.rl_steps, args.eval_every, args.n_test, args.n_val, args.seeds = 20, 4, 2, 32, 32, [0]
    torch.set_num_threads(args.threads)

    sft_rows, rl_rows, val_rows, test_rows = task_splits()
    val_rows = val_rows[:args.n_val] if args.n_val else val_rows
    test_rows = test_rows[:args.n_test] if args.n_test else test_rows
    if args.extra_test:
        test_rows = test_rows + fresh_test_rows(args.extra_test, [sft_rows, rl_rows, val_rows, test_rows])
    ro = RolloutOptions(gen_length=17, block_length=17, steps=args.steps, temperature=0.0)
    dllms = load_dllms(args, sft_rows)

    lc_out = {s: [] for s in args.seeds}  # low-confidence's completions, to compare the learned ones with
    low_conf = {s: evaluate(dllms[s], test_rows, ro, order="low_confidence", outputs=lc_out[s]) for s in args.seeds}
    rand = {s: evaluate(dllms[s], test_rows, ro, order="random", seed=s) for s in args.seeds}
    full = {s: evaluate(dllms[s], test_rows, dataclasses.replace(ro, steps=17), order="low_confidence")
            for s in args.seeds}
    other = {(s, o): evaluate(dllms[s], test_rows, ro, order=o)[0] for s in args.seeds for o in ("margin", "entropy")}
    print("baselines (test exact): " + "; ".join(
        f"seed {s}: low-confidence {100 * low_conf[s][0]:.1f}%, random {100 * rand[s][0]:.1f}%, "
        f"margin {100 * other[s, 'margin']:.1f}%, entropy {100 * other[s, 'entropy']:.1f}%, "
        f"low-confidence at 17 steps {100 * full[s][0]:.1f}%" for s in args.seeds), flush=True)
    if args.baselines_only:
        return
    if args.eval_heads:  # saved final heads instead of training
        for s in args.seeds:
            for run in args.eval_heads:
                head = load_order_policy(Path(run) / f"seed{s}" / "final").head
                print(f"seed {s}: {run} final head {score_head(dllms[s], head, test_rows, ro, lc_out[s])[1]}",
                      flush=True)
        return
    final, picked = {}, {}  # test (exact, cell) of the final head / of the best-validation head
    for s in args.seeds:
        head, best, secs = train_order(dllms[s], rl_rows, val_rows, ro, seed=s, steps=args.rl_steps,
                                       eval_every=args.eval_every, run_dir=f"{args.run_dir}/seed{s}",
                                       prompts_per_step=args.prompts_per_step, generations=args.generations, lr=args.lr,
                                       conf_scale=args.conf_scale, residual_bound=args.residual_bound,
                                       block_kl=args.block_kl)
        final[s], text = score_head(dllms[s], head, test_rows, ro, lc_out[s])
        line = f"seed {s}: RL {args.rl_steps} steps in {secs:.0f} s; final head {text}"
        if best["state"] is not None:
            head.load_state_dict(best["state"])
            picked[s] = evaluate(dllms[s], test_rows, ro, order="learned", head=head)
            line += (f"; best-validation head (val exact {100 * best['acc']:.1f}% at step {best['step']}): test exact "
                     f"{100 * picked[s][0]:.1f}% cell {100 * picked[s][1]:.1f}%")
        print(line, flush=True)

    k = -(-17 // args.steps)
    src = "SFT checkpoint(s) " + ", ".join(sorted(set(args.sft_model))) if args.sft_model else "in-script SFT"
    extra = f" (the task's test split + {args.extra_test} fresh)" if args.extra_test else ""
    print(f"\nSudoku 4x4 (recipe task sudoku4), tiny dLLM from {src}; {len(test_rows)} held-out test puzzles{extra}; "
          f"17 tokens in {args.steps} steps (up to {k} per step), greedy tokens; seeds {args.seeds}")
    print("| order | exact solve % (mean ± std) | cell acc % | exact / low-confidence |")
    print("|---|---|---|---|")
    lc = statistics.mean(low_conf[s][0] for s in args.seeds)
    rows = [("random", rand), ("low-confidence", low_conf), ("learned (uniform init, RL), final head", final)]
    if picked:
        rows.append(("learned, best-validation head", picked))
    for name, res in rows:
        ex, ce = [res[s][0] for s in args.seeds], [res[s][1] for s in args.seeds]
        ratio = statistics.mean(ex) / lc if lc else float("nan")
        print(f"| {name} | {mean_std(ex)} | {mean_std(ce)} | {ratio:.2f}x |")
    print("per seed exact %: " + "; ".join(
        f"seed {s}: random {100 * rand[s][0]:.1f}, low-confidence {100 * low_conf[s][0]:.1f}, "
        f"learned final {100 * final[s][0]:.1f}" + (f", best-validation {100 * picked[s][0]:.1f}" if picked else "")
        for s in args.seeds))


if __name__ == "__main__":
    main()

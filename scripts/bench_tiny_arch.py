"""SFT sample efficiency of the two built-in tiny architectures on 4x4 Sudoku, in one run.

Same tokenizer, data, seed, optimiser and steps for both; masked-diffusion SFT on the solution
(t ~ U(eps, 1), cross-entropy on masked tokens), then exact-solve accuracy on held-out puzzles
(greedy, low-confidence remasking, one token per step). Prints each and the ratio.

    python scripts/bench_tiny_arch.py --train 500 --steps 200
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from rewards.sudoku import make_sudoku_dataset, sudoku_solved
from rl.data import encode_prompt, left_pad
from rl.sft import collate_sft, encode_sft_example
from rollout import build_tiny_policy, generate


def run(arch: str, train: list[dict], test: list[dict], args) -> tuple[float, float]:
    policy = build_tiny_policy(seed=args.seed, arch=arch)
    tok = policy.tokenizer
    enc = [encode_sft_example(tok, r["puzzle"], r["solution"], max_length=64) for r in train]
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.randint(0, len(enc), (args.batch,), generator=g).tolist()
        b = collate_sft([enc[i] for i in idx], tok.pad_token_id)
        x, resp = b["input_ids"], b["response_mask"].bool()
        t = 1e-3 + (1 - 1e-3) * torch.rand(x.shape[0], 1, generator=g)
        masked = (torch.rand(x.shape, generator=g) < t) & resp
        noisy = torch.where(masked, torch.full_like(x, tok.mask_token_id), x)
        loss = F.cross_entropy(policy(noisy, attention_mask=b["attention_mask"]).logits[masked], x[masked])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - t0
    policy.eval()
    ids, mask = left_pad([encode_prompt(tok, r["puzzle"]) for r in test], tok.pad_token_id)
    ro = generate(policy, ids, attention_mask=mask, steps=17, gen_length=17, block_length=17, mask_id=tok.mask_token_id)
    acc = sum(sudoku_solved(c, r["puzzle"], r["solution"]) for c, r in zip(ro.decode(tok), test)) / len(test)
    return acc, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--test", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = make_sudoku_dataset(args.train + args.test, seed=args.seed)
    train, test = data[:args.train], data[args.train:]
    results = {arch: run(arch, train, test, args) for arch in ("eurobert", "bert")}
    print(f"SFT on {args.train} puzzles, {args.steps} steps x {args.batch}, lr {args.lr}; {args.test} held-out puzzles")
    print(f"{'arch':<9} {'exact solve':>11} {'train s':>8}")
    for arch, (acc, sec) in results.items():
        print(f"{arch:<9} {acc:>10.1%} {sec:>8.0f}")
    base = max(results["eurobert"][0], 1e-9)
    print(f"ratio bert/eurobert exact solve: {results['bert'][0] / base:.2f}x")


if __name__ == "__main__":
    main()

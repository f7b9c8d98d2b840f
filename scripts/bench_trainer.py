"""One diffu-GRPO update (mu iterations on a fixed batch of rollouts): ours vs a naive d1-style
computation, in the same run, on the same model, data and shapes.

- ours: ``DiffuGRPOTrainer.policy_update`` (LM head only on completion positions, chunked
  selected log-softmax, old-policy log-probs computed once per mask before the updates,
  iteration 0 reusing its own forward);
- naive: full-vocab float32 ``log_softmax`` over every position, old-policy and reference
  log-probs recomputed with an extra forward at every iteration, plain torch AdamW.

Each variant runs in its own subprocess so that peak memory is its own: after a warm-up update,
the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), one update is timed, and the
peak growth over the pre-step RSS is reported.

    python scripts/bench_trainer.py                 # LLaDA's vocabulary (126,464), gen 256
    python scripts/bench_trainer.py --vocab 32000 --gen-length 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def build(args):
    import torch
    from transformers import EuroBertConfig, EuroBertForMaskedLM

    from rollout import PolicyAdapter
    from rollout.tiny import build_tiny_tokenizer
    from rollout.types import Rollout, completion_mask_from_eos

    tok = build_tiny_tokenizer()
    cfg = EuroBertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, intermediate_size=3 * args.hidden, max_position_embeddings=2048,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)  # a benchmark process of its own: global seeding is fine here
    policy = PolicyAdapter(EuroBertForMaskedLM(cfg), tok)
    n, p, l = args.prompts * args.generations, args.prompt_len, args.gen_length
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(8, args.vocab, (n, p), generator=g)
    prompt_mask = torch.ones(n, p, dtype=torch.long)
    prompt_mask[::2, : p // 4] = 0  # some left padding
    prompt_ids[prompt_mask == 0] = tok.pad_token_id
    completion = torch.randint(8, args.vocab, (n, l), generator=g)
    eos_at = torch.randint(l // 2, l, (n,), generator=g)
    completion[torch.arange(n), eos_at] = tok.eos_token_id
    ro = Rollout(sequences=torch.cat([prompt_ids, completion], 1), prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                 completion_ids=completion, completion_mask=completion_mask_from_eos(completion, tok.eos_token_id),
                 unmask_step=torch.zeros(n, l, dtype=torch.long), num_forward_passes=0)
    adv = torch.randn(n, generator=g)
    return policy, ro, adv


def run_ours(args, policy, ro, adv):
    from rl.config import DiffuGRPOConfig
    from rl.grpo import DiffuGRPOTrainer

    cfg = DiffuGRPOConfig(run_dir=args.run_dir, per_device_prompts=args.prompts, num_generations=args.generations,
                          num_iterations=args.mu, beta=args.beta, lr=1e-5, rewards={"gsm8k": 1.0}, export_hf=False)
    trainer = DiffuGRPOTrainer(cfg, policy, [{"prompt": "x"}] * args.prompts)
    return lambda: trainer.policy_update(ro, adv)


def run_naive(args, policy, ro, adv):
    """d1-style: full fp32 log-softmax everywhere; old/ref log-probs recomputed every iteration."""
    import copy

    import torch

    ref = copy.deepcopy(policy).eval().requires_grad_(False) if args.beta > 0 else None
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    seqs, attn = ro.sequences, ro.attention_mask
    p = ro.prompt_ids.shape[1]
    cmask = ro.completion_mask.float()
    mask_id = policy.mask_token_id

    def logps(model, noisy):
        logits = model(noisy, attention_mask=attn).logits
        lp = logits.float().log_softmax(-1)  # [N, T, V] float32
        return lp.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)[:, p:]

    def update():
        for _ in range(args.mu):
            noisy = seqs.clone()
            noisy[:, p:] = mask_id
            prompt_masked = (torch.rand(seqs.shape[0], p) < 0.15) & (attn[:, :p] == 1)
            noisy[:, :p][prompt_masked] = mask_id
            with torch.no_grad():
                old = logps(policy, noisy)
                ref_lp = logps(ref, noisy) if ref is not None else None
            lp = logps(policy, noisy)
            ratio = torch.exp(lp - old)
            a = adv.unsqueeze(1)
            per_tok = -torch.minimum(ratio * a, torch.clamp(ratio, 0.5, 1.5) * a)
            if ref_lp is not None:
                d = ref_lp - lp
                per_tok = per_tok + args.beta * (torch.exp(d) - d - 1)
            loss = (per_tok * cmask).sum() / cmask.sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return update


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    policy, ro, adv = build(args)
    update = (run_ours if args.variant == "ours" else run_naive)(args, policy, ro, adv)
    update()  # warm-up: optimizer state, allocator pools
    rss = _rss_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    update()
    dt = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    print(json.dumps({"variant": args.variant, "seconds": dt, "peak_growth_mib": (peak - rss) / 1024,
                      "rss_before_mib": rss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=126_464)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--mu", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=["ours", "naive"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default="/tmp/bench_trainer_run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        child(args)
        return
    results = {}
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    for variant in ("naive", "ours"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{variant} failed:\n{out.stderr[-4000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    n = args.prompts * args.generations
    print(f"diffu-GRPO update: rows={n} prompt={args.prompt_len} gen={args.gen_length} vocab={args.vocab} "
          f"hidden={args.hidden} layers={args.layers} mu={args.mu} beta={args.beta}")
    print(f"{'variant':<8} {'time (s)':>9} {'peak growth (MiB)':>18}")
    for v in ("naive", "ours"):
        r = results[v]
        print(f"{v:<8} {r['seconds']:>9.2f} {r['peak_growth_mib']:>18.0f}")
    a, b = results["ours"], results["naive"]
    print(f"ratio ours/naive: time {a['seconds'] / b['seconds']:.2f}x, "
          f"peak memory {a['peak_growth_mib'] / b['peak_growth_mib']:.2f}x")


if __name__ == "__main__":
    main()

"""Benchmark of the rollout engine's fast modes against the LLaDA baseline, on the same prompts.

Fast modes only pay off when the model is confident, so by default the script first trains the
built-in tiny model briefly (masked-diffusion SFT, ``rl.losses.diffusion_sft_loss``) on a
procedural digit task (copy / reverse / sort a digit string; the completion is the answer then
EOS up to ``gen_length``, as in LLaDA's SFT), or loads ``--model PATH``. It then prints one table:
forward passes, tokens/s, wall time, per-step time, ratios to the baseline, token agreement with
the baseline, and task accuracy, plus untrained-model sanity rows.

    .venv/bin/python scripts/bench_rollout.py            # train ~30 s, then bench (~1 min total unloaded)
    .venv/bin/python scripts/bench_rollout.py --model PATH --gen-length 256 --block-length 32
    .venv/bin/python scripts/bench_rollout.py --arch llada --save runs/llada20m   # a 20.6M LLaDA-architecture model
    .venv/bin/python scripts/bench_rollout.py --model runs/llada20m                # its published-layout folder
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.losses import diffusion_sft_loss  # noqa: E402
from rollout import PolicyAdapter, build_tiny_policy, generate  # noqa: E402
from rollout.models import LLaDAConfig, LLaDAForMaskedLM  # noqa: E402
from rollout.tiny import build_tiny_tokenizer  # noqa: E402

# LLaDA's architecture (Llama blocks, bidirectional) at ~20.6M parameters with the built-in tokenizer.
LLADA_BENCH = dict(d_model=512, n_heads=8, n_layers=6, mlp_hidden_size=1536, activation_type="silu",
                   block_type="llama", rope=True, rope_theta=500000.0, layer_norm_type="rms", weight_tying=False,
                   max_sequence_length=1024, init_std=0.02, attention_dropout=0.0, residual_dropout=0.0,
                   embedding_dropout=0.0)


def build_policy(arch: str, seed: int, published_code: str | None = None, sizes: dict | None = None) -> PolicyAdapter:
    """A fresh model: the built-in tiny one, or LLaDA's architecture in its published layout
    (``published_code``: a folder with LLaDA's .py files to ship beside the weights). ``sizes``
    overrides the tiny model's (``hidden_size``, ...) or :data:`LLADA_BENCH`'s (``d_model``, ...) sizes."""
    if arch == "tiny":
        return build_tiny_policy(seed=seed, **(sizes or {}))
    tok = build_tiny_tokenizer()
    config = LLaDAConfig(**{**LLADA_BENCH, **(sizes or {})}, vocab_size=len(tok),
                         embedding_size=-(-len(tok) // 128) * 128, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDAForMaskedLM(config)
    if published_code:
        model.published_files = {p.name: p.read_text() for p in Path(published_code).glob("*.py")}
    return PolicyAdapter(model, tok)


OPS = {"copy": lambda d: d, "reverse": lambda d: d[::-1], "sort": lambda d: "".join(sorted(d))}


def make_examples(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs such as ("reverse 40913", "31904")."""
    out = []
    for _ in range(n):
        op = rng.choice(sorted(OPS))
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 10)))
        out.append((f"{op} {digits}", OPS[op](digits)))
    return out


def encode_prompts(tok, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    enc = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def make_batch(tok, examples, gen_length: int):
    """Left-padded prompts + completions ``answer <eos> <eos> ...`` of exactly ``gen_length``."""
    ids, mask = encode_prompts(tok, [p for p, _ in examples])
    comp = torch.full((len(examples), gen_length), tok.eos_token_id, dtype=torch.long)
    for i, (_, ans) in enumerate(examples):
        a = tok(ans, add_special_tokens=False).input_ids[: gen_length - 1]
        comp[i, : len(a)] = torch.tensor(a)
    input_ids = torch.cat([ids, comp], 1)
    attn = torch.cat([mask, torch.ones_like(comp)], 1)
    resp = torch.cat([torch.zeros_like(mask), torch.ones_like(comp)], 1)
    return input_ids, attn, resp


def lr_factor(step: int, total: int, warmup: int, decay_to: float) -> float:
    """The learning rate at ``step`` as a fraction of the peak: linear warm-up over ``warmup`` steps
    times a linear decay from 1 to ``decay_to`` over ``total`` steps."""
    return min(1.0, (step + 1) / max(warmup, 1)) * (1 - (1 - decay_to) * min(1.0, step / max(total, 1)))


def train(policy: PolicyAdapter, args, sample: Callable[[random.Random, int], list] = make_examples, *,
          decay_to: float = 1.0, check: Callable[[int], bool] | None = None, check_every: int = 0,
          noise: Callable[[torch.Tensor, torch.Generator], tuple] | None = None, warmup: int = 20,
          weight_decay: float = 0.0) -> float:
    """Masked-diffusion SFT of ``policy`` on ``sample(rng, n)``'s (prompt, completion) pairs (default:
    the digit task) for ``args.train_steps`` steps of ``args.train_batch``; returns the last smoothed loss.

    AdamW, ``weight_decay`` on every parameter (as the runs in docs/benchmarks.md were made; the
    trainers' :func:`rl.engine.param_groups` exempts biases and norms); the learning rate warms up
    linearly over ``warmup`` steps, then decays linearly to ``decay_to * args.lr`` (:func:`lr_factor`);
    every ``check_every`` steps ``check(step)`` runs (the model in eval mode) and training stops if it
    returns True. ``noise(response_mask, generator)``: the loss's ``(t, masked)`` (default: LLaDA's
    i.i.d. masking, :func:`rl.losses.draw_sft_noise`)."""
    rng, g = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=weight_decay)
    total = args.train_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, decay_to))
    policy.train()
    ema, losses = None, []
    bar = tqdm(range(total), desc=f"train {type(policy.model).__name__}", file=sys.stdout, mininterval=2)
    for step in bar:
        ids, attn, resp = make_batch(policy.tokenizer, sample(rng, args.train_batch), args.gen_length)
        loss = diffusion_sft_loss(policy, ids, resp, mask_id=policy.mask_token_id, attention_mask=attn, generator=g,
                                  noise=noise(resp, g) if noise is not None else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        if len(losses) == 10:  # one host sync per 10 steps
            for v in torch.stack(losses).tolist():
                ema = v if ema is None else 0.9 * ema + 0.1 * v
            losses.clear()
            bar.set_postfix(loss=f"{ema:.3f}")
        if check is not None and check_every and (step + 1) % check_every == 0 and step + 1 < total:
            policy.eval()
            stop = check(step + 1)
            policy.train()
            if stop:
                break
    for v in torch.stack(losses).tolist() if losses else []:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
    policy.eval()
    return ema


def accuracy(rollout, tok, answers) -> float:
    texts = rollout.decode(tok)
    return sum(t.strip() == a for t, a in zip(texts, answers)) / len(answers)


def bench(policy, ids, mask, answers, modes, args, label="", base=None):
    """Run every mode once (after the caller's warm-up); rows of measurements. Ratios are to the
    first mode's run, or to ``base`` = (rollout, wall) when given (agreement is then not defined)."""
    rows, foreign = [], base is not None
    for name, kw in tqdm(modes, desc=f"bench {label}".strip(), file=sys.stdout, mininterval=1):
        t0 = time.perf_counter()
        out = generate(policy, ids, attention_mask=mask, steps=args.steps, gen_length=args.gen_length,
                       block_length=args.block_length, mask_id=policy.mask_token_id,
                       eos_id=policy.eos_token_id, **kw)
        wall = time.perf_counter() - t0
        if base is None:
            base = (out, wall)
        agree = float("nan") if foreign else (out.completion_ids == base[0].completion_ids).float().mean().item()
        rows.append(dict(mode=name, nfe=out.num_forward_passes, steps=out.num_steps, wall=wall,
                         tps=ids.shape[0] * args.gen_length / wall, step_ms=1000 * wall / out.num_steps,
                         speedup=base[1] / wall, nfe_ratio=base[0].num_forward_passes / out.num_forward_passes,
                         step_speedup=(base[1] / base[0].num_steps) / (wall / out.num_steps),
                         agree=agree, acc=accuracy(out, policy.tokenizer, answers)))
    return rows, base


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{v:.1%}"


def print_table(rows):
    head = (f"{'mode':<34} {'NFE':>5} {'tok/s':>8} {'wall s':>7} {'ms/step':>8} {'x wall':>7} {'x NFE':>6} "
            f"{'x step':>7} {'agree':>6} {'acc':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['mode']:<34} {r['nfe']:>5} {r['tps']:>8.0f} {r['wall']:>7.2f} {r['step_ms']:>8.1f} "
              f"{r['speedup']:>7.2f} {r['nfe_ratio']:>6.2f} {r['step_speedup']:>7.2f} {_pct(r['agree']):>6} "
              f"{r['acc']:>5.0%}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a trained model path / hub name (skips training)")
    ap.add_argument("--arch", choices=("tiny", "llada"), default="tiny", help="model to train when --model is not given")
    ap.add_argument("--published-code", help="with --arch llada --save: copy LLaDA's .py files (e.g. "
                    "../shared/models/llada) into the saved folder so the published code loads it too")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="baseline denoising steps (default: gen_length)")
    ap.add_argument("--batch", type=int, default=4, help="prompts per bench batch")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--early-commit", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for the tiny model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="save the trained tiny model here")
    args = ap.parse_args(argv)
    args.steps = args.steps or args.gen_length
    torch.set_num_threads(args.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()

    if args.model:
        policy = PolicyAdapter.from_pretrained(args.model).eval()
        arch = "llada" if policy.config.model_type == "llada" else "tiny"
        train_note = f"model {args.model}"
    else:
        arch = args.arch
        policy = build_policy(arch, args.seed, args.published_code)
        t0 = time.perf_counter()
        loss = train(policy, args)
        train_note = (f"{arch} model trained {args.train_steps} steps x {args.train_batch} in "
                      f"{time.perf_counter() - t0:.0f}s (final loss {loss:.3f})")
        if args.save:
            policy.save_pretrained(args.save)
    n_params = sum(p.numel() for p in policy.parameters())
    train_note += f"; {type(policy.model).__name__}, {n_params / 1e6:.1f}M parameters"

    examples = make_examples(random.Random(args.seed + 1000), args.batch)
    ids, mask = encode_prompts(policy.tokenizer, [p for p, _ in examples])
    answers = [a for _, a in examples]
    modes = [
        ("baseline (low_confidence)", {}),
        (f"threshold tau={args.threshold}", dict(threshold=args.threshold)),
        ("prefix cache", dict(kv_cache="prefix")),
        ("dual cache", dict(kv_cache="dual")),
        (f"threshold tau={args.threshold} + dual cache", dict(threshold=args.threshold, kv_cache="dual")),
        (f"early commit gap>={args.early_commit}", dict(early_commit=args.early_commit)),
        ("fill after EOS", dict(fill_after_eos=True)),
        (f"threshold + early commit + EOS fill", dict(threshold=args.threshold, early_commit=args.early_commit,
                                                     fill_after_eos=True)),
    ]
    if not policy.supports_kv_cache:
        modes = [m for m in modes if "kv_cache" not in m[1]]
    # warm-up (allocator, kernels) on the same prompts, short
    generate(policy, ids, attention_mask=mask, steps=8, gen_length=2 * args.block_length,
             block_length=args.block_length, mask_id=policy.mask_token_id, kv_cache=None)
    rows, base = bench(policy, ids, mask, answers, modes, args, "trained")
    # sanity: an untrained model has near-uniform confidence, so thresholding gains nothing
    # (ratios to the trained baseline above: same architecture, prompts and steps)
    sanity = build_policy(arch, args.seed + 1).eval()
    sanity_rows, _ = bench(sanity, ids, mask, answers, [modes[1]], args, "untrained", base=base)
    for r in sanity_rows:
        r["mode"] = "untrained: " + r["mode"]

    print(f"\n{train_note}; batch {args.batch}, prompt width {ids.shape[1]}, gen_length {args.gen_length}, "
          f"block_length {args.block_length}, baseline steps {args.steps}, threads {args.threads}")
    print("x wall / x NFE / x step: baseline's wall time / forward passes / time per step over this mode's; "
          "agree: completion tokens equal to the same model's baseline\n")
    print_table(rows + sanity_rows)
    per_step = {r["mode"]: r["step_speedup"] for r in rows if r["mode"] in ("prefix cache", "dual cache")}
    if per_step:
        print("KV-cache per-step speedup vs baseline: " + ", ".join(f"{k} x{v:.2f}" for k, v in per_step.items()))
    thr = rows[1]
    print(f"threshold mode: {rows[0]['nfe'] / thr['nfe']:.1f}x fewer forward passes than the baseline")
    print(f"\ntotal bench time {time.perf_counter() - t_start:.0f}s wall, {time.process_time() - cpu_start:.0f}s CPU "
          f"(wall exceeds CPU when other processes share the cores)")


if __name__ == "__main__":
    main()

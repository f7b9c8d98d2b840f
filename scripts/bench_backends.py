"""Rollout backends head to head: tokens/s of ``rollout.backend=torch`` and ``rollout.backend=vllm``
on the same model, prompts and options, in the same process (runs alternate, so both see the
same machine load), plus the vLLM engine's startup and weight-sync times and token agreement.

    .venv/bin/python scripts/bench_backends.py --model runs/llada20m --batch 64 --gen-length 256 \\
        --block-length 32 --steps 128

``--model``: a checkpoint folder (e.g. the 20.6M LLaDA-architecture model written by
``scripts/bench_rollout.py --arch llada --save runs/llada20m``); without it the untrained model
of the same architecture is built in memory. Results: a table on stdout and ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import RolloutOptions, VLLMOptions  # noqa: E402
from rollout import PolicyAdapter  # noqa: E402
from rollout.engine import RolloutEngine  # noqa: E402
from rollout.models import LLaDAConfig, LLaDAForMaskedLM  # noqa: E402
from rollout.tiny import build_tiny_tokenizer  # noqa: E402

# scripts/bench_rollout.py's LLaDA-architecture model: 20.6M parameters with the character tokenizer
LLADA_20M = dict(d_model=512, n_heads=8, n_layers=6, mlp_hidden_size=1536, activation_type="silu", block_type="llama",
                 rope=True, rope_theta=500000.0, layer_norm_type="rms", weight_tying=False, max_sequence_length=1024,
                 attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0)


def load_policy(path: str | None, seed: int) -> PolicyAdapter:
    if path:
        return PolicyAdapter.from_pretrained(path)
    tok = build_tiny_tokenizer()
    config = LLaDAConfig(**LLADA_20M, vocab_size=len(tok), embedding_size=-(-len(tok) // 128) * 128,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PolicyAdapter(LLaDAForMaskedLM(config), tok)


def prompts(n: int, seed: int) -> list[str]:
    """Digit-task prompts of varied length (``"reverse 40913"``), so rows are left-padded."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):  # the op, then its digits: the draw order of the measured runs
        op = rng.choice(["copy", "reverse", "sort"])
        out.append(f"{op} {''.join(rng.choice('0123456789') for _ in range(rng.randint(4, 10)))}")
    return out


def timed(engine, texts, options) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = engine.generate(texts, options=options, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: untrained 20.6M LLaDA architecture)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=None, help="confidence-threshold decoding (both backends)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per backend (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from rollout.vllm_backend.engine import VLLMEngine

    policy = load_policy(args.model, args.seed).eval()
    n_params = sum(p.numel() for p in policy.parameters())
    options = RolloutOptions(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                             threshold=args.threshold)
    texts = prompts(args.batch, args.seed)
    t0 = time.perf_counter()
    vllm_engine = VLLMEngine(dataclasses.replace(options, backend="vllm", vllm=VLLMOptions()), policy,
                             checkpoint=args.model)
    startup = time.perf_counter() - t0
    sync = vllm_engine.update_weights()  # what a trainer pays after each step
    engines = {"torch": RolloutEngine(options, policy), "vllm": vllm_engine}
    width = engines["torch"].encode(texts)[0].shape[1]
    print(f"model {args.model or 'untrained'}; {type(policy.model).__name__}, {n_params / 1e6:.1f}M parameters; "
          f"batch {args.batch}, prompt width {width}, gen_length {args.gen_length}, block_length {args.block_length}, "
          f"steps {args.steps}, threshold {args.threshold}, threads {torch.get_num_threads()}", flush=True)
    print(f"vllm: engine startup {startup:.1f} s, weight sync {sync:.2f} s", flush=True)
    runs: dict[str, list[float]] = {"torch": [], "vllm": []}
    outs = {}
    for r in range(args.repeats):
        for name in (("torch", "vllm") if r % 2 == 0 else ("vllm", "torch")):
            seconds, outs[name] = timed(engines[name], texts, options)
            runs[name].append(seconds)
            print(f"  run {r} {name}: {seconds:.1f} s, {outs[name].num_forward_passes} forwards", flush=True)
    vllm_engine.close()
    agree = float((outs["torch"].completion_ids == outs["vllm"].completion_ids).float().mean())
    rows = []
    for name, seconds in runs.items():
        best = min(seconds)
        nfe = outs[name].num_forward_passes
        rows.append({"backend": name, "seconds": best, "tokens_per_s": args.batch * args.gen_length / best,
                     "forwards": nfe, "ms_per_forward": 1000 * best / nfe})
    print(f"\n{'backend':<8} {'tok/s':>8} {'wall s':>8} {'forwards':>9} {'ms/forward':>11}")
    for row in rows:
        print(f"{row['backend']:<8} {row['tokens_per_s']:>8.1f} {row['seconds']:>8.1f} {row['forwards']:>9} "
              f"{row['ms_per_forward']:>11.1f}")
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"vllm / torch tokens/s: {ratio:.3f}; tokens equal: {100 * agree:.1f}%")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "params": n_params, "prompt_width": width,
                                              "vllm_startup_s": startup, "vllm_weight_sync_s": sync, "rows": rows,
                                              "runs": runs, "vllm_over_torch": ratio, "tokens_equal": agree},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rollout throughput of a block-diffusion model (SDAR's architecture) vs a bidirectional one (LLaDA's).

Both models are built here with random weights and the same sizes (hidden, layers, heads, head
size, MLP, vocabulary: LLaDA's 20.6M-parameter bench model of ``scripts/bench_rollout.py``), and
decode the same prompts to the same ``gen_length`` with one token per forward pass, so every row
runs the same number of forward passes and tokens/s compares the cost of a pass:

- LLaDA baseline: every step runs the whole sequence (prompt + completion), semi-autoregressive
  blocks of ``--llada-block`` (LLaDA's reference sampler);
- LLaDA + dual cache: Fast-dLLM's approximate cache, the query is one block;
- SDAR: blocks of ``--sdar-block`` (SDAR's trained block size), each step runs the block alone on
  the exact cache of finished blocks (rollout/block_sampler.py);
- SDAR without the cache: each step recomputes the whole prefix (same tokens; what the cache saves).

Ratios are to the LLaDA baseline of the same run, after a warm-up of every row.

    .venv/bin/python scripts/bench_block_rollout.py                       # ~2 min on 2 shared CPU cores
    .venv/bin/python scripts/bench_block_rollout.py --gen-length 256 --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollout import PolicyAdapter, generate  # noqa: E402
from rollout.block_sampler import block_generate  # noqa: E402
from rollout.models import LLaDAConfig, LLaDAForMaskedLM, SDARConfig, SDARForMaskedLM  # noqa: E402
from rollout.tiny import build_tiny_tokenizer  # noqa: E402

SIZES = dict(hidden=512, layers=6, heads=8, mlp=1536)


def build_models(seed: int, sdar_block: int, sizes: dict | None = None) -> tuple[PolicyAdapter, PolicyAdapter]:
    """LLaDA's and SDAR's architectures at the same sizes (:data:`SIZES`, or ``sizes``), random
    init, the built-in tokenizer."""
    sizes = {**SIZES, **(sizes or {})}
    tok = build_tiny_tokenizer()
    rows = -(-len(tok) // 128) * 128  # LLaDA's padded embedding size; SDAR gets as many rows
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id)
    llada = LLaDAConfig(d_model=sizes["hidden"], n_heads=sizes["heads"], n_layers=sizes["layers"],
                        mlp_hidden_size=sizes["mlp"], activation_type="silu", block_type="llama", rope=True,
                        rope_theta=500000.0, layer_norm_type="rms", weight_tying=False, max_sequence_length=4096,
                        init_std=0.02, attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0,
                        vocab_size=rows, embedding_size=rows, **ids)
    sdar = SDARConfig(vocab_size=rows, hidden_size=sizes["hidden"], intermediate_size=sizes["mlp"],
                      num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                      num_key_value_heads=sizes["heads"], head_dim=sizes["hidden"] // sizes["heads"],
                      rope_theta=500000.0, max_position_embeddings=4096, initializer_range=0.02,
                      block_length=sdar_block, **ids)
    out = []
    for cls, config in ((LLaDAForMaskedLM, llada), (SDARForMaskedLM, sdar)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out.append(PolicyAdapter(cls(config), tok).eval())
    return out[0], out[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--prompt-length", type=int, default=30, help="longest prompt; rows are 2/3 to all of it")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--llada-block", type=int, default=32)
    ap.add_argument("--sdar-block", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    for key, value in SIZES.items():
        ap.add_argument(f"--{key}", type=int, default=value)
    args = ap.parse_args(argv)
    sizes = {key: getattr(args, key) for key in SIZES}
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    llada, sdar = (m.to(device=device, dtype=dtype) for m in build_models(args.seed, args.sdar_block, sizes))
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(2 * args.prompt_length // 3, args.prompt_length + 1, (args.batch,), generator=g)
    width = int(lengths.max())
    ids = torch.full((args.batch, width), llada.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths.tolist()):  # left-padded random ordinary tokens (ids past the specials)
        ids[b, width - n:] = torch.randint(8, len(llada.tokenizer), (n,), generator=g)
        mask[b, width - n:] = 1
    ids, mask = ids.to(device), mask.to(device)
    L = args.gen_length
    params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in (("LLaDA", llada), ("SDAR", sdar))}

    def llada_run(cache):
        return lambda n: generate(llada, ids, attention_mask=mask, steps=n, gen_length=n,
                                  block_length=args.llada_block, mask_id=llada.mask_token_id, kv_cache=cache)

    def sdar_run(exact):
        return lambda n: block_generate(sdar, ids, attention_mask=mask, steps=n, gen_length=n,
                                        block_length=args.sdar_block, mask_id=sdar.mask_token_id,
                                        eos_id=sdar.eos_token_id, exact_cache=exact)

    rows = [(f"LLaDA baseline (block {args.llada_block})", llada_run(None)),
            (f"LLaDA + dual cache (block {args.llada_block})", llada_run("dual")),
            (f"SDAR, exact cache (block {args.sdar_block})", sdar_run(True)),
            (f"SDAR, no cache (block {args.sdar_block})", sdar_run(False))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"LLaDA {params['LLaDA']:.2f}M / SDAR {params['SDAR']:.2f}M parameters (hidden {sizes['hidden']}, "
          f"{sizes['layers']} layers, {sizes['heads']} heads, MLP {sizes['mlp']}, "
          f"vocab rows {llada.model.config.embedding_size}); batch {args.batch}, prompts {int(lengths.min())}-{width} "
          f"tokens, gen_length {L}, one token per step; {args.device} {args.dtype}, threads {torch.get_num_threads()}")
    for _, run in rows:  # warm-up: one LLaDA block's worth of generation
        run(args.llada_block)
    results, outputs = [], []
    for name, run in rows:
        sync()
        t0 = time.perf_counter()
        out = run(L)
        sync()
        wall = time.perf_counter() - t0
        nfe = out.num_forward_passes
        results.append((name, nfe, args.batch * L / wall, wall, 1000 * wall / nfe))
        outputs.append(out)
    base = results[0][3]
    print("\nx wall: the LLaDA baseline's wall time over this row's (tok/s = completion tokens per second)\n")
    print(f"{'rollout':40s} {'NFE':>5s} {'tok/s':>8s} {'wall s':>7s} {'ms/step':>8s} {'x wall':>7s}")
    print("-" * 80)
    for name, nfe, tps, wall, ms in results:
        print(f"{name:40s} {nfe:5d} {tps:8.0f} {wall:7.2f} {ms:8.1f} {base / wall:7.2f}")
    by = {r[0].split(" (")[0]: r[3] for r in results}
    print(f"\nSDAR (exact cache) vs LLaDA baseline: x{base / by['SDAR, exact cache']:.2f} tokens/s; "
          f"vs LLaDA + dual cache: x{by['LLaDA + dual cache'] / by['SDAR, exact cache']:.2f}; "
          f"the cache within SDAR: x{by['SDAR, no cache'] / by['SDAR, exact cache']:.2f}")
    same = torch.equal(outputs[2].completion_ids, outputs[3].completion_ids)
    print(f"SDAR tokens with and without the cache: {'equal' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()

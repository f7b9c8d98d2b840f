"""The memory plan (rl/memory.py, ``dllm-rl plan``) against measured peaks on CPU: SFT and diffu-GRPO
steps of LLaDA-architecture models of three sizes (our implementation, fp32, one process, ZeRO-0),
each configuration in its own process.

    .venv/bin/python scripts/bench_memory.py                     # the table in docs/benchmarks.md
    .venv/bin/python scripts/bench_memory.py --sizes tiny --trainers sft

With ``--device cuda`` (tests/test_gpu.py): DeepSpeed bf16 and ZeRO-2 on one GPU, measured as
``torch.cuda.max_memory_allocated`` over the same span.

Measured (CPU): the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` once the
libraries, DeepSpeed's ops and the data are loaded) minus the resident set at that moment, over
building the model and trainer and two training steps (the first allocates Adam's moments; GRPO
steps include their rollouts, at temperature 1). glibc returns freed large blocks to the system
only above its mmap threshold, so the child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: RSS then
follows the live tensors. Predicted: the plan's peak for the same shapes (weights, gradients,
Adam moments, activations, fused scoring chunk, optimizer step, rollout), with the CPU's
one-parameter-at-a-time AdamW step.
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
sys.path.insert(0, str(ROOT))

# LLaDA-architecture sizes: (d_model, layers, heads, mlp, vocabulary)
SIZES = {"tiny": (128, 2, 4, 344, 4096), "20m": (256, 4, 4, 688, 32000), "100m": (512, 8, 8, 1376, 65536)}
# per trainer: SFT rows x (prompt, response) characters; GRPO prompts x G, prompt characters, generation
SFT_SHAPE = dict(rows=8, prompt=24, response=160)  # > 256 masked positions per step: a full scoring chunk
GRPO_SHAPE = dict(prompts=2, generations=4, prompt=16, gen_length=32, block_length=32, steps=4)


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _tokenizer(vocab: int):
    """The tiny character tokenizer with an alphabet that makes its vocabulary ``vocab`` tokens."""
    from rollout.tiny import SPECIAL_TOKENS, build_tiny_tokenizer

    n = vocab - len(SPECIAL_TOKENS) - 1  # specials and the unknown character
    points = (c for c in range(0x4E00, 0x110000) if not 0xD800 <= c < 0xE000)  # no surrogates
    return build_tiny_tokenizer("".join(chr(next(points)) for _ in range(n)))


def _model(size: str, tok):
    from rollout import PolicyAdapter
    from rollout.models import LLaDAConfig, LLaDAForMaskedLM

    d, layers, heads, mlp, vocab = SIZES[size]
    config = LLaDAConfig(d_model=d, n_heads=heads, n_layers=layers, mlp_hidden_size=mlp, activation_type="silu",
                         block_type="llama", rope=True, layer_norm_type="rms", vocab_size=vocab, embedding_size=vocab,
                         weight_tying=False, max_sequence_length=512, attention_dropout=0.0, residual_dropout=0.0,
                         embedding_dropout=0.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         mask_token_id=tok.mask_token_id)
    config._attn_implementation = "sdpa"
    return PolicyAdapter(LLaDAForMaskedLM(config), tok)


def _length_reward(prompts, completions, **_):
    return [len(c) for c in completions]


def _warm_up() -> None:
    """Load what the first engine and step load (DeepSpeed's ops, lazy imports: the reward call's
    ``transformers.TrainerState`` alone is ~50 MiB of modules), then free it."""
    import torch
    from transformers import TrainerState  # noqa: F401

    from rl.engine import build_engine, release_memory
    from rollout import build_tiny_policy

    policy = build_tiny_policy(seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    engine = build_engine(policy, "zero0", lr=1e-3, total_steps=1, micro_batch_size=1)
    loss = policy(torch.randint(10, 50, (1, 8))).logits.float().mean()
    engine.backward(loss)
    engine.step()
    engine.destroy()
    del engine, policy, loss
    release_memory()


def predict(size: str, trainer: str, model, seq_len: int, *, cuda: bool = False) -> dict:
    """The plan's peak (bytes) and items for one measured configuration (CPU: fp32, ZeRO-0; CUDA:
    DeepSpeed bf16, ZeRO-2 with configs/deepspeed/zero2.json's bucket)."""
    from rl.engine import load_ds_config
    from rl.memory import (StagePlan, deepspeed_buffers, generation, model_shape, model_states, optimizer_step,
                           train_activations)

    shape = model_shape(model.model)
    plan = StagePlan(stage=trainer)
    zero, b = (2, 2) if cuda else (0, 4)
    model_states(plan, shape, world_size=1, zero_stage=zero, bf16=cuda, weight_bytes=4, trainable=shape.params)
    if cuda:
        z = load_ds_config("zero2")["zero_optimization"]
        deepspeed_buffers(plan, zero_stage=2, bf16=True, reduce_bucket_size=int(z["reduce_bucket_size"]),
                          overlap_comm=bool(z["overlap_comm"]), trainable=shape.params)
    if trainer == "sft":
        rows, scored = SFT_SHAPE["rows"], seq_len
    else:
        g = GRPO_SHAPE
        rows, scored = g["prompts"] * g["generations"], g["gen_length"]
        generation(plan, shape, rows=rows, seq_len=seq_len, window=g["block_length"], compute_bytes=b, phase="rollout",
                   label="rollout", sampled=True)
    train_activations(plan, shape, rows=rows, seq_len=seq_len, scored=scored, compute_bytes=b, checkpointing=False)
    optimizer_step(plan, shape, world_size=1, zero_stage=zero, trainable=shape.params, cuda=cuda)
    return {"predicted": plan.peak, "peak_phase": plan.peak_phase, "params": shape.params,
            "items": [(i.name, i.bytes, i.phase) for i in plan.items]}


def child(size: str, trainer: str, device: str = "cpu") -> dict:
    """One configuration, measured in this (fresh) process: CPU (peak RSS) or CUDA
    (``torch.cuda.max_memory_allocated``, DeepSpeed bf16 + ZeRO-2)."""
    import torch

    torch.set_num_threads(1)
    from rl.config import DiffuGRPOConfig, RolloutOptions, SFTConfig
    from rl.engine import init_distributed

    init_distributed()
    _warm_up()
    tok = _tokenizer(SIZES[size][4])
    letters = "".join(chr(0x4E00 + k) for k in range(64))
    cuda = device == "cuda"
    common = dict(run_dir=f"/tmp/bench_memory/{size}-{trainer}", max_steps=2, lr=1e-4,
                  deepspeed="zero2" if cuda else "zero0", bf16=cuda, export_hf=False, wandb_mode="disabled",
                  warmup_steps=0)
    if trainer == "sft":
        s = SFT_SHAPE
        rows = [{"prompt": letters[i:i + s["prompt"]], "response": (letters * 4)[i:i + s["response"]]}
                for i in range(s["rows"])]
    else:
        g = GRPO_SHAPE
        rows = [{"prompt": letters[i:i + g["prompt"]]} for i in range(g["prompts"])]
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _status("VmRSS")
    model = _model(size, tok).to(device)
    if trainer == "sft":
        from rl.sft import SFTTrainer

        t = SFTTrainer(SFTConfig(per_device_batch_size=SFT_SHAPE["rows"], max_length=512, **common), model, rows)
        seq_len = t.batch(rows)["input_ids"].shape[1]
    else:
        from rl.grpo import DiffuGRPOTrainer

        g = GRPO_SHAPE
        ro = RolloutOptions(gen_length=g["gen_length"], block_length=g["block_length"], steps=g["steps"],
                            temperature=1.0)
        t = DiffuGRPOTrainer(DiffuGRPOConfig(per_device_prompts=g["prompts"], num_generations=g["generations"],
                                             num_iterations=1, beta=0.0, rollout=ro, sample_table_every=0, **common),
                             model, rows, reward_funcs=[_length_reward])
        seq_len = len(tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]) + g["gen_length"]
        seq_len = max(seq_len, 1)
    for _ in range(2):
        t.training_step([t.train_dataset[i] for i in t.data.next_indices()])
        t.step += 1
    measured = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - base
    if trainer == "grpo":  # the prompt as the trainer encodes it (chat template)
        from rl.data import encode_prompt

        seq_len = len(encode_prompt(tok, rows[0]["prompt"])) + GRPO_SHAPE["gen_length"]
    out = {"size": size, "trainer": trainer, "device": device, "measured": measured, "seq_len": seq_len,
           "seconds": time.perf_counter() - t0, **predict(size, trainer, model, seq_len, cuda=cuda)}
    t.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,20m,100m")
    ap.add_argument("--trainers", default="sft,grpo")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "TRAINER"), help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(child(*args.one, device=args.device)), flush=True)
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    results = []
    for size in args.sizes.split(","):
        for trainer in args.trainers.split(","):
            proc = subprocess.run([sys.executable, __file__, "--one", size, trainer, "--device", args.device], env=env,
                                  capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            results.append(json.loads(line[len("RESULT "):]))
            r = results[-1]
            print(f"{size} {trainer}: measured {r['measured'] / 2**20:.1f} MiB, predicted {r['predicted'] / 2**20:.1f} "
                  f"MiB ({100 * (r['predicted'] / r['measured'] - 1):+.1f}%)", flush=True)
    print("\n| model (LLaDA architecture) | params | trainer | tokens per row | measured peak MiB | predicted MiB | "
          "predicted / measured | plan's peak phase |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['trainer']} | {r['seq_len']} | "
              f"{r['measured'] / 2**20:.1f} | "
              f"{r['predicted'] / 2**20:.1f} | {r['predicted'] / r['measured']:.3f} | {r['peak_phase']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

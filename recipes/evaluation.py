"""Evaluation building blocks: generate completions for a task split, score them, and the
``eval`` recipe's results table (markdown + JSON) over tasks x generation lengths x rollout modes.

Protocols (``eval.protocol``, :data:`recipes.schema.EVAL_PROTOCOLS`): ``ours`` scores with the task's verifiers;
``d1`` is d1's evaluation (``eval/eval.py`` + ``eval/parse_and_get_acc.py``): d1's evaluation
prompts (``prompt_style=d1_eval``), greedy low-confidence decoding at 128/256/512 tokens, blocks of
32, steps = length / 2, the prompt tokenized with the tokenizer's special tokens, every generation
written in d1's JSON layout (so d1's own parser reads our files), and scored twice: by our
verifiers (``accuracy``) and by d1's parse rules (``d1_accuracy``, rewards/d1.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import torch

from rl import distributed as D
from rl.config import RolloutOptions
from rl.tasks import Task
from rollout.engine import RolloutEngine, engine_for


def _world() -> tuple[int, int]:
    return D.get_rank(), D.get_world_size()


def shard(rows: list, rank: int, world: int) -> list:
    """This rank's rows: every ``world``-th row from ``rank`` (shard sizes differ by at most one)."""
    return rows[rank::world]


def calls_per_rank(num_rows: int, world: int, batch_size: int) -> int:
    """Generation calls every rank makes for its shard of ``num_rows`` rows: the largest shard's
    count, so that all ranks make the same collective calls (a ZeRO-3 gather per call, the vLLM
    tensor-parallel group's batch exchange) whatever their shard sizes; a rank that runs out of rows
    makes one-row calls whose output is dropped (:func:`generate_texts`)."""
    return -(-(-(-num_rows // world)) // batch_size)


@torch.no_grad()
def generate_texts(engine: RolloutEngine, prompts: list, ro: RolloutOptions, *, batch_size: int,
                   generator: torch.Generator | None = None, calls: int | None = None, filler=None,
                   raw: bool = False) -> tuple[list[str], int, list[str]]:
    """Completions of ``prompts`` with the rollout engine in batches of ``batch_size``; returns
    ``(texts, forward_passes, raw canvases)`` (the canvases, special tokens kept, when ``raw``).
    ``calls``: make exactly this many ``generate`` calls (:func:`calls_per_rank`), the calls past
    the last batch on ``filler`` (one prompt; output dropped, its own generator)."""
    texts, raws, passes = [], [], 0
    tok = engine.adapter.tokenizer
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for i in range(max(len(batches), calls or 0)):
        if i >= len(batches):  # this rank's shard is done; the others still generate
            device = generator.device if generator is not None else "cpu"
            engine.generate([filler], options=ro, generator=torch.Generator(device=device).manual_seed(0))
            continue
        out = engine.generate(batches[i], options=ro, generator=generator)
        texts += out.decode(tok)
        if raw:
            raws += tok.batch_decode(out.completion_ids.tolist(), skip_special_tokens=False)
        passes += out.num_forward_passes
    return texts, passes, raws


def evaluate_rows(policy, task: Task, rows: list[dict], ro: RolloutOptions, *, batch_size: int = 128,
                  seed: int = 0, prefix: str = "eval/") -> dict[str, float]:
    """Exact-solve accuracy and mean reward of ``policy`` (a rollout engine, or a policy adapter:
    then an engine of ``ro.backend`` is built around it) on ``rows`` (sharded over ranks, summed
    with one all-reduce so every rank returns the same numbers; every rank makes the same number of
    generation calls, :func:`calls_per_rank`)."""
    rank, world = _world()
    mine = shard(rows, rank, world)
    t0 = time.perf_counter()
    with engine_for(policy, ro) as engine:
        g = torch.Generator(device=next(engine.adapter.parameters()).device)
        g.manual_seed(seed)
        texts, passes, _ = generate_texts(engine, [r["prompt"] for r in mine], ro, batch_size=batch_size, generator=g,
                                          calls=calls_per_rank(len(rows), world, batch_size),
                                          filler=rows[0]["prompt"] if rows else None)
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


# ---- d1's evaluation protocol --------------------------------------------------------------------



def d1_ground_truth(kind: str, row: dict):
    """What d1's evaluation stores as ``ground_truth`` for a row of our task: GSM8K the float after
    ``####`` (``Parser.extract_answer_gsm8k``; None where its pattern fails, e.g. a negative answer),
    MATH-500 the answer string, Countdown ``[numbers, target]``, Sudoku the solution string."""
    if kind == "gsm8k":
        m = re.search(r"####\s*\$?([\d,]+(?:\.\d+)?)", f"#### {row['answer']}")
        return float(m.group(1).replace(",", "")) if m else None
    if kind == "math":
        return str(row["answer"])
    if kind == "countdown":
        return [[int(n) for n in row["nums"]], int(row["target"])]
    return str(row["solution"])


@torch.no_grad()
def evaluate_rows_d1(engine: RolloutEngine, task: Task, rows: list[dict], ro: RolloutOptions, *, batch_size: int,
                     seed: int, out_file: Path | None = None, meta: dict | None = None) -> dict[str, float]:
    """:func:`evaluate_rows` plus d1's verdicts: each rank writes its generations in d1's layout to
    ``out_file`` (``{rank}`` in the name is filled in) and ``d1_accuracy`` is d1's number (Sudoku:
    correct cells / empty cells, over every row)."""
    from rewards.d1 import d1_eval_item, d1_eval_record
    from rl.tasks.d1 import D1_TASKS, eval_question

    kind = D1_TASKS[task.name]
    rank, world = _world()
    mine = shard(rows, rank, world)
    t0 = time.perf_counter()
    g = torch.Generator(device=next(engine.adapter.parameters()).device)
    g.manual_seed(seed)
    # d1 keeps the whole canvas (special tokens) in its files
    texts, passes, raw = generate_texts(engine, [r["prompt"] for r in mine], ro, batch_size=batch_size, generator=g,
                                        calls=calls_per_rank(len(rows), world, batch_size),
                                        filler=rows[0]["prompt"] if rows else None, raw=True)
    correct = sum(task.correct(mine, texts)) if mine else 0
    reward = float(sum(task.score(mine, texts).total)) if mine else 0.0
    items = [d1_eval_record(kind, eval_question(kind, r), text, d1_ground_truth(kind, r)) for r, text in zip(mine, raw)]
    verdicts = [d1_eval_item(kind, item) for item in items]
    if kind == "sudoku":
        num, den = sum(v["correct_cells"] for v in verdicts), sum(v["empty_cells"] for v in verdicts)
    else:
        num, den = sum(bool(v["is_correct"]) for v in verdicts), len(verdicts)
    seconds = time.perf_counter() - t0
    if out_file is not None:
        path = Path(str(out_file).format(rank=rank))
        path.parent.mkdir(parents=True, exist_ok=True)
        metrics = {"wall_time": seconds, "total_processed": len(items)}
        path.write_text(json.dumps({"generations": items, "metrics": metrics, **(meta or {})}, indent=2))
    batches = -(-len(mine) // batch_size)
    stats = D.all_reduce_sum([correct, len(mine), reward, passes, batches, num, den])
    n = max(stats[1].item(), 1.0)
    return {"accuracy": stats[0].item() / n, "reward": stats[2].item() / n, "num_examples": stats[1].item(),
            "forward_passes": stats[3].item() / max(stats[4].item(), 1.0), "seconds": seconds,
            "d1_accuracy": stats[5].item() / max(stats[6].item(), 1.0)}


def d1_rollout(base: RolloutOptions) -> RolloutOptions:
    """What d1's evaluation fixes beyond the lengths: greedy, low-confidence remasking, no CFG,
    prompts tokenized with the tokenizer's special tokens."""
    return dataclasses.replace(base, temperature=0.0, remasking="low_confidence", cfg_scale=0.0,
                               prompt_special_tokens=True)


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
    d1 = any("d1_accuracy" in r for r in results)
    d1_head = (" d1's parser |", "---|") if d1 else ("", "")
    lines = [f"# {title}", "", f"| task | gen_length | block | steps | mode | accuracy |{d1_head[0]} mean reward | n | "
             "forward passes / batch | seconds |", f"|---|---|---|---|---|---|{d1_head[1]}---|---|---|---|"]
    for r in results:
        d1_cell = f" {100 * r['d1_accuracy']:.1f}% |" if "d1_accuracy" in r else (" - |" if d1 else "")
        lines.append(f"| {r['task']} | {r['gen_length']} | {r['block_length']} | {r['steps']} | {r['mode']} | "
                     f"{100 * r['accuracy']:.1f}% |{d1_cell} {r['reward']:.3f} | {int(r['num_examples'])} | "
                     f"{r['forward_passes']:.0f} | {r['seconds']:.1f} |")
    md = run_dir / "results.md"
    md.write_text("\n".join(lines) + "\n")
    return md, js

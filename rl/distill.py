"""Self-distillation for parallel decoding: the data step of the ``distill`` stage.

The policy decodes the RL prompts with its reference loop (one token per step by default), the
task's verifier keeps the solved completions, and the stage then trains masked SFT with
certainty forcing on them (:class:`rl.config.SelfDistillConfig`, :func:`rl.losses.certainty_forcing_loss`).

Why it makes a policy decode in parallel: masked SFT on the policy's *own* solutions teaches it to
predict, from every partially masked state, the tokens its sequential decoding would have
committed, so a few-step schedule (several tokens per forward pass) commits the same tokens; the
certainty term makes those predictions confident early (dParallel, Chen et al. 2025, certainty-forcing
distillation, whose teacher trajectories are also the model's own). Keeping only verified
completions is rejection-sampling fine-tuning (RAFT, Dong et al. 2023; ReST, Gulcehre et al. 2023),
so the sequential accuracy is trained up, not just preserved.
"""

from __future__ import annotations

import torch

from rl import distributed as D
from rl.config import RolloutOptions
from rl.tasks import Task


@torch.no_grad()
def self_distill_rows(engine, task: Task, rows: list[dict], ro: RolloutOptions, *, samples_per_prompt: int = 1,
                      batch_size: int = 128, generator: torch.Generator | None = None) -> tuple[list[dict], dict]:
    """``(kept, stats)``: ``kept`` = ``{"prompt", "response"}`` for every generated completion of
    ``rows`` (``samples_per_prompt`` each, decoded by ``engine`` with ``ro``) that the task's
    accuracy reward counts as solved, duplicates removed, in prompt order, the same list on every
    rank (each rank decodes its shard, then the shards are gathered); ``stats``: prompts, samples,
    kept, solved fraction, forward passes per generate call."""
    from recipes.evaluation import calls_per_rank, generate_texts, shard

    rank, world = D.get_rank(), D.get_world_size()
    indexed = [(i, r) for i, r in enumerate(rows) for _ in range(samples_per_prompt)]
    mine = shard(indexed, rank, world)
    texts, passes, _ = generate_texts(engine, [r["prompt"] for _, r in mine], ro, batch_size=batch_size,
                                      generator=generator, calls=calls_per_rank(len(indexed), world, batch_size),
                                      filler=rows[0]["prompt"] if rows else None)
    solved = task.correct([r for _, r in mine], texts) if mine else []
    local = [(i, texts[k]) for k, ((i, _), ok) in enumerate(zip(mine, solved)) if ok]
    gathered = D.all_gather_object(local) if world > 1 else [local]
    seen, kept = set(), []
    for i, text in sorted((p for part in gathered for p in part), key=lambda p: p[0]):
        if (i, text) not in seen:
            seen.add((i, text))
            kept.append({"prompt": rows[i]["prompt"], "response": text})
    calls = -(-len(mine) // batch_size)
    sums = D.all_reduce_sum([sum(solved), passes, calls])
    stats = {"prompts": len(rows), "samples": len(indexed), "kept": len(kept),
             "solved": sums[0].item() / max(len(indexed), 1),
             "forward_passes": sums[1].item() / max(sums[2].item(), 1.0)}
    return kept, stats


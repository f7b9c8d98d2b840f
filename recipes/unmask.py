"""The ``unmask_order`` recipe: learn which positions a frozen dLLM commits first (DCoLT-style
unmasking policy, rl/unmask_order.py), then compare its test accuracy with the sampler's
low-confidence order at the same number of denoising steps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from recipes.evaluation import _world
from recipes.schema import RunConfig
from rl import distributed as D
from rl.checkpoint import param_checksum
from rl.data import encode_prompt, left_pad
from rl.tasks import Task


def order_config(cfg: RunConfig, stage_dir: Path):
    """The trainer's UnmaskOrderConfig (from rl.config once it lives there, else rl.unmask_order)."""
    from rl import unmask_order

    base = cfg.rl
    if isinstance(base, unmask_order.UnmaskOrderConfig):
        return dataclasses.replace(base, run_dir=str(stage_dir))
    shared = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return unmask_order.UnmaskOrderConfig(**{**shared, "run_dir": str(stage_dir),
                                             "rewards": dict(cfg.task.rewards)})


@torch.no_grad()
def order_accuracy(policy, task: Task, rows: list[dict], ro, *, batch_size: int, seed: int) -> float:
    """Exact-solve accuracy with the learned order (greedy top-k of the head's scores)."""
    from rl.unmask_order import PlackettLuceOrder, generate_with_order

    rank, world = _world()
    mine = rows[rank::world]
    device = next(policy.parameters()).device
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    correct = 0
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        ids, mask = left_pad([encode_prompt(policy.tokenizer, r["prompt"]) for r in chunk], policy.tokenizer.pad_token_id)
        hook = PlackettLuceOrder(policy.head, gen_length=ro.gen_length, greedy=True)
        out = generate_with_order(policy.dllm, hook, ids.to(device), mask.to(device), ro, generator=g)
        correct += sum(task.correct(chunk, out.decode(policy.tokenizer)))
    stats = D.all_reduce_sum([correct, len(mine)])
    return stats[0].item() / max(stats[1].item(), 1.0)


def train_unmask_order(cfg: RunConfig, task: Task, stage_dir: Path, dllm) -> dict:
    from recipes.evaluation import evaluate_rows
    from rl.unmask_order import UnmaskOrderTrainer

    config = order_config(cfg, stage_dir)
    ro = dataclasses.replace(config.rollout, temperature=0.0)
    bs = cfg.recipe.eval_batch_size
    val = task.rows("val")

    state = {}

    def eval_fn(module, step: int) -> dict:
        # this rank's full weights (gathered under ZeRO-3): ranks must agree on it
        state["param_checksum"] = param_checksum(module)
        return {"eval/val_accuracy": order_accuracy(module, task, val, ro, batch_size=bs, seed=cfg.seed)} if val else {}

    trainer = UnmaskOrderTrainer(config, dllm, task.rows("rl"), eval_fn=eval_fn, reward_fn=task.reward_fn())
    last = trainer.train()
    from rl.engine import gathered_for_generation

    test = task.rows("test")
    with gathered_for_generation(trainer.engine) as policy:  # full weights: ranks may run different step counts
        policy.eval()
        baseline = evaluate_rows(policy.dllm, task, test, ro, batch_size=bs, seed=cfg.seed)
        learned = order_accuracy(policy, task, test, ro, batch_size=bs, seed=cfg.seed)
    trainer.close()
    return {"train": {k: v for k, v in last.items() if not k.startswith("timing/")},
            "checkpoint": str(stage_dir / "final"), "eval/accuracy": learned,
            "eval/accuracy_low_confidence_order": baseline["eval/accuracy"],
            "rollout_steps": ro.steps, **state}

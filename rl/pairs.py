"""On-policy preference pairs: sample completions with the rollout engine, score them with any
reward, and pair the best against the worst completion of each prompt (ties skipped).

This is how diffusion DPO runs on the embedded default (Sudoku) with no external data: the
SFT policy samples, the verifier ranks, and DPO pushes the policy towards its own best samples
(the on-policy preference construction of e.g. Xiong et al. 2024, "Iterative Preference
Learning from Human Feedback", with a verifier in place of a reward model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rl.config import RolloutOptions
from rl.data import check_columns, encode_prompt, left_pad
from rollout.engine import RolloutEngine, engine_for

RewardFn = Callable[..., object]  # fn(prompts, completions, **columns) -> list[float|None] or .total


@torch.no_grad()
def sample_completions(policy: torch.nn.Module | RolloutEngine, rows: Sequence[dict], *, num_generations: int,
                       rollout: RolloutOptions, generator: torch.Generator | None, batch_size: int = 16,
                       tokenizer=None) -> list[list[str]]:
    """``num_generations`` completions per row (``rows[i]["prompt"]``), as text, in row order.

    ``policy``: a rollout engine, or a ``rollout.PolicyAdapter`` (with ``tokenizer``,
    ``mask_token_id``, ``eos_token_id``; an engine of ``rollout.backend`` is built around it)."""
    check_columns(rows, ("prompt",), "pair builder prompts")
    out: list[list[str]] = []
    with engine_for(policy, rollout) as engine:
        tok = tokenizer if tokenizer is not None else engine.adapter.tokenizer
        per_batch = max(1, batch_size // num_generations)
        for start in range(0, len(rows), per_batch):
            chunk = rows[start:start + per_batch]
            ids, mask = left_pad([encode_prompt(tok, r["prompt"]) for r in chunk], tok.pad_token_id)
            ro = engine.generate(ids.repeat_interleave(num_generations, 0), mask.repeat_interleave(num_generations, 0),
                                 options=rollout, generator=generator)
            texts = ro.decode(tok)
            out.extend(texts[i * num_generations:(i + 1) * num_generations] for i in range(len(chunk)))
    return out


def score_completions(reward_fn: RewardFn, rows: Sequence[dict], completions: Sequence[Sequence[str]]) -> list[list[float | None]]:
    """Rewards ``[row][generation]`` from one call of ``reward_fn`` over the flattened batch.

    ``reward_fn`` follows the reward-layer signature ``fn(prompts, completions, **columns)``, is
    called with TRL's keywords (``rewards.reward_inputs``) and returns a list
    (``rewards.get_reward``) or an object with ``.total`` (``rewards.compose``)."""
    from rewards import reward_inputs

    g = [len(c) for c in completions]
    flat = [c for cs in completions for c in cs]
    result = reward_fn(**reward_inputs([r for r, n in zip(rows, g) for _ in range(n)], flat))
    scores = list(getattr(result, "total", result))
    if len(scores) != len(flat):
        raise ValueError(f"reward function returned {len(scores)} scores for {len(flat)} completions")
    out, i = [], 0
    for n in g:
        out.append(scores[i:i + n])
        i += n
    return out


def pair_best_worst(rows: Sequence[dict], completions: Sequence[Sequence[str]],
                    scores: Sequence[Sequence[float | None]], *, min_margin: float = 0.0) -> list[dict]:
    """One pair per prompt: the highest-scored completion as ``chosen``, the lowest as
    ``rejected``. Prompts whose best and worst differ by ``<= min_margin`` (ties, including
    all-equal groups) or that have fewer than two scored completions are skipped. The other
    columns of the row are carried over; ``chosen_reward``/``rejected_reward`` are added."""
    pairs = []
    for row, comps, sc in zip(rows, completions, scores):
        scored = [(float(s), c) for s, c in zip(sc, comps) if s is not None]
        if len(scored) < 2:
            continue
        best = max(range(len(scored)), key=lambda i: scored[i][0])
        worst = min(range(len(scored)), key=lambda i: scored[i][0])
        if scored[best][0] - scored[worst][0] <= min_margin:
            continue
        pair = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
        pair.update(chosen=scored[best][1], rejected=scored[worst][1],
                    chosen_reward=scored[best][0], rejected_reward=scored[worst][0])
        pairs.append(pair)
    return pairs


def build_preference_pairs(policy: torch.nn.Module, rows: Sequence[dict], reward_fn: RewardFn, *,
                           num_generations: int = 8, rollout: RolloutOptions | None = None,
                           generator: torch.Generator | None = None, batch_size: int = 64,
                           min_margin: float = 0.0, tokenizer=None) -> list[dict]:
    """Sample ``num_generations`` completions per prompt from ``policy``, score them with
    ``reward_fn``, and return best-vs-worst rows with ``prompt``, ``chosen``, ``rejected``
    (ready for :class:`rl.dpo.DiffusionDPOTrainer`). Sampling should be stochastic
    (``rollout.temperature > 0`` or random remasking), otherwise every group is one repeated
    completion and all pairs are ties."""
    if num_generations < 2:
        raise ValueError(f"build_preference_pairs: num_generations must be >= 2, got {num_generations}")
    rollout = rollout or RolloutOptions(temperature=1.0)
    completions = sample_completions(policy, rows, num_generations=num_generations, rollout=rollout,
                                     generator=generator, batch_size=batch_size, tokenizer=tokenizer)
    scores = score_completions(reward_fn, rows, completions)
    return pair_best_worst(rows, completions, scores, min_margin=min_margin)


def mean_reward(policy: torch.nn.Module, rows: Sequence[dict], reward_fn: RewardFn, *,
                rollout: RolloutOptions, generator: torch.Generator | None = None, batch_size: int = 64,
                tokenizer=None) -> float:
    """Mean task reward of one completion per prompt (``None`` scores count as 0): the task
    metric before/after preference training (use ``temperature=0`` for a deterministic eval)."""
    completions = sample_completions(policy, rows, num_generations=1, rollout=rollout, generator=generator,
                                     batch_size=batch_size, tokenizer=tokenizer)
    scores = score_completions(reward_fn, rows, completions)
    flat = [0.0 if s[0] is None else float(s[0]) for s in scores]
    return sum(flat) / max(len(flat), 1)

"""Advantage estimators: rewards of G completions per prompt -> one advantage per completion.

Registered pure functions (verl's ``core_algos`` style) in :data:`ADVANTAGES`, picked with
``rl.advantage=<name>``. Each takes ``rewards [N]`` (prompt-major: the G completions of a prompt
are consecutive), ``group_size`` G and ``scale_rewards`` and returns ``(advantages [N],
group_std [N / G])``.

``scale_rewards`` is TRL's (GRPOConfig, >= 0.22): ``"group"`` divides by the std of the
completion's group, ``"batch"`` by the std of the whole batch (every rank's rewards),
``"none"`` does not scale (Dr. GRPO; d1's, wd1's and SPG's code: r minus the group mean, the std
only logged). TRL's booleans are accepted: ``True`` = ``"group"``, ``False`` = ``"none"``. Stds
are the unbiased ones (``torch.std``'s default), as TRL divides by and d1 logs (``reward_std``).
"""

from __future__ import annotations

import torch

from rl import distributed as D
from rl.registry import Registry

ADVANTAGES = Registry("advantage estimator")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL/d1: (r - mean) / (std + 1e-4)


def scale_rewards_mode(value: str | bool) -> str:
    """TRL's ``scale_rewards`` as one of :data:`SCALE_REWARDS` (booleans as TRL maps them)."""
    if isinstance(value, bool):
        return "group" if value else "none"
    if value not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={value!r}: expected one of {', '.join(SCALE_REWARDS)} (or true/false)")
    return value


def batch_std(rewards: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the rewards of every rank's batch (one all-reduce; local without one)."""
    r = rewards.detach().double()
    stats = torch.stack([r.new_tensor(float(r.numel())), r.sum(), (r * r).sum()])
    n, s, ss = (float(v) for v in D.all_reduce_sum(stats))
    return rewards.new_tensor(max(ss / n - (s / n) ** 2, 0.0) * n / max(n - 1.0, 1.0)) ** 0.5


def _scale(adv: torch.Tensor, rewards: torch.Tensor, grouped_std: torch.Tensor, mode: str, g: int) -> torch.Tensor:
    if mode == "group":
        return adv / (grouped_std.repeat_interleave(g) + STD_EPS)
    if mode == "batch":
        return adv / (batch_std(rewards) + STD_EPS)
    return adv


@ADVANTAGES.register(name="group")
def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_rewards: str | bool = "none"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's group-relative advantage (DeepSeekMath, Shao et al. 2024, Sec. 4.1.2; d1 Eq. 2):
    ``A_i = r_i - mean_group(r)``, divided by a std per ``scale_rewards``.

    Returns ``(advantages [N], group_std [N // G])`` (unbiased std, as d1 logs ``reward_std``)."""
    mode = scale_rewards_mode(scale_rewards)
    grouped = rewards.view(-1, group_size)
    std = grouped.std(dim=1)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    return _scale(adv, rewards, std, mode, group_size), std


@ADVANTAGES.register(name="rloo")
def rloo_advantages(rewards: torch.Tensor, group_size: int, *, scale_rewards: str | bool = "none"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, Eq. 5; TRL's RLOOTrainer):
    ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_group(r))``."""
    mode = scale_rewards_mode(scale_rewards)
    grouped = rewards.view(-1, group_size)
    std = grouped.std(dim=1)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1) * (group_size / (group_size - 1))
    return _scale(adv, rewards, std, mode, group_size), std


def get_advantage(name: str):
    return ADVANTAGES.lookup(name)

"""Reward layer: functions with TRL's signature ``fn(prompts, completions, **columns) ->
list[float | None]``, a registry (`get_reward`, `register_reward`), weighted composition
(`compose`), verifiers (math, GSM8K, Countdown, Sudoku) and the code-execution sandbox.

Registered names: math, gsm8k, format_strict, format_soft, xml_count, countdown, sudoku, code.
This package never imports torch.
"""

from rewards.code import CodeReward
from rewards.compose import ComposedReward, RewardOutput, compose
from rewards.countdown import countdown_reward
from rewards.format import format_soft, format_strict, xml_count
from rewards.gsm8k import gsm8k_reward
from rewards.math import MathReward
from rewards.registry import get_reward, register_reward, registered_rewards
from rewards.sudoku import sudoku_reward

register_reward("math", factory=True)(MathReward)
register_reward("gsm8k")(gsm8k_reward)
register_reward("format_strict")(format_strict)
register_reward("format_soft")(format_soft)
register_reward("xml_count")(xml_count)
register_reward("countdown")(countdown_reward)
register_reward("sudoku")(sudoku_reward)
register_reward("code", factory=True)(CodeReward)

__all__ = ["ComposedReward", "RewardOutput", "compose", "get_reward", "register_reward", "registered_rewards",
           "CodeReward", "MathReward", "gsm8k_reward", "format_strict", "format_soft", "xml_count",
           "countdown_reward", "sudoku_reward"]

"""Reward layer: functions with TRL's signature ``fn(prompts, completions, **columns) ->
list[float | None]``, called with keywords as TRL's GRPOTrainer calls them; a registry
(`get_reward`, `register_reward`), weighted composition (`compose`, `compose_funcs`), verifiers (math, GSM8K, Countdown, Sudoku) and the code-execution sandbox.

Registered names: math, gsm8k, format_strict, format_soft, xml_count, countdown, sudoku, code, and
d1's own rewards, equal to d1's functions quirks included (`rewards.d1`, docs/d1.md): d1_xmlcount,
d1_soft_format, d1_strict_format, d1_int, d1_gsm8k, d1_math, d1_math_format, d1_countdown, d1_sudoku.
This package never imports torch.
"""

from rewards.code import CodeReward
from rewards.compose import ComposedReward, RewardOutput, compose, compose_funcs, reward_inputs
from rewards.countdown import countdown_reward
from rewards.d1 import D1_REWARDS
from rewards.format import format_soft, format_strict, xml_count
from rewards.gsm8k import gsm8k_reward
from rewards.math import MathReward
from rewards.registry import get_reward, register_reward, registered_rewards
from rewards.sudoku import sudoku_reward

# Built-ins score text: chat prompts / completions reach them as their text (plain_text=True).
register_reward("math", factory=True, plain_text=True)(MathReward)
register_reward("gsm8k", plain_text=True)(gsm8k_reward)
register_reward("format_strict", plain_text=True)(format_strict)
register_reward("format_soft", plain_text=True)(format_soft)
register_reward("xml_count", plain_text=True)(xml_count)
register_reward("countdown", plain_text=True)(countdown_reward)
register_reward("sudoku", plain_text=True)(sudoku_reward)
register_reward("code", factory=True, plain_text=True)(CodeReward)
# d1's rewards, equal to d1's functions (rewards/d1.py; D1_REWARDS is their one list)
for _name, _fn in D1_REWARDS.items():
    register_reward(_name, plain_text=True)(_fn)

__all__ = ["ComposedReward", "RewardOutput", "compose", "compose_funcs", "reward_inputs", "get_reward", "register_reward", "registered_rewards",
           "CodeReward", "MathReward", "gsm8k_reward", "format_strict", "format_soft", "xml_count",
           "countdown_reward", "sudoku_reward"]

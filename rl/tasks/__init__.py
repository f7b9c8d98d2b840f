"""Tasks: rows for SFT / RL / validation / test, a reward spec and an accuracy check.

- :mod:`rl.tasks.registry`: :class:`Task`, :func:`register_task`, :func:`build_task` (splits
  asserted disjoint by prompt), the prompt formatter;
- :mod:`rl.tasks.procedural`: generated tasks (``sudoku4``, ``countdown_procedural``; offline);
- :mod:`rl.tasks.loading`: one reader (``datasets``) for local files, saved datasets and the hub;
- :mod:`rl.tasks.real`: ``gsm8k``, ``math500``, ``humaneval``, ``countdown``, ``local``;
- :mod:`rl.tasks.d1`: d1's prompts (``prompt_style: d1 | d1_eval``) and ``s1k``, d1's SFT data.

Reward columns (``solution``, ``answer``, ``test`` ...) reach reward functions as keyword lists
(TRL's convention); accuracy is "the exact check passes" and goes through the same composed,
per-sample-isolated reward call as training.
"""

from rl.tasks import d1, procedural, real  # noqa: F401  (registers the built-in tasks)
from rl.tasks.loading import DATA_ENV, HubSource, read_file
from rl.tasks.procedural import countdown_prompt, sudoku_prompt
from rl.tasks.real import gsm8k_answer
from rl.tasks.registry import (PROMPT_STYLES, REASONING_FORMAT, SPLITS, TASKS, DataError, Task, TaskSpec,
                               build_task, format_prompt, register_task)

__all__ = ["DATA_ENV", "PROMPT_STYLES", "REASONING_FORMAT", "SPLITS", "TASKS", "DataError", "HubSource", "Task",
           "TaskSpec", "build_task", "countdown_prompt", "format_prompt", "gsm8k_answer", "read_file",
           "register_task", "sudoku_prompt"]

"""The task registry and the :class:`Task` every trainer and evaluation uses.

A task turns a :class:`recipes.schema.TaskConfig`-like object (any object with the same fields)
into four row lists:

- ``sft``: labelled rows ``{"prompt", "response", ...}`` (the response is the SFT target);
- ``rl``: rows ``{"prompt", <reward columns>}`` for GRPO (responses are never shown to RL);
- ``val``: model selection during training; ``test``: held-out evaluation (``eval/accuracy``).

``sft`` and ``rl`` may share prompts (both are training data); ``val``, ``test`` and the
training rows are disjoint by prompt, which :func:`build_task` asserts for every task.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# d1's answer format for the instruct models (Zhao et al. 2025, App. "prompts").
REASONING_FORMAT = ("Respond in the following format:\n<reasoning>\n...\n</reasoning>\n"
                    "<answer>\n...\n</answer>")
SPLITS = ("sft", "rl", "val", "test")
# The instruction TraDo / SDAR (Gen-Verse/dLLM-RL's math data) and Qwen chat models are trained on.
BOXED_FORMAT = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES = ("minimal", "instruct", "boxed", "d1", "d1_eval")  # d1 / d1_eval: d1's own prompts (rl/tasks/d1.py)
D1_STYLES = ("d1", "d1_eval")


class DataError(ValueError):
    """Task data that cannot be used (missing, unreadable, wrong columns or types); one line."""


def format_prompt(text: str, style: str) -> str:
    """The one prompt formatter: ``minimal`` = the text as is (the tiny model's format);
    ``instruct`` = the text followed by d1's reasoning/answer format; ``boxed`` = the text followed by
    the step-by-step / ``\\boxed{}`` instruction of TraDo's math prompts. The ``d1`` styles are d1's
    own per-task prompts (rl/tasks/d1.py), which only d1's tasks define."""
    if style in D1_STYLES:
        raise DataError(f"prompt_style={style}: d1's prompts exist for its tasks only (gsm8k, math500, countdown, "
                        f"sudoku4); use minimal or instruct here")
    if style == "minimal":
        return text
    return f"{text}\n{BOXED_FORMAT}" if style == "boxed" else f"{text}\n{REASONING_FORMAT}"


def prompt_key(prompt) -> str:
    """What makes two rows "the same prompt" for split disjointness."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


TaskBuilder = Callable[[object], dict[str, list[dict]]]


class Splits(dict):
    """A builder's ``{split: rows}`` plus ``source``: where the rows came from (for messages)."""

    def __init__(self, splits: dict[str, list[dict]], source: str = ""):
        super().__init__(splits)
        self.source = source


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its builder and its default scoring (configs/task/<name>.yaml states
    the same; a config that sets ``rewards`` / ``accuracy_reward`` replaces them)."""

    build: TaskBuilder
    rewards: dict[str, float]
    accuracy_reward: str
    # a stricter per-row exact check than "accuracy_reward == 1", used when accuracy_reward is the default
    exact: Callable | None = None


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, *, rewards: dict[str, float] | None = None, accuracy_reward: str = "",
                  exact: Callable | None = None):
    """Decorator: ``@register_task("mytask", rewards={"gsm8k": 1.0}, accuracy_reward="gsm8k")
    def build(cfg) -> {"sft": [...], "rl": [...], "val": [...], "test": [...]}``.

    ``exact``: an optional reward-style function ``(prompts, completions, **columns) -> [1.0 | 0.0]``
    that decides "solved" instead of ``accuracy_reward``."""
    def deco(fn: TaskBuilder) -> TaskBuilder:
        TASKS[name] = TaskSpec(fn, dict(rewards or {}), accuracy_reward, exact)
        return fn
    return deco


@dataclass
class Task:
    """Rows per split plus how to score them; ``source`` says where the rows came from."""

    name: str
    splits: dict[str, list[dict]]
    rewards: dict[str, float]
    accuracy_reward: str
    exact: Callable | None = None
    source: str = ""
    _scorers: dict = field(default_factory=dict, repr=False, compare=False)

    def rows(self, split: str) -> list[dict]:
        if split not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {split!r} (splits: {sorted(self.splits)})")
        return self.splits[split]

    @property
    def has_train(self) -> bool:
        return bool(self.splits["sft"] or self.splits["rl"])

    def reward_fn(self):
        """The composed RL reward (``rewards.compose``) of this task, built once."""
        if "reward" not in self._scorers:
            from rewards import compose

            self._scorers["reward"] = compose(dict(self.rewards))
        return self._scorers["reward"]

    def _accuracy_fn(self):
        if "accuracy" not in self._scorers:
            from rewards import compose
            from rewards.registry import plain_text

            fn = plain_text(self.exact) if self.exact is not None else self.accuracy_reward
            self._scorers["accuracy"] = compose([(fn, 1.0)])
        return self._scorers["accuracy"]

    def score(self, rows: Sequence[dict], completions: Sequence[str], completion_ids=None):
        """The task's reward on ``rows``' completions, called as in training (TRL keywords)."""
        from rewards import reward_inputs

        return self.reward_fn()(**reward_inputs(rows, completions, completion_ids))

    def correct(self, rows: Sequence[dict], completions: Sequence[str], completion_ids=None) -> list[bool]:
        """Per row: is the completion solved (the exact check, else ``accuracy_reward`` == 1.0)?

        Scored through the same composed, per-sample-isolated call as training rewards: a
        malformed sample counts as wrong (one log line), never an exception."""
        from rewards import reward_inputs

        if len(rows) != len(completions):
            raise ValueError(f"task {self.name!r}: {len(rows)} rows but {len(completions)} completions")
        if not rows:
            return []
        out = self._accuracy_fn()(**reward_inputs(rows, completions, completion_ids))
        (scores,) = out.per_function.values()
        return [s is not None and s >= 1.0 - 1e-6 for s in scores]

    def accuracy(self, rows: Sequence[dict], completions: Sequence[str]) -> float:
        ok = self.correct(rows, completions)
        return sum(ok) / max(len(ok), 1)

    def missing_train_message(self) -> str:
        return (f"task {self.name!r} has no training split ({self.source or 'its data'} gives test rows only); "
                f"give one with task.path=<file, or folder with train.jsonl and test.jsonl, or hub name>")


def check_disjoint(name: str, splits: dict[str, list[dict]]) -> None:
    """Validation, test and the training rows (sft + rl) share no prompt."""
    keys = {s: {prompt_key(r["prompt"]) for r in splits[s]} for s in SPLITS}
    train = keys["sft"] | keys["rl"]
    for a, b, common in (("val", "test", keys["val"] & keys["test"]), ("train", "val", train & keys["val"]),
                         ("train", "test", train & keys["test"])):
        if common:
            raise DataError(f"task {name!r}: the {a} and {b} splits share {len(common)} prompt(s), e.g. "
                            f"{next(iter(common))[:80]!r}")


def build_task(cfg) -> Task:
    """The task named ``cfg.name`` with its splits built (deterministic in ``cfg.split_seed``);
    rewards / accuracy_reward from ``cfg`` or, when empty, the task's registered defaults."""
    if cfg.name not in TASKS:
        raise KeyError(f"task.name={cfg.name!r} is not a registered task; known: {', '.join(sorted(TASKS))}")
    spec = TASKS[cfg.name]
    splits = spec.build(cfg)
    source = getattr(splits, "source", "")
    splits = dict(splits)
    for split in SPLITS:
        splits.setdefault(split, [])
    # RL learns from rewards only: its rows never carry the reference response.
    splits["rl"] = [{k: v for k, v in r.items() if k != "response"} for r in splits["rl"]]
    check_disjoint(cfg.name, splits)
    rewards = dict(cfg.rewards) or dict(spec.rewards)
    accuracy_reward = cfg.accuracy_reward or spec.accuracy_reward
    if not rewards or not accuracy_reward:
        raise DataError(f"task {cfg.name!r} has no default scoring: set task.rewards={{name: weight}} and "
                        f"task.accuracy_reward=<reward name>")
    exact = spec.exact if accuracy_reward == spec.accuracy_reward else None
    return Task(cfg.name, splits, rewards, accuracy_reward, exact, source)

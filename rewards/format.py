"""Format rewards for the ``<reasoning>...</reasoning><answer>...</answer>`` layout (as in d1,
Zhao et al. 2025, after the open GRPO GSM8K recipe): strict layout, soft layout, and the
xml-count partial credit. Unlike d1's regexes these use DOTALL, so multi-line reasoning counts.
"""

from __future__ import annotations

import re

STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?\Z", re.DOTALL)
SOFT = re.compile(r"^\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


def format_strict(prompts: list[str], completions: list[str], *, score: float = 0.5, **columns) -> list[float | None]:
    """`score` if the completion is exactly ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>``."""
    return [score if STRICT.match(c) else 0.0 for c in completions]


def format_soft(prompts: list[str], completions: list[str], *, score: float = 0.5, **columns) -> list[float | None]:
    """`score` if the completion starts with a reasoning block followed by an answer block."""
    return [score if SOFT.match(c) else 0.0 for c in completions]


def count_xml(text: str) -> float:
    """d1's xml-count: 0.125 per correctly placed tag, minus 0.001 per character after ``</answer>``."""
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def xml_count(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """Partial credit for the tag layout (`count_xml`)."""
    return [count_xml(c) for c in completions]

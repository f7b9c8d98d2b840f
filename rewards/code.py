"""Code-test reward: run the last fenced python block of a completion against tests in `Sandbox`.

Test columns (first match wins, per row):
  * ``tests``: list of assert snippets (MBPP style); each snippet is one test;
  * ``test`` + ``entry_point``: HumanEval style, ``check(candidate)`` is one test;
  * ``inputs`` + ``outputs``: stdin/stdout pairs; each pair is one test, compared on
    whitespace-normalized stdout by the parent.
Reward = fraction of tests passed; a completion without a code block scores 0.0.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from rewards.sandbox import Sandbox

log = logging.getLogger("rewards")

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str | None:
    """The last fenced block tagged python/py/python3; else the last untagged block; else None."""
    blocks = _FENCE.findall(completion)
    for lang in (("python", "py", "python3"), ("",)):
        chosen = [body for tag, body in blocks if tag.lower() in lang]
        if chosen:
            return chosen[-1]
    return None


def _normalize_output(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


class CodeReward:
    """`get_reward("code", **options)`: options go to `Sandbox` (mode, unsafe, timeout_s, memory_mb,
    ...) plus ``pool_size`` (concurrent sandboxes)."""

    __name__ = "code"
    handles_timeouts = True  # per-run wall-clock limit in the sandbox

    def __init__(self, *, pool_size: int = 4, **sandbox_options):
        self.sandbox = Sandbox(**sandbox_options)
        self.pool_size = max(1, int(pool_size))

    def _jobs(self, code: str, i: int, cols: dict) -> list[tuple[dict, bytes | None, str | None]]:
        """(job, stdin, expected stdout) triples for row `i`."""
        if cols.get("tests") is not None and cols["tests"][i] is not None:
            tests = cols["tests"][i]
            if isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
                raise ValueError(f"column 'tests' row {i}: expected a list of assert strings")
            return [({"mode": "asserts", "code": code, "tests": list(tests)}, None, None)]
        if cols.get("test") is not None and cols["test"][i] is not None:
            if cols.get("entry_point") is None or not cols["entry_point"][i]:
                raise ValueError(f"column 'test' row {i} needs column 'entry_point'")
            return [({"mode": "humaneval", "code": code, "test": cols["test"][i], "entry_point": cols["entry_point"][i]}, None, None)]
        if cols.get("inputs") is not None and cols["inputs"][i] is not None:
            ins, outs = cols["inputs"][i], (cols.get("outputs") or [None] * (i + 1))[i]
            if outs is None or len(ins) != len(outs):
                raise ValueError(f"row {i}: columns 'inputs' and 'outputs' must be lists of equal length")
            return [({"mode": "stdio", "code": code}, str(x).encode(), str(y)) for x, y in zip(ins, outs)]
        raise ValueError(f"row {i}: code reward needs column 'tests', 'test'+'entry_point', or 'inputs'+'outputs'")

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        work: list[tuple[int, dict, bytes | None, str | None]] = []
        n_tests = [0] * len(completions)
        for i, c in enumerate(completions):
            code = extract_code(c)
            if code is None:
                continue
            for job, stdin, expected in self._jobs(code, i, columns):
                work.append((i, job, stdin, expected))
                n_tests[i] += len(job["tests"]) if job["mode"] == "asserts" else 1
        passed = [0] * len(completions)

        def run(item):
            i, job, stdin, expected = item
            res = self.sandbox.run(job, stdin=stdin or b"")
            if job["mode"] == "stdio":
                ok = not res.timed_out and not res.output_exceeded and \
                    _normalize_output(res.stdout.decode("utf-8", "replace")) == _normalize_output(expected)
                return i, int(ok)
            return i, sum(res.passed)

        with ThreadPoolExecutor(self.pool_size) as ex:
            for i, k in ex.map(run, work):
                passed[i] += k
        return [passed[i] / n_tests[i] if n_tests[i] else 0.0 for i in range(len(completions))]


def code_reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float | None]:
    """Functional form with default options (one shared sandbox per process)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = CodeReward()
    return _DEFAULT(list(prompts), list(completions), **columns)


_DEFAULT: CodeReward | None = None

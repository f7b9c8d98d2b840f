"""Code-test reward: run the last fenced python block of a completion against tests in `Sandbox`.

Test columns (first match wins, per row):
  * ``tests``: list of assert snippets (MBPP style); each snippet is one test; optional
    ``test_setup_code`` (the dataset's own code, run with the tests, never with the candidate);
  * ``test`` + ``entry_point``: HumanEval style, ``check(candidate)`` is one test; optional
    ``code_prompt`` (the dataset's prompt: its helpers, e.g. ``poly``, are the ones the test uses);
  * ``inputs`` + ``outputs``: stdin/stdout pairs; each pair is one test, compared on
    whitespace-normalized stdout by the parent.
Reward = fraction of tests passed; a completion without a code block scores 0.0.

Programmer errors raise one ValueError at the call, naming the argument or column: prompts or
completions that are not lists, a column that is not a list or whose length differs from the
batch, no test column at all, a non-positive timeout. A single malformed sample (a completion
that is not a string, a row of the wrong type, text that cannot be encoded) scores 0.0 with one
log line, as does a sample whose sandbox could not be started.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from rewards.sandbox import Sandbox

log = logging.getLogger("rewards")

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
COLUMNS = ("tests", "test_setup_code", "test", "entry_point", "code_prompt", "inputs", "outputs")


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


class MalformedSample(ValueError):
    """One row cannot be scored; it gets 0.0 and a log line."""


def _is_list(x) -> bool:
    return isinstance(x, (list, tuple))


def _text(x, what: str) -> str:
    if not isinstance(x, str):
        raise MalformedSample(f"{what} is {type(x).__name__}, not str")
    try:
        x.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MalformedSample(f"{what} cannot be encoded as UTF-8 ({e.reason} at {e.start})") from None
    return x


def _stdin(x, what: str) -> bytes:
    return x if isinstance(x, bytes) else _text(x, what).encode("utf-8")


class CodeReward:
    """`get_reward("code", **options)`: options go to `Sandbox` (mode, unsafe, timeout_s, memory_mb,
    ...) plus ``pool_size`` (runs at once; a test job uses two sandboxes)."""

    __name__ = "code"
    handles_timeouts = True  # per-run wall-clock limit in the sandbox

    def __init__(self, *, pool_size: int = 4, **sandbox_options):
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"code reward option pool_size must be a positive int, got {pool_size!r}")
        self.sandbox = Sandbox(**sandbox_options)
        self.pool_size = pool_size

    @staticmethod
    def _check_call(prompts, completions, columns: dict) -> int:
        for name, value in (("completions", completions), ("prompts", prompts)):
            if not _is_list(value):
                raise ValueError(f"code reward: {name} must be a list, got {type(value).__name__}")
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"code reward: got {len(prompts)} prompts for {n} completions")
        for key in COLUMNS:
            v = columns.get(key)
            if v is None:
                continue
            if not _is_list(v):
                raise ValueError(f"code reward: column {key!r} must be a list with one entry per completion, "
                                 f"got {type(v).__name__}")
            if len(v) != n:
                raise ValueError(f"code reward: column {key!r} has {len(v)} rows for {n} completions")
        if all(columns.get(k) is None for k in ("tests", "test", "inputs")):
            raise ValueError("code reward needs column 'tests', 'test'+'entry_point', or 'inputs'+'outputs' "
                             f"(got {sorted(columns)})")
        return n

    @staticmethod
    def _jobs(code: str, i: int, cols: dict) -> list[tuple[dict, bytes | None, str | None]]:
        """(job, stdin, expected stdout) triples for row `i`; raises `MalformedSample`."""
        row = {k: (cols[k][i] if cols.get(k) is not None else None) for k in COLUMNS}
        if row["tests"] is not None:
            tests = row["tests"]
            if not _is_list(tests) or not tests:
                raise MalformedSample("'tests' is not a non-empty list of assert strings")
            job = {"mode": "asserts", "code": code, "tests": [_text(t, "a 'tests' entry") for t in tests]}
            if row["test_setup_code"] is not None:
                job["setup"] = _text(row["test_setup_code"], "'test_setup_code'")
            return [(job, None, None)]
        if row["test"] is not None:
            ep = row["entry_point"]
            if not isinstance(ep, str) or not ep.isidentifier():
                raise MalformedSample(f"'entry_point' is {ep!r}, not a function name")
            job = {"mode": "humaneval", "code": code, "test": _text(row["test"], "'test'"), "entry_point": ep}
            if row["code_prompt"] is not None:
                job["setup"] = _text(row["code_prompt"], "'code_prompt'")
            return [(job, None, None)]
        if row["inputs"] is not None:
            ins, outs = row["inputs"], row["outputs"]
            if not _is_list(ins) or not _is_list(outs) or len(ins) != len(outs) or not ins:
                raise MalformedSample("'inputs' and 'outputs' are not non-empty lists of equal length")
            return [({"mode": "stdio", "code": code}, _stdin(x, "an 'inputs' entry"), _text(y, "an 'outputs' entry"))
                    for x, y in zip(ins, outs)]
        raise MalformedSample("no tests in this row ('tests', 'test' and 'inputs' are all empty)")

    def _run(self, item: tuple[int, dict, bytes | None, str | None]) -> tuple[int, int]:
        i, job, stdin, expected = item
        try:
            res = self.sandbox.run(job, stdin=stdin or b"")
        except OSError as e:
            log.warning("code reward: sample %d scored 0: sandbox did not start (%s)", i, e)
            return i, 0
        if job["mode"] == "stdio":
            ok = not res.timed_out and not res.output_exceeded and \
                _normalize_output(res.stdout.decode("utf-8", "replace")) == _normalize_output(expected or "")
            return i, int(ok)
        return i, sum(res.passed)

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        n = self._check_call(prompts, completions, columns)
        work: list[tuple[int, dict, bytes | None, str | None]] = []
        n_tests = [0] * n
        for i, c in enumerate(completions):
            try:
                code = extract_code(_text(c, "the completion"))
                if code is None:
                    continue
                jobs = self._jobs(code, i, columns)
            except MalformedSample as e:
                log.warning("code reward: sample %d scored 0: %s", i, e)
                continue
            for job, stdin, expected in jobs:
                work.append((i, job, stdin, expected))
                n_tests[i] += len(job["tests"]) if job["mode"] == "asserts" else 1
        passed = [0] * n
        with ThreadPoolExecutor(self.pool_size) as ex:
            for i, k in ex.map(self._run, work):
                passed[i] += k
        return [passed[i] / n_tests[i] if n_tests[i] else 0.0 for i in range(n)]


def code_reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float | None]:
    """Functional form with default options (one shared sandbox per process)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = CodeReward()
    return _DEFAULT(prompts, completions, **columns)


_DEFAULT: CodeReward | None = None

"""Code-test reward: run the last fenced python block of a completion against tests in `Sandbox`.

Test columns (first match wins, per row):
  * ``tests``: list of assert snippets (MBPP style); each snippet is one test; optional
    ``test_setup_code`` (the dataset's own code: run before the candidate's code in its sandbox,
    and before the tests in theirs, where its names win over the candidate's);
  * ``test`` + ``entry_point``: HumanEval style, ``check(candidate)`` is one test; the entry point
    is a name (``has_close_elements``) or, LeetCode style, ``Solution().twoSum``; optional
    ``code_prompt`` (the dataset's prompt: its helpers, e.g. ``poly``, are the ones the test
    uses; its classes, e.g. ``ListNode``, are the same class on both sides);
  * ``inputs`` + ``outputs``: stdin/stdout pairs; each pair is one test, the whole stdout compared
    with the expected output as it streams in (lines right-stripped, trailing empty lines ignored).
Reward = fraction of tests passed; a completion without a code block scores 0.0. Setup code that
raises fails every test of its row (logged once per distinct setup code).

`check_code_rows` is the preflight check of a data set's rows (one ValueError naming the first
malformed row and column). At scoring time, programmer errors raise one ValueError at the call,
naming the argument or column: prompts or completions that are not lists, a column that is not a
list or whose length differs from the batch, no test column at all, a non-positive timeout. A
single malformed sample (a completion that is not a string, a row of the wrong type, text that
cannot be encoded) scores 0.0 with one log line, as does a sample whose sandbox could not be
started.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from rewards.sandbox import Sandbox

log = logging.getLogger("rewards")

COLUMNS = ("tests", "test_setup_code", "test", "entry_point", "code_prompt", "inputs", "outputs")
_PYTHON_TAGS = ("python", "py", "python3", "py3")
# an entry point: a name, or an expression on one such as ``Solution().twoSum``
_ENTRY = re.compile(r"[A-Za-z_]\w*(?:\(\))?(?:\.[A-Za-z_]\w*(?:\(\))?)*")


def _fence(line: str) -> tuple[str, int, str, int] | None:
    """An opening fence: (fence character, its length, language tag, indentation), else None.
    A fence starts a line (after up to any indentation) or, as models also write it, ends one
    (``Here it is: ```python``)."""
    s = line.lstrip(" \t")
    indent = len(line) - len(s)
    for ch in "`~":
        if s.startswith(ch * 3):
            n = len(s) - len(s.lstrip(ch))
            info = s[n:].strip()
            if ch == "`" and "`" in info:
                return None  # inline code (```x```), not a fence
            return ch, n, info.split()[0].lower() if info else "", indent
    k = line.rfind("```")
    if k > 0:
        j = k
        while j > 0 and line[j - 1] == "`":
            j -= 1
        tag = line[k + 3:].strip()
        if line.find("```") == j and tag and tag.replace("+", "").replace("-", "").replace("_", "").isalnum():
            return "`", k + 3 - j, tag.lower(), 0  # the line's only fence, followed by a language tag
    return None


def extract_code(completion: str) -> str | None:
    """The last fenced block tagged python/py/python3/py3; else the last untagged block; else
    None. Line by line, in linear time: a fence opens a block only at the start (or end) of a
    line, so inline backticks before or in the text do not hide the block; a block closes at a
    line of at least as many fence characters, or at a code line ending in the backtick fence."""
    blocks: list[tuple[str, str]] = []
    lines = completion.split("\n")
    i = 0
    while i < len(lines):
        opened = _fence(lines[i])
        i += 1
        if opened is None:
            continue
        ch, n, tag, indent = opened
        body: list[str] = []
        closed = False
        while i < len(lines):
            line = lines[i]
            i += 1
            s = line.strip()
            if s and s.strip(ch) == "" and len(s) >= n:
                closed = True
                break
            r = line.rstrip()
            if ch == "`" and r.endswith("```") and len(r) - len(r.rstrip("`")) >= n:
                body.append(r.rstrip("`"))
                closed = None  # closed on a code line: no newline after it
                break
            k = len(line) - len(line.lstrip(" "))
            body.append(line[min(k, indent):])
        if closed is False:
            break
        blocks.append((tag, "\n".join(body) + ("\n" if closed and body else "")))
    for langs in (_PYTHON_TAGS, ("",)):
        chosen = [body for tag, body in blocks if tag in langs]
        if chosen:
            return chosen[-1]
    return None


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
        self._failed_setups: set[str] = set()
        self._lock = threading.Lock()

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
            if not isinstance(ep, str) or not _ENTRY.fullmatch(ep):
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
            res = self.sandbox.run(job, stdin=stdin or b"", expected_stdout=expected)
        except OSError as e:
            log.warning("code reward: sample %d scored 0: sandbox did not start (%s)", i, e)
            return i, 0
        if res.setup_error:
            self._setup_failed(i, job.get("setup") or "", res.setup_error)
        if job["mode"] == "stdio":
            return i, int(res.stdout_match is True)
        return i, sum(res.passed)

    def _setup_failed(self, i: int, setup: str, error: str) -> None:
        """The dataset's setup code raised: every test of the row fails; one log line per row."""
        key = hashlib.sha1(setup.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            if key in self._failed_setups:
                return
            self._failed_setups.add(key)
        log.warning("code reward: sample %d: the dataset's setup code failed (%s); every test of this row fails "
                    "(logged once per row)", i, error)

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


def check_code_rows(rows: Sequence[Mapping]) -> None:
    """Preflight check of a code data set: raises one ValueError, one line, naming the first
    malformed row and column (e.g. a ``tests`` column that is a string, ``test`` without
    ``entry_point``, ``inputs`` without ``outputs``). Columns are read as `CodeReward` reads them:
    ``tests`` (+ ``test_setup_code``), else ``test`` + ``entry_point`` (+ ``code_prompt``), else
    ``inputs`` + ``outputs``."""

    def bad(i: int, col: str, what: str) -> ValueError:
        return ValueError(f"code data set: row {i}, column {col!r}: {what}")

    def text(i: int, col: str, v, what: str = "a string") -> None:
        if not isinstance(v, str):
            raise bad(i, col, f"must be {what}, got {type(v).__name__}")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad(i, col, f"cannot be encoded as UTF-8 ({e.reason} at {e.start})") from None

    def seq(i: int, col: str, v, what: str) -> None:
        if not _is_list(v) or not v:
            raise bad(i, col, f"must be a non-empty list of {what}, got "
                      f"{type(v).__name__ if _is_list(v) is False else 'an empty list'}")

    if not _is_list(rows):
        raise ValueError(f"code data set: rows must be a list, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"code data set: row {i} is a {type(row).__name__}, not a mapping of columns")
        get = row.get
        if get("tests") is not None:
            seq(i, "tests", get("tests"), "assert strings")
            for t in get("tests"):
                text(i, "tests", t, "a list of assert strings")
            if get("test_setup_code") is not None:
                text(i, "test_setup_code", get("test_setup_code"))
        elif get("test") is not None:
            text(i, "test", get("test"))
            ep = get("entry_point")
            if ep is None:
                raise bad(i, "entry_point", "missing (a 'test' column needs the name of the function it checks)")
            if not isinstance(ep, str) or not _ENTRY.fullmatch(ep):
                raise bad(i, "entry_point", f"must be a function name (or e.g. Solution().method), got {ep!r}"[:300])
            if get("code_prompt") is not None:
                text(i, "code_prompt", get("code_prompt"))
        elif get("inputs") is not None or get("outputs") is not None:
            if get("outputs") is None:
                raise bad(i, "outputs", "missing (an 'inputs' column needs the expected outputs)")
            if get("inputs") is None:
                raise bad(i, "inputs", "missing (an 'outputs' column needs the inputs)")
            seq(i, "inputs", get("inputs"), "stdin texts")
            seq(i, "outputs", get("outputs"), "expected stdout texts")
            if len(get("inputs")) != len(get("outputs")):
                raise bad(i, "outputs", f"has {len(get('outputs'))} entries for {len(get('inputs'))} inputs")
            for x in get("inputs"):
                if not isinstance(x, bytes):
                    text(i, "inputs", x, "a list of str (or bytes)")
            for y in get("outputs"):
                text(i, "outputs", y, "a list of str")
        else:
            raise ValueError(f"code data set: row {i} has no test column ('tests', 'test' + 'entry_point' or "
                             f"'inputs' + 'outputs'; columns: {sorted(map(str, row))[:20]})")


def code_reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float | None]:
    """Functional form with default options (one shared sandbox per process)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = CodeReward()
    return _DEFAULT(prompts, completions, **columns)


_DEFAULT: CodeReward | None = None

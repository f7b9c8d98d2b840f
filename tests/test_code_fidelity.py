"""Code reward fidelity (issue #27): correct programs score as they pass in plain Python.

The corpus (tests/fixtures/code_fidelity/cases.py) holds realistic correct solutions in the
styles of MBPP, LeetCode (with the dataset's setup classes) and APPS, covering returned value
types, exceptions, calling semantics, candidate classes, mutation and state, sizes, packages
and code extraction. Each case is first run in plain Python, unsandboxed (the corpus itself must
be right), then the whole corpus goes through `CodeReward` as one batch on each backend and must
score 1.0 everywhere, next to the forge tests (tests/test_sandbox_verdicts.py), which still score 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.sandbox import MODES, code_reward
from rewards.code import COLUMNS, extract_code

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "code_fidelity"))
from cases import CASES  # noqa: E402

# Runs one case the way a plain-Python harness would: setup (prompt), code and tests in one
# namespace; HumanEval style calls check(<entry point>); stdio runs the program on each input.
PLAIN = r'''
import contextlib, io, json, subprocess, sys
case = json.loads(sys.stdin.read())
code = case["code"]
if case.get("inputs") is not None:
    for stdin, want in zip(case["inputs"], case["outputs"]):
        got = subprocess.run([sys.executable, "-c", code], input=stdin.encode(), capture_output=True, timeout=60).stdout
        norm = lambda t: [ln.rstrip() for ln in t.replace("\r\n", "\n").split("\n")]
        g, w = norm(got.decode()), norm(want)
        while g and not g[-1]: g.pop()
        while w and not w[-1]: w.pop()
        assert g == w, (stdin[:50], got[:200])
else:
    ns = {"__name__": "__main__"}
    exec(case.get("test_setup_code") or case.get("code_prompt") or "", ns)
    exec(code, ns)
    if case.get("test") is not None:
        exec(case["test"], ns)
        ns["check"](eval(case["entry_point"], ns))
    for t in case.get("tests") or []:
        exec(t, ns)
print("ok")
'''


def _columns(cases: list[dict]) -> dict:
    return {k: [c.get(k) for c in cases] for k in COLUMNS if any(c.get(k) is not None for c in cases)}


def test_corpus_covers_the_issue():
    assert len(CASES) >= 60
    classes = {c["cls"] for c in CASES}
    assert {"value types", "exceptions", "calling", "objects", "state", "sizes", "packages", "extraction",
            "leetcode", "stdio"} <= classes
    assert all(extract_code(c["completion"]) for c in CASES)


def _run_plain(case: dict) -> tuple[str, str | None]:
    payload = dict(case, code=extract_code(case["completion"]))
    res = subprocess.run([sys.executable, "-c", PLAIN], input=json.dumps(payload).encode(), capture_output=True,
                         timeout=120)
    return case["name"], None if res.stdout.strip() == b"ok" else res.stderr.decode(errors="replace")[-800:]


def test_corpus_passes_in_plain_python():
    """Every case is correct as plain Python runs it (no sandbox): the corpus itself is right."""
    with ThreadPoolExecutor(2) as ex:
        failed = {name: err for name, err in ex.map(_run_plain, CASES) if err is not None}
    assert failed == {}


@pytest.mark.parametrize("mode", MODES)
def test_corpus_scores_one_on_each_backend(mode):
    """The whole corpus, batched through `CodeReward` with its pool as training would: 100%."""
    reward = code_reward(mode, pool_size=4, timeout_s=20.0)
    t0 = time.monotonic()
    scores = reward([""] * len(CASES), [c["completion"] for c in CASES], **_columns(CASES))
    elapsed = time.monotonic() - t0
    below = {c["name"]: s for c, s in zip(CASES, scores) if s != 1.0}
    rate = sum(s == 1.0 for s in scores) / len(scores)
    print(f"fidelity corpus on {mode}: {rate:.1%} of {len(CASES)} cases at 1.0 in {elapsed:.1f} s")
    assert below == {}

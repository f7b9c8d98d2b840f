"""Shared pieces of the code-sandbox tests (tests/test_sandbox*.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MODES = ["bwrap", "unshare"]
TESTS = ["assert f(2) == 4", "assert abs(f(3) - 6) < 1e-9"]
GOOD = "def f(x):\n    return 2 * x\n"


def code_reward(mode: str, **options):
    """A `CodeReward` on `mode`; skips where that sandbox is missing, except in CI (which installs
    bubblewrap and runs as root), where a missing sandbox fails the test."""
    from rewards.code import CodeReward
    from rewards.sandbox import SandboxUnavailable

    try:
        return CodeReward(mode=mode, **options)
    except SandboxUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"{mode} sandbox must be available in CI: {e}")
        pytest.skip(f"{mode} sandbox not available here: {e}")


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def score_cases(reward, cases: dict[str, tuple[str, float]], tests: list[str] = TESTS) -> dict[str, float]:
    """Score every case's code (wrapped in a block) against `tests`; returns name -> score."""
    names = list(cases)
    scores = reward([""] * len(names), [block(cases[n][0]) for n in names], tests=[tests] * len(names))
    return dict(zip(names, scores))


def expected(cases: dict[str, tuple[str, float]]) -> dict[str, float]:
    return {n: v for n, (_, v) in cases.items()}


def sandbox_processes(owner: int | None = None, *, helper: bool = False) -> list[int]:
    """Live sandbox processes of the trainer process `owner` (default: this one): those whose
    command line carries its owner tag, and, as root, any process under a uid of its range (the
    candidate may exec another program). `helper`: also the trainer's staging helper, which
    lives as long as the trainer."""
    from rewards._host import UID_BASE, UIDS_PER_TRAINER

    owner = os.getpid() if owner is None else owner
    base = UID_BASE + (owner % 4096) * UIDS_PER_TRAINER
    tags = [f"dllm-sbx-{kind}={owner}\0".encode() for kind in (("owner", "stage") if helper else ("owner",))]
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        state = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("State:")), "")
        uid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Uid:")))
        if state in ("Z", "X"):
            continue
        if any(t in cmd for t in tags) or (os.geteuid() == 0 and base <= uid < base + UIDS_PER_TRAINER):
            out.append(int(p))
    return out

"""Lifetime: SIGKILL the trainer in the middle of a batch; every sandbox process of it (candidates
that fork, detach with setsid, double-fork or exec another program included) is gone within 2 s,
on both backends; so is the trainer's staging helper (bwrap as root)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.sandbox import MODES, code_reward, sandbox_processes

ROOT = Path(__file__).resolve().parents[1]

TRAINER = r'''
import sys
sys.path.insert(0, sys.argv[2])
from rewards.code import CodeReward
reward = CodeReward(mode=sys.argv[1], timeout_s=120.0, pool_size=3)
long = """```python
import os, time, subprocess
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(300)
    os._exit(0)
if os.fork() == 0:
    os.execv("/bin/sleep", ["sleep", "300"])
def f(x):
    time.sleep(300)
```"""
quick = "```python\ndef f(x):\n    return 2 * x\n```"
print("start", flush=True)
while True:  # two long samples hold their sandboxes; the third worker keeps starting new ones
    reward([""] * 12, [long, long] + [quick] * 10, tests=[["assert f(2) == 4"]] * 12)
'''


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_trainer_kills_every_sandbox(mode, tmp_path):
    code_reward(mode)  # fails in CI, skips elsewhere, when this backend is missing
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, mode, str(ROOT)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        assert trainer.stdout.readline() == b"start\n"
        # both long samples up: each has a candidate, its children and a tests sandbox (>= 10 processes)
        _wait_for(lambda: len(sandbox_processes(trainer.pid)) >= 10, 60.0, "the long samples to start")
        time.sleep(0.5)  # let the quick samples churn
        assert len(sandbox_processes(trainer.pid)) >= 10
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    killed = time.monotonic()
    left = sandbox_processes(trainer.pid, helper=True)
    while left and time.monotonic() - killed < 2.0:
        time.sleep(0.01)
        left = sandbox_processes(trainer.pid, helper=True)
    for pid in left:  # do not leave them behind for the rest of the suite
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert left == [], f"sandbox processes alive 2 s after the trainer was killed: {left}"

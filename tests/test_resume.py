"""A diffu-GRPO run killed with SIGKILL and resumed logs the same per-step metrics as an
uninterrupted run (real subprocesses, real kill); also with SPG's objective and random block masks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "tests.helpers.toy_grpo", str(run_dir), "--max-steps", str(STEPS),
            "--save-steps", "2", *extra]


def _env():
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("MASTER_PORT", None)
    return env


def _metrics(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    out = {}
    for r in rows:
        if "reward" in r:  # training-step rows (eval rows carry other keys)
            out[r["step"]] = {k: v for k, v in r.items() if not k.startswith("timing/")}
    return out


@pytest.mark.parametrize("objective", ["diffu_grpo", "spg"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, objective):
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ["--objective", objective]
    subprocess.run(_cmd(full, *extra), cwd=ROOT, env=_env(), check=True, timeout=600)

    proc = subprocess.Popen(_cmd(killed, *extra), cwd=ROOT, env=_env())
    metrics_file = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged_before_kill = len(metrics_file.read_text().splitlines())
    assert logged_before_kill < STEPS
    from rl.checkpoint import latest_step

    resumed_from = latest_step(killed)
    assert resumed_from is not None and 2 <= resumed_from < STEPS  # a real resume, not a restart

    subprocess.run(_cmd(killed, "--resume", *extra), cwd=ROOT, env=_env(), check=True, timeout=600)
    a, b = _metrics(full), _metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key, value in a[step].items():
            assert b[step][key] == value, (step, key, value, b[step][key])

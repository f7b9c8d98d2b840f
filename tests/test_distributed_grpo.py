"""diffu-GRPO with 2 CPU processes (gloo) under ZeRO-2 and ZeRO-3: both ranks finish the steps
and end with identical weights (each rank samples its own rollouts; gradients are averaged)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rl.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_ranks_train_grpo_and_agree(tmp_path, stage):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "result"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tests.helpers.toy_grpo", str(tmp_path / "run"), "--max-steps", "3", "--deepspeed", stage,
           "--beta", "0.04", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0 = json.loads(Path(f"{out}.rank0.json").read_text())
    r1 = json.loads(Path(f"{out}.rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["step"] == r1["step"] == 3
    assert r0["checksum"] == r1["checksum"]
    # metrics are reduced across ranks before logging: both ranks report the same numbers
    assert r0["metrics"]["reward"] == r1["metrics"]["reward"]
    assert (tmp_path / "run" / "final" / "config.json").is_file()

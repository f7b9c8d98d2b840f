"""The multi-node launcher on one machine: 2 "nodes" x 1 process over loopback, two torchrun
invocations (node ranks 0 and 1) through scripts/launch_multinode.sh, 2 diffu-GRPO steps with
ZeRO-3. Both must finish, and agree on the metrics and on the trained weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

OVERRIDES = [
    "recipe=grpo", "rl.max_steps=2", "rl.deepspeed=zero3", "rl.per_device_prompts=2", "rl.num_generations=2",
    "rl.num_iterations=1", "rl.eval_steps=0", "task.num_sft=0", "task.num_rl=8", "task.num_val=4", "task.num_test=4",
    "logger.wandb.mode=disabled", "recipe.plot=false", "model.tiny.hidden_size=32", "model.tiny.num_hidden_layers=1",
    "model.tiny.num_attention_heads=2", "model.tiny.intermediate_size=64",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_nodes_over_loopback_zero3(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    procs = []
    for node_rank in (0, 1):
        log = open(tmp_path / f"node{node_rank}.log", "w")
        procs.append((subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "launch_multinode.sh"), "torchrun", *OVERRIDES, f"run_dir={run_dir}"],
            cwd=ROOT, env={**env, "NODE_RANK": str(node_rank)}, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=600))
        finally:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = {r: (tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1)}
    assert codes == [0, 0], logs

    markers = [json.loads((run_dir / f"rank{r}.done.json").read_text()) for r in (0, 1)]
    assert [m["rank"] for m in markers] == [0, 1] and all(m["world_size"] == 2 for m in markers)
    # same reduced metrics, same test accuracy, and the same full weights on both ranks
    assert markers[0]["train"] == markers[1]["train"] and markers[0]["train"]
    assert markers[0]["eval/accuracy"] == markers[1]["eval/accuracy"]
    assert markers[0]["param_checksum"] == pytest.approx(markers[1]["param_checksum"], rel=0, abs=1e-9)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rl"]["train"]["lr"] > 0
    assert (run_dir / "rl" / "final" / "config.json").exists()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]

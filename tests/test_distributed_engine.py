"""Two CPU processes (gloo): ZeRO-2 under the ``deepspeed`` launcher, ZeRO-3 under torchrun.

Each run trains the tiny model on a global batch split over 2 ranks (tests/dist_worker.py);
here we check the ranks agree, the loss and weights equal a single-process run on the same
global batch, ZeRO-3 stores ~1/2 of the parameters per rank (policy and reference), rollouts
inside ``gathered_for_generation`` issue no all-gathers, checkpoints round-trip across ranks
and the ZeRO-3 HF export loads. The first run on a machine builds DeepSpeed's CPU comm op
(~30 s); afterwards each launch takes ~30-60 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl import distributed as D

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
BIN = Path(sys.executable).parent


def launch_cmd(launcher: str, port: int, stage: str, out: Path) -> list[str]:
    args = [str(WORKER), "--stage", stage, "--out", str(out)]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), *args]
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), *args]


def load_worker():
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def single_process(stage: str):
    """The same training in this process (world size 1) on the whole global batch."""
    from rl.engine import build_engine, consolidated_state_dict
    from rollout.tiny import build_tiny_model, build_tiny_tokenizer

    w = load_worker()
    tok = build_tiny_tokenizer()
    engine = build_engine(build_tiny_model(tok, seed=0), stage, lr=w.LR, warmup_steps=1, total_steps=10,
                          micro_batch_size=w.GLOBAL_BATCH)
    losses = w.train_steps(engine, tok, w.global_batch(tok), w.STEPS)
    return losses, consolidated_state_dict(engine)


@pytest.mark.parametrize("stage,launcher", [("zero2", "deepspeed"), ("zero3", "torchrun")])
def test_two_rank_training(tmp_path, stage, launcher):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = launch_cmd(launcher, D.free_port(), stage, tmp_path)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["backend"] == "gloo"
    assert r0["zero3"] == r1["zero3"] == (stage == "zero3")

    # ranks agree (global loss, consolidated weights)
    assert r0["losses"] == r1["losses"] and r0["losses"][-1] < r0["losses"][0]
    w0, w1 = (torch.load(tmp_path / f"weights-rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)

    # same as one process on the same global batch
    losses, sd = single_process(stage)
    assert r0["losses"] == pytest.approx(losses, rel=1e-5)
    for k in sd:
        torch.testing.assert_close(w0[k], sd[k], atol=1e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")

    for r in (r0, r1):
        assert r["ref_max_err"] < 1e-5  # the (sharded) reference is the initial model
        assert r["generation_max_err"] < 1e-5 and r["gathers_generation"] == 0
        if stage == "zero3":
            assert r["gathers_engine_forward"] > 0  # a plain ZeRO-3 forward does gather
            for local, full in (r["policy_numel"], r["ref_numel"]):
                assert full > 800_000 and 0.45 <= local / full <= 0.55
        assert r["resume_step"] == 3
        assert r["resume_draw_equal"] and r["resume_loss_equal"] and r["resume_weights_equal"]

    # merged HF export written by rank 0 from the (ZeRO-3 consolidated) weights
    from transformers import AutoModelForMaskedLM

    final = torch.load(tmp_path / "final-weights.pt")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").state_dict()
    for k, v in final.items():
        assert torch.equal(loaded[k], v), k

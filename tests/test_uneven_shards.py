"""Item 5 of issue #23: no hang on uneven data. Every rank makes the same generation calls in
evaluation and validation whatever its shard size (recipes/evaluation.py: ``calls_per_rank``);
GRPO's rollouts and DPO's pairs already give every rank the same number of rows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.evaluation import calls_per_rank, generate_texts, shard

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rows, world, batch, expected", [
    (9, 2, 4, 2),  # shards of 5 and 4: both ranks make 2 calls
    (8, 2, 4, 1),
    (1, 4, 4, 1),  # ranks 1..3 have no row and still make the call
    (0, 2, 4, 0),
    (17, 8, 2, 2),
])
def test_calls_per_rank_is_the_largest_shards(rows, world, batch, expected):
    assert calls_per_rank(rows, world, batch) == expected
    largest = max(len(shard(list(range(rows)), r, world)) for r in range(world))
    assert expected == -(-largest // batch)


class _Recorder:
    """A rollout engine stand-in that records the prompts of each call."""

    class _Out:
        def __init__(self, n):
            self.n, self.num_forward_passes = n, 3

        def decode(self, tok):
            return ["x"] * self.n

    adapter = type("A", (), {"tokenizer": None})()

    def __init__(self):
        self.calls = []

    def generate(self, prompts, options=None, generator=None):
        self.calls.append(list(prompts))
        return self._Out(len(prompts))


def test_a_short_shard_pads_with_filler_calls_whose_output_is_dropped():
    engine = _Recorder()
    texts, passes, _ = generate_texts(engine, ["a", "b", "c", "d"], None, batch_size=4, calls=2, filler="z")
    assert engine.calls == [["a", "b", "c", "d"], ["z"]] and texts == ["x"] * 4 and passes == 3
    engine = _Recorder()
    assert generate_texts(engine, [], None, batch_size=4, calls=1, filler="z")[0] == [] and engine.calls == [["z"]]


@pytest.mark.distributed
def test_two_ranks_with_shards_of_5_and_4_finish_under_zero3_and_vllm_tensor_parallel(tmp_path):
    """tests/uneven_shards_worker.py: 9 rows in batches of 4 on a ZeRO-3 engine, torch backend and
    vLLM tensor parallel 2 (without vLLM: the torch backend only). Before the fix rank 0's second
    call waited forever (the run was killed at its timeout)."""
    backends = "torch,vllm" if importlib.util.find_spec("vllm") else "torch"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", WANDB_MODE="disabled")
    from rl.distributed import free_port

    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "uneven_shards_worker.py"), "--out", str(tmp_path), "--backends", backends]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["shard"], r1["shard"]) == (5, 4)
    for backend in backends.split(","):
        assert r0[backend]["calls"] == r1[backend]["calls"] == 2
        assert r0[backend] == r1[backend] and r0[backend]["num_examples"] == 9
    # distill data: 18 samples as shards of 9 (3 calls of 4 each), the same gathered list on both
    # ranks, every kept completion solved ('7' in it), no duplicate, in prompt order
    d0, d1 = r0["distill"], r1["distill"]
    assert d0["calls"] == d1["calls"] == 3 and d0["kept"] == d1["kept"] and d0["stats"] == d1["stats"]
    kept = d0["kept"]
    assert d0["stats"]["samples"] == 18 and d0["stats"]["kept"] == len(kept)
    assert all("7" in k["response"] for k in kept) and len({(k["prompt"], k["response"]) for k in kept}) == len(kept)
    order = [int(k["prompt"][0]) for k in kept]
    assert order == sorted(order)

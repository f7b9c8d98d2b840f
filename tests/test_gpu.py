"""Item 7 of issue #23: the checks only a CUDA machine can run, ready for the first one (``-m gpu``;
``bash scripts/gpu_check.sh`` runs them and prints one summary line). Without CUDA every test here
skips with the reason. On the machine: bf16 autocast forward / backward of LLaDA and Dream,
NCCL collectives (one process per visible GPU, up to 2), the vLLM CUDA backend equal to the
torch backend with sleep mode in between, and the memory plan within 10% of
``torch.cuda.max_memory_allocated`` for an SFT and a GRPO step (scripts/bench_memory.py --device cuda)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: these run on a GPU machine (bash scripts/gpu_check.sh)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_autocast_forward_and_backward(published_folder, family):
    from rollout import PolicyAdapter

    policy = PolicyAdapter.from_pretrained(str(published_folder(family)), dtype=torch.float32).cuda()
    ids = torch.randint(10, 60, (2, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        ref = policy(ids).logits.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = policy(ids).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = policy(ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


NCCL_WORKER = """
import json, sys, torch
from rl import distributed as D
from rl.engine import init_distributed
init_distributed()
assert torch.distributed.get_backend() == "nccl" and D.collective_device().type == "cuda"
rank, world = D.get_rank(), D.get_world_size()
total = D.all_reduce_sum([rank + 1, 2.5])
mean = D.all_reduce_mean(torch.full((3,), float(rank), device="cuda"))
obj = D.broadcast_object({"from": rank}, src=0)
gathered = D.all_gather_object(rank)
D.barrier()
if rank == 0:
    json.dump({"world": world, "total": total.tolist(), "mean": mean.tolist(), "obj": obj, "gathered": gathered},
              open(sys.argv[1], "w"))
"""


def test_nccl_collectives(tmp_path):
    from rl.distributed import free_port

    n = min(2, torch.cuda.device_count())
    script = tmp_path / "worker.py"
    script.write_text(NCCL_WORKER)
    out = tmp_path / "out.json"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(n), "--master_port",
           str(free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == n and r["total"] == [n * (n + 1) / 2, 2.5 * n]
    assert r["mean"] == [(n - 1) / 2] * 3 and r["obj"] == {"from": 0} and r["gathered"] == list(range(n))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM's CUDA build is not installed")
def test_vllm_cuda_backend_equals_torch_and_sleeps(published_folder):
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        pytest.skip("the installed vLLM is the CPU build (pip install vllm==0.32.* for CUDA)")
    from rl.config import RolloutOptions, VLLMOptions
    from rollout import PolicyAdapter
    from rollout.engine import RolloutEngine
    from rollout.vllm_backend.engine import VLLMEngine

    policy = PolicyAdapter.from_pretrained(str(published_folder("llada", init_std=0.5)), dtype=torch.float32).cuda()
    base = RolloutOptions(gen_length=16, block_length=8, steps=8)
    options = RolloutOptions(gen_length=16, block_length=8, steps=8, backend="vllm",
                             vllm=VLLMOptions(sleep=True, max_model_len=64, gpu_memory_utilization=0.2))
    prompts = ["hello world", "7", "a longer prompt, padded on the left"]
    with VLLMEngine(options, policy) as engine:
        assert engine.llm.llm_engine.vllm_config.model_config.max_model_len == 64
        expected = RolloutEngine(base, policy).generate(prompts)
        assert torch.equal(engine.generate(prompts).sequences, expected.sequences)
        before = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert torch.cuda.mem_get_info()[0] > before  # the engine's memory is back
        with torch.no_grad():
            for p in policy.parameters():
                p.mul_(1.01)
        assert engine.update_weights() is None  # asleep: streamed at wake-up
        again = engine.generate(prompts)  # wakes, reloads the current weights
        assert torch.equal(again.sequences, RolloutEngine(base, policy).generate(prompts).sequences)


@pytest.mark.parametrize("trainer", ["sft", "grpo"])
def test_memory_plan_within_10_percent_of_max_memory_allocated(tmp_path, trainer):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--device", "cuda", "--sizes",
                           "100m", "--trainers", trainer, "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    assert abs(r["predicted"] / r["measured"] - 1) <= 0.10, r

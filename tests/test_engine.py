"""DeepSpeed engine setup in one process without a launcher (gloo world of size 1, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rl.engine import (build_engine, build_reference, consolidated_state_dict, fill_ds_config,
                       gathered_for_generation, init_distributed, is_zero3, load_ds_config, lr_lambda, unwrap)
from rl.losses import diffusion_sft_loss
from rollout.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]

LR = 1e-2


def sft_batch(tok, b: int = 4, prompt: int = 10, resp: int = 14, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tok), (b, prompt + resp), generator=g)
    resp_mask = torch.zeros_like(ids, dtype=torch.bool)
    resp_mask[:, prompt:] = True
    return ids, resp_mask


def train(engine, tok, steps: int, batch) -> list[float]:
    """``steps`` optimizer updates on a fixed batch with the same masks every step."""
    ids, resp = batch
    lrs = []
    for _ in range(steps):
        lrs.append(engine.get_lr()[0])
        loss = diffusion_sft_loss(engine, ids, resp, mask_id=tok.mask_token_id,
                                  generator=torch.Generator().manual_seed(123))
        engine.backward(loss)
        engine.step()
    return lrs


@torch.no_grad()
def eval_loss(module, tok, batch) -> float:
    ids, resp = batch
    return diffusion_sft_loss(module, ids, resp, mask_id=tok.mask_token_id,
                              generator=torch.Generator().manual_seed(123)).item()


def test_init_distributed_single_process_is_idempotent():
    import torch.distributed as dist

    init_distributed()
    init_distributed()
    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_rank() == 0
    assert dist.get_backend() == "gloo"


def test_single_process_init_skips_deepspeeds_shm_op():
    """One process never all-reduces: DeepSpeed's shared-memory op (JIT-built C++) is not built
    there, and the builder is restored afterwards for multi-process worlds."""
    import importlib

    import deepspeed.comm.comm as ds_comm
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` as an attribute is torch

    from rl.engine import _without_shm_op

    build = ds_torch.build_shm_op
    with _without_shm_op():
        assert ds_torch.build_shm_op() is None
    assert ds_torch.build_shm_op is build
    init_distributed()
    assert ds_comm.cdb.shm_comm_op is None


def test_lr_lambda_warmup_then_constant_or_cosine():
    kw = dict(warmup_steps=4, total_steps=20)
    assert [lr_lambda(s, **kw) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_lambda(s, schedule="cosine", min_lr_ratio=0.1, **kw) for s in range(21)]
    assert cos[:4] == [0.25, 0.5, 0.75, 1.0]
    assert cos[4] == pytest.approx(1.0) and cos[12] == pytest.approx(0.55) and cos[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[4:], cos[5:]))  # monotone decay after warmup


def test_lr_lambda_linear_equals_hf_trainers_default_schedule():
    """``linear`` is transformers' get_linear_schedule_with_warmup (HF Trainer's default, d1's SFT)
    after the warmup; during the warmup ours gives update k the factor k / warmup (HF's first update
    runs at lr 0)."""
    from transformers import get_linear_schedule_with_warmup

    for warmup, total in ((0, 30), (5, 30)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        hf = get_linear_schedule_with_warmup(opt, warmup, total)
        ref = [hf.lr_lambdas[0](s) for s in range(total + 1)]
        ours = [lr_lambda(s, warmup_steps=warmup, total_steps=total, schedule="linear") for s in range(total + 1)]
        assert ours[warmup:] == pytest.approx(ref[warmup:])
        assert ours[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])


def test_fill_ds_config_and_errors(tmp_path):
    cfg = fill_ds_config(load_ds_config("zero2"), micro_batch_size=3, grad_accum=2, grad_clip=None, bf16=True,
                         world_size=4)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 0.0
    assert cfg["bf16"] == {"enabled": True} and cfg["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="optimizer"):
        fill_ds_config({"optimizer": {"type": "Adam"}}, micro_batch_size=1)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_ds_config(bad)


def test_stages_train_and_agree(tiny_tokenizer):
    """ZeRO 0/2/3 (and 3 + CPU offload) take the same AdamW steps in one process: the loss
    drops, the LR follows the warmup, and the final weights agree across stages."""
    batch = sft_batch(tiny_tokenizer)
    final = {}
    for stage in ("zero0", "zero2", "zero3", "zero3_offload"):
        model = build_tiny_model(tiny_tokenizer, seed=0)
        engine = build_engine(model, stage, lr=LR, warmup_steps=2, total_steps=10, micro_batch_size=4,
                              weight_decay=0.01)
        assert is_zero3(engine) == stage.startswith("zero3")
        before = eval_loss(engine, tiny_tokenizer, batch)
        lrs = train(engine, tiny_tokenizer, 4, batch)
        assert lrs == pytest.approx([LR * 0.5, LR, LR, LR])
        after = eval_loss(engine, tiny_tokenizer, batch)
        assert after < before - 0.3, (stage, before, after)
        final[stage] = consolidated_state_dict(engine)
    ref = final.pop("zero0")
    for stage, sd in final.items():
        assert sd.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(sd[k], ref[k], atol=1e-4, rtol=1e-3, msg=lambda m: f"{stage}: {k}: {m}")


def test_only_trainable_params_are_optimised(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=0)
    model.requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if ".mlp." in n]
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = build_engine(model, "zero2", lr=LR, total_steps=5, micro_batch_size=4, grad_clip=None)
    n_opt = sum(p.numel() for g in engine.optimizer.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(before[n].numel() for n in trainable)  # ZeRO-2 flat fp32 partition
    train(engine, tiny_tokenizer, 2, sft_batch(tiny_tokenizer))
    for n, p in unwrap(engine).named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), n


@pytest.mark.parametrize("stage", ["zero0", "zero3"])
def test_reference_is_frozen_copy(tiny_tokenizer, stage):
    model = build_tiny_model(tiny_tokenizer, seed=0)
    ids, _ = sft_batch(tiny_tokenizer)
    with torch.no_grad():
        expect = model(ids).logits
    ref = build_reference(model, stage)
    assert ref.optimizer is None or is_zero3(ref)  # ZeRO-3 inference: parameter offload only
    assert not unwrap(ref).training and not any(p.requires_grad for p in unwrap(ref).parameters())
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, expect)
    # the policy built from the same instance afterwards trains; the reference does not move
    engine = build_engine(model, stage, lr=LR, total_steps=5, micro_batch_size=4)
    train(engine, tiny_tokenizer, 2, sft_batch(tiny_tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, expect)
    with pytest.raises(ValueError, match="partitioned") if stage == "zero3" else _nullcontext():
        build_reference(model, stage)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_gathered_for_generation_zero3(tiny_tokenizer):
    """Inside the context the module holds full weights (no ZeRO hooks) and matches the
    engine's own forward; training works again after it."""
    model = build_tiny_model(tiny_tokenizer, seed=0)
    engine = build_engine(model, "zero3", lr=LR, total_steps=5, micro_batch_size=4)
    ids, _ = sft_batch(tiny_tokenizer)
    with torch.no_grad():
        expect = engine(ids).logits
    n_hooks = len(engine.optimizer.parameter_offload.forward_hooks)
    with gathered_for_generation(engine) as module, torch.no_grad():
        assert engine.optimizer.parameter_offload.forward_hooks == []
        assert all(p.numel() == p.ds_numel for p in module.parameters())
        for _ in range(3):
            torch.testing.assert_close(module(ids).logits, expect)
        assert all(p.numel() == p.ds_numel for p in module.parameters())
    assert len(engine.optimizer.parameter_offload.forward_hooks) == n_hooks
    batch = sft_batch(tiny_tokenizer)
    before = eval_loss(engine, tiny_tokenizer, batch)
    train(engine, tiny_tokenizer, 3, batch)
    assert eval_loss(engine, tiny_tokenizer, batch) < before
    assert math.isfinite(before)


def test_collectives_use_the_process_group_device(monkeypatch):
    """NCCL rejects CPU tensors: every collective goes through rl.distributed, which puts its
    tensors on this rank's GPU under NCCL and on the CPU under gloo, and hands back CPU floats."""
    import re

    import torch.distributed as dist

    from rl import distributed as D

    init_distributed()
    assert dist.get_backend() == "gloo" and D.collective_device() == torch.device("cpu")
    out = D.all_reduce_sum(torch.tensor([1.0, 2.0], dtype=torch.float16))
    assert out.dtype == torch.float64 and out.device.type == "cpu" and out.tolist() == [1.0, 2.0]
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert D.collective_device() == torch.device("cuda", 3)
    # no module outside rl/distributed.py calls a torch.distributed collective directly
    pattern = re.compile(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|reduce_scatter\w*|gather|scatter)\(")
    offenders = [str(p.relative_to(ROOT)) for folder in ("rl", "recipes", "rollout", "rewards")
                 for p in (ROOT / folder).rglob("*.py") if p.name != "distributed.py" and pattern.search(p.read_text())]
    assert offenders == []

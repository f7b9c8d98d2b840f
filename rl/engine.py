"""DeepSpeed engine setup shared by every trainer (ZeRO stage 0/2/3, optional CPU offload).

The same code runs as one plain process (no launcher: a world of size 1 on gloo), as N CPU
processes (gloo, tests) or as N GPUs x M nodes (nccl) under the ``deepspeed`` launcher or
torchrun. The JSON files in ``configs/deepspeed/`` hold only the sharding/offload layout;
batch sizes, optimizer, LR schedule, clipping and precision come from the trainer's
arguments and are filled in here (:func:`fill_ds_config`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from rl import distributed as D
from rollout.weights import gathered_for_generation, is_zero3  # noqa: F401  (re-exported)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def init_distributed(backend: str | None = None) -> None:
    """Initialise the default process group once (idempotent).

    Under a launcher (``deepspeed``, torchrun) the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
    ``MASTER_*`` variables it sets are used. Without one, a single-process world (rank 0 of 1)
    is set up through a TCP rendezvous on 127.0.0.1 with a free port; only ``LOCAL_RANK=0`` is
    put into the environment (DeepSpeed reads it). Backend: nccl when CUDA is available,
    gloo otherwise.
    """
    import deepspeed
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it even in a single process
    if backend == "nccl":
        torch.cuda.set_device(D.get_local_rank())
    if not launched and not torch.distributed.is_initialized():
        # A private TCP rendezvous instead of RANK/WORLD_SIZE/MASTER_* in os.environ, so that
        # subprocesses started later (tests, evaluators) do not mistake themselves for rank 0.
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{D.free_port()}",
                                             rank=0, world_size=1)
    single = torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1  # launched: not yet
    with _without_shm_op() if backend == "gloo" and single else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)


@contextlib.contextmanager
def _without_shm_op():
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op at init (C++ through
    ninja: about a minute on 2 cores, the first time on a machine). One process never
    all-reduces, so it is skipped there; DeepSpeed falls back to torch.distributed without it."""
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` as an attribute is torch

    build = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def release_memory() -> None:
    """Collect garbage (DeepSpeed engines hold reference cycles) and return the CUDA caching
    allocator's free blocks to the device, so the next model of the process can use them."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device() -> torch.device:
    """The accelerator device of this rank (``cpu`` without CUDA)."""
    if torch.cuda.is_available():
        return torch.device("cuda", D.get_local_rank())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- config


def load_ds_config(ds_config: str | Path | dict) -> dict:
    """A DeepSpeed config as a fresh dict: a dict (copied), a JSON path, or the name of a file
    in ``configs/deepspeed/`` (``"zero2"`` -> ``configs/deepspeed/zero2.json``)."""
    if isinstance(ds_config, dict):
        return copy.deepcopy(ds_config)
    path = Path(ds_config)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{path.name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {ds_config} (tried {path})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"DeepSpeed config {path}: top level must be a JSON object")
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def _offloads_optimizer(cfg: dict) -> bool:
    dev = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return dev not in (None, "none")


def fill_ds_config(cfg: dict, *, micro_batch_size: int, grad_accum: int = 1,
                   grad_clip: float | None = 1.0, bf16: bool = False,
                   world_size: int | None = None) -> dict:
    """Fill batch sizes, clipping and precision from trainer arguments (returns a new dict).

    ``train_batch_size = micro_batch_size * grad_accum * world_size``; values the file sets
    for these keys (including HF-style ``"auto"``) are replaced.
    """
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(f"DeepSpeed config: remove the '{key}' section; build_engine sets the "
                             "optimizer (AdamW) and LR schedule from the trainer arguments")
    if micro_batch_size < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch_size ({micro_batch_size}) and grad_accum ({grad_accum}) must be >= 1")
    cfg = copy.deepcopy(cfg)
    world_size = world_size or D.get_world_size()
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch_size * grad_accum * world_size
    cfg["gradient_clipping"] = float(grad_clip) if grad_clip else 0.0
    cfg["bf16"] = {**(cfg.get("bf16") if isinstance(cfg.get("bf16"), dict) else {}), "enabled": bool(bf16)}
    cfg.pop("fp16", None)
    cfg.setdefault("steps_per_print", 10**9)  # our Tracker logs; keep DeepSpeed quiet
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


# ----------------------------------------------------------------------------- optimizer


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, schedule: str = "constant",
              min_lr_ratio: float = 0.0) -> float:
    """LR multiplier for optimizer update number ``step + 1`` (``step`` = updates done so far).

    Linear warmup ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` updates, then
    ``1`` (``constant``), a straight line from 1 to 0 at ``total_steps`` (``linear``: HF Trainer's
    default schedule, which d1's SFT uses) or a half cosine from 1 down to ``min_lr_ratio`` at
    ``total_steps`` (``cosine``; Loshchilov & Hutter 2017, SGDR, without restarts).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: matrices decay, vectors (biases, norms) do not."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _make_optimizer(groups: list[dict], cfg: dict, *, lr: float, betas, eps: float) -> torch.optim.Optimizer:
    """AdamW. With optimizer offload on a GPU machine DeepSpeed's CPU Adam (AdamW mode) is used
    (the fast path ZeRO-Offload is built for); otherwise ``torch.optim.AdamW``, which ZeRO
    stages 0/2/3 (and offload on a CPU-only machine) accept as a client optimizer."""
    if _offloads_optimizer(cfg) and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    if _offloads_optimizer(cfg):
        cfg["zero_force_ds_cpu_optimizer"] = False
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def build_engine(model: nn.Module, ds_config: str | Path | dict, *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, warmup_steps: int = 0,
                 total_steps: int, scheduler: Literal["constant", "cosine", "linear"] = "constant",
                 min_lr_ratio: float = 0.0, micro_batch_size: int, grad_accum: int = 1,
                 grad_clip: float | None = 1.0, bf16: bool = False, trainable_only: bool = True):
    """Wrap ``model`` in a ``deepspeed.DeepSpeedEngine`` with AdamW and a warmup schedule.

    Only parameters with ``requires_grad`` are optimised (LoRA adapters); with
    ``trainable_only=False`` every parameter is unfrozen first (full fine-tuning). The LR
    follows :func:`lr_lambda` (``scheduler``: "constant", "cosine" or "linear" after the warmup) and advances once per optimizer update (every ``grad_accum``
    micro-batches, inside ``engine.step()``). Gradients are clipped to ``grad_clip`` (global
    norm; ``None``/0 disables). ``bf16`` keeps fp32 master weights in the optimizer.
    Use as: ``loss = f(engine, batch); engine.backward(loss); engine.step()``.
    """
    import deepspeed

    from rl.config import LR_SCHEDULERS

    if scheduler not in LR_SCHEDULERS:
        raise ValueError(f"scheduler must be one of {LR_SCHEDULERS}, got {scheduler!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    init_distributed()
    cfg = fill_ds_config(load_ds_config(ds_config), micro_batch_size=micro_batch_size,
                         grad_accum=grad_accum, grad_clip=grad_clip, bf16=bf16)
    if not trainable_only:
        model.requires_grad_(True)
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("build_engine: the model has no parameters with requires_grad=True")
    optimizer = _make_optimizer(groups, cfg, lr=lr, betas=betas, eps=eps)
    sched_kw = dict(warmup_steps=warmup_steps, total_steps=total_steps, schedule=scheduler,
                    min_lr_ratio=min_lr_ratio)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, **sched_kw))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_sched,
                                           config=cfg)
    return engine


def build_reference(model: nn.Module, ds_config: str | Path | dict, *, micro_batch_size: int = 1,
                    bf16: bool = False, copy_model: bool = True):
    """A frozen, eval-mode reference engine (no optimizer) for KL terms.

    Under ZeRO-3 it is sharded like the policy (each rank stores ~1/world of it and gathers
    layers during forward); under stage 0/2 every rank holds a plain frozen copy. By default
    ``model`` is deep-copied, so build the reference before the policy engine (ZeRO-3
    partitions the policy's parameters in place) or pass a separate instance.
    """
    import deepspeed

    init_distributed()
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("build_reference: model is already ZeRO-3 partitioned; build the reference "
                         "before the policy engine or pass a separate model instance")
    cfg = fill_ds_config(load_ds_config(ds_config), micro_batch_size=micro_batch_size,
                         grad_accum=1, grad_clip=None, bf16=bf16)
    zero = cfg.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero_stage(cfg) != 3:
        cfg["zero_optimization"] = {"stage": 0}
    ref = copy.deepcopy(model) if copy_model else model
    ref.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=ref, config=cfg)
    engine.eval()
    return engine


# ----------------------------------------------------------------------------- access


def unwrap(engine: Any) -> nn.Module:
    """The user module inside a DeepSpeed engine (or the module itself)."""
    if hasattr(engine, "zero_optimization_stage") and isinstance(getattr(engine, "module", None), nn.Module):
        return engine.module
    return engine


def consolidated_state_dict(engine, *, rank0_only: bool = True) -> dict[str, torch.Tensor] | None:
    """Full (unsharded) CPU state dict of the engine's module.

    Under ZeRO-3 the weights are gathered layer by layer onto rank 0 (every rank must call
    this); other ranks get ``None`` unless ``rank0_only=False`` (then every rank gathers the
    whole model at once and gets a copy). Under stage 0/2 every rank has the full weights.
    Tensors are in the module's dtype (bf16 under ``bf16=True``), not the fp32 master copy.
    """
    module = unwrap(engine)
    if not is_zero3(engine):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if rank0_only:
        return engine._zero3_consolidated_16bit_state_dict()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def zero3_partition_numel(module: nn.Module) -> tuple[int, int]:
    """(numel stored on this rank, full numel) over ZeRO-3 partitioned parameters."""
    local = sum(p.ds_tensor.numel() for p in module.parameters() if hasattr(p, "ds_tensor"))
    full = sum(p.ds_numel for p in module.parameters() if hasattr(p, "ds_numel"))
    return local, full

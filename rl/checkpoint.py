"""Atomic, resumable training checkpoints and a merged Hugging Face export.

Layout of ``run_dir/checkpoints/``::

    step-40/            complete checkpoints (only ever created by a rename)
      ds/               DeepSpeed's engine.save_checkpoint (model/LoRA, optimizer, scheduler)
      trainer_state.pt  rank 0: the trainer's dict (step, data position, ...)
      rng-rank{r}.pt    every rank: python/numpy/torch(/cuda) RNG and named generator states
      meta.json         step, world size, ZeRO stage
    latest              text file naming the newest complete step dir (replaced atomically)
    .tmp-step-60/       a save in progress (deleted by the next save)

A save writes everything into ``.tmp-step-N``, all ranks meet at a barrier, rank 0 fsyncs,
renames the directory to ``step-N`` and then replaces ``latest`` (temp file + fsync +
``os.replace``). A kill at any instant leaves ``latest`` naming a complete directory. Needs a
file system shared by all ranks (as DeepSpeed's own checkpoints do).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from rl import distributed as D

DS_TAG = "ds"
_STEP_RE = re.compile(r"^step-(\d+)$")


def _ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _complete_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name)))


def latest_step(run_dir: str | Path) -> int | None:
    """Step of the newest complete checkpoint: the one ``latest`` names, or (if that file is
    missing or names a missing directory) the highest ``step-N`` directory; None if none."""
    root = _ckpt_root(run_dir)
    try:
        name = (root / "latest").read_text().strip()
        m = _STEP_RE.match(name)
        if m and (root / name).is_dir():
            return int(m.group(1))
    except FileNotFoundError:
        pass
    steps = _complete_steps(root)
    return steps[-1] if steps else None


# ----------------------------------------------------------------------------- RNG states


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore the process RNGs (exact resume) and the named generators in place."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["generators"]
    missing = sorted(set(generators) - set(saved))
    if missing:
        raise KeyError(f"checkpoint has no state for generator(s) {missing}; saved: {sorted(saved)}")
    for name, g in generators.items():
        g.set_state(saved[name])


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(engine, run_dir: str | Path, step: int, trainer_state: dict, *, keep_last: int | None = 2) -> Path:
    """Write checkpoint ``step`` atomically; every rank must call this. Returns its directory.

    ``trainer_state`` is any picklable dict (step, data position, metrics...); an entry
    ``"generators"`` (name -> ``torch.Generator``) is stored per rank as generator states.
    ``keep_last`` complete checkpoints are kept (None or 0: all).
    """
    root = _ckpt_root(run_dir)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    state = dict(trainer_state)
    generators = state.pop("generators", None) or {}
    rank = D.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    D.barrier()
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    # Frozen weights (a LoRA base model) are rebuilt from the pretrained model, not re-saved.
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=frozen)
    torch.save(_rng_state(generators), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        torch.save({**state, "step": step}, tmp / "trainer_state.pt")
        meta = {"step": step, "world_size": D.get_world_size(), "zero_stage": engine.zero_optimization_stage(),
                "exclude_frozen_parameters": frozen, "time": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    D.barrier()
    if rank == 0:
        _fsync_tree(tmp)
        old = root / f".old-step-{step}"
        if final.exists():  # re-saving a step: move the old copy aside first
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(root)
        _atomic_write_text(root / "latest", final.name + "\n")
        shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep_last, keep=final.name)
    D.barrier()
    return final


def _prune(root: Path, keep_last: int | None, keep: str) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and leftover temp dirs."""
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-step-") or p.name.startswith(".old-step-")):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".latest.tmp-"):
            p.unlink(missing_ok=True)
    if not keep_last:
        return
    for s in _complete_steps(root)[:-keep_last]:
        if f"step-{s}" != keep:
            shutil.rmtree(root / f"step-{s}", ignore_errors=True)


def load_checkpoint(engine, run_dir: str | Path, *, generators: dict[str, torch.Generator] | None = None,
                    step: int | None = None, load_optimizer_states: bool = True) -> dict | None:
    """Restore the newest complete checkpoint (or ``step``) into ``engine``; every rank calls this.

    Restores weights, optimizer, LR scheduler and DeepSpeed's step counters, this rank's
    python/numpy/torch RNG states and the states of the ``generators`` passed in (in place).
    Returns the trainer state dict saved with it (with ``"step"``), or None if there is none.
    """
    root = _ckpt_root(run_dir)
    step = latest_step(run_dir) if step is None else step
    if step is None:
        return None
    path = root / f"step-{step}"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (complete steps: {_complete_steps(root)})")
    meta = json.loads((path / "meta.json").read_text())
    load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=not meta["exclude_frozen_parameters"],
                                          load_optimizer_states=load_optimizer_states,
                                          load_lr_scheduler_states=load_optimizer_states)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / DS_TAG}")
    rng_file = path / f"rng-rank{D.get_rank()}.pt"
    if not rng_file.exists():  # resumed on more ranks than saved: fall back to rank 0's streams
        rng_file = path / "rng-rank0.pt"
    _set_rng_state(torch.load(rng_file, weights_only=False), generators or {})
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    D.barrier()
    return state


# ----------------------------------------------------------------------------- checksum


def param_checksum(module: nn.Module, chunk: int = 1 << 20) -> float:
    """The sum of every parameter element of ``module``, accumulated in float64 ``chunk`` elements at
    a time on the parameters' device: at most one chunk is ever converted to float64 (a whole
    ``p.double()`` of LLaDA-8B's embedding would be a 4 GB copy). One host sync, at the end."""
    total = None
    for p in module.parameters():
        flat = p.detach().reshape(-1)
        for i in range(0, flat.numel(), chunk):
            part = flat[i:i + chunk].sum(dtype=torch.float64)
            total = part if total is None else total + part.to(total.device)
    return float(total) if total is not None else 0.0


# ----------------------------------------------------------------------------- HF export


def _hf_target(module: nn.Module) -> tuple[nn.Module, str]:
    """The HF (or peft) model inside ``module`` and its key prefix in ``module.state_dict()``,
    looking through ``.dllm`` (an order policy) and ``.model`` (a policy adapter)."""
    from transformers import PreTrainedModel

    try:
        from peft import PeftModel
        kinds: tuple = (PreTrainedModel, PeftModel)
    except ImportError:  # peft is optional for export
        kinds = (PreTrainedModel,)
    found, prefix = module, ""
    for _ in range(3):
        if isinstance(found, kinds):
            return found, prefix
        attr = next((a for a in ("dllm", "model") if isinstance(getattr(found, a, None), nn.Module)), None)
        if attr is None:
            break
        found, prefix = getattr(found, attr), f"{prefix}{attr}."
    raise TypeError(f"export_hf: {type(module).__name__} is neither a transformers/peft model nor a wrapper "
                    "with such a model in `.model` / `.dllm`")


def _merge_lora(peft_model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base-model state dict with every LoRA update merged: W' = W + scaling * B @ A
    (Hu et al. 2021, LoRA, Eq. 3 at inference), computed from the (consolidated) tensors in
    ``sd`` without touching the live model. Keys lose the ``base_model.model.`` prefix."""
    from peft.tuners.lora import LoraLayer

    from rollout.weights import merged_lora_weight

    sd = dict(sd)
    adapter = peft_model.active_adapter
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        a, b = sd.pop(f"{name}.lora_A.{adapter}.weight"), sd.pop(f"{name}.lora_B.{adapter}.weight")
        w = sd[f"{name}.base_layer.weight"]
        sd[f"{name}.base_layer.weight"] = merged_lora_weight(layer, adapter, w, a, b)
    out = {}
    for k, v in sd.items():
        if ".lora_" in k:  # other (inactive) adapters
            continue
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[k] = v
    return out


def _merge_lora_unquantized(peft_model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[nn.Module, dict]:
    """QLoRA: the adapters merged into the base weights as they were *before* 4-bit quantization
    (reloaded, in the checkpoint's own dtype, from the checkpoint the stage started from), the way
    d1 evaluates its GRPO adapters: on the unquantized base. Returns that unquantized model (to save
    with) and its state dict."""
    from peft.tuners.lora import LoraLayer

    from rollout.weights import merged_lora_weight

    quantized = peft_model.get_base_model()
    fresh = type(quantized).from_pretrained(quantized.name_or_path, dtype="auto")
    out = {k: v.detach().cpu() for k, v in fresh.state_dict().items()}
    adapter = peft_model.active_adapter
    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            a, b = sd[f"{name}.lora_A.{adapter}.weight"], sd[f"{name}.lora_B.{adapter}.weight"]
            out[key] = merged_lora_weight(layer, adapter, out[key], a, b)
    return fresh, out


def export_hf(engine_or_model, tokenizer, out_dir: str | Path, *, safe_serialization: bool = True,
              extra_files: Callable[[dict[str, torch.Tensor]], dict[str, Any]] | None = None) -> Path:
    """Write a ``from_pretrained``-loadable checkpoint of the policy (LoRA merged) to ``out_dir``.

    Accepts a DeepSpeed engine (any ZeRO stage: weights are consolidated on rank 0) or a
    module; wrappers are looked through (``rollout.PolicyAdapter.model``, an order policy's
    ``.dllm``). ``extra_files(full_state_dict) -> {name: object}``: more files, written with
    ``torch.save`` beside the model (rank 0, from the same consolidated weights).
    The directory is written under a temporary name and renamed, so it is never half-written.
    Every rank must call this with an engine; only rank 0 writes.
    """
    from rl.engine import consolidated_state_dict, unwrap

    module = unwrap(engine_or_model)
    target, prefix = _hf_target(module)
    is_engine = module is not engine_or_model
    full = consolidated_state_dict(engine_or_model) if is_engine else module.state_dict()
    out_dir = Path(out_dir)
    if D.get_rank() == 0:
        sd = {k[len(prefix):]: v.detach().cpu() for k, v in full.items() if k.startswith(prefix)}
        base = target
        if hasattr(target, "peft_config") and getattr(target.get_base_model(), "is_quantized", False):
            base, sd = _merge_lora_unquantized(target, sd)
        elif hasattr(target, "peft_config"):
            sd = _merge_lora(target, sd)
            base = target.get_base_model()
        tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        base.save_pretrained(tmp, state_dict=sd, safe_serialization=safe_serialization)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files(full) if extra_files else {}).items():
            torch.save(obj, tmp / name)
        _fsync_tree(tmp)
        old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return out_dir
